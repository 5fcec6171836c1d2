"""`fastmask pretrain | bench | eval | visualize | plan | info`: a thin dispatcher.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`,
imported only when that subcommand runs (so `fastmask eval` never imports DeepSpeed).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = {
    "pretrain": ("fastmask.engine.pretrain", "pretrain a model with a masking method (DeepSpeed engine)"),
    "bench": ("fastmask.bench.cli", "benchmark training steps, ops or the data loader against baselines"),
    "eval": ("fastmask.eval.cli", "k-NN and linear-probe evaluation of a checkpoint's encoder"),
    "visualize": ("fastmask.eval.visualize", "PNG grids of masks and reconstructions"),
    "plan": ("fastmask.engine.plan_cli", "memory per GPU, micro-batch, accumulation and throughput per ZeRO stage"),
    "info": ("fastmask.info", "which backend each op would use on this machine, and why"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="fastmask", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {}
    for name, (_, help_text) in SUBCOMMANDS.items():
        parsers[name] = sub.add_parser(name, help=help_text)
    return parser, parsers


def _take_local_rank(argv: list[str]) -> list[str]:
    """DeepSpeed's launcher puts `--local_rank=N` before the subcommand; keep it in the environment
    (where torchrun and DeepSpeed also put it) and out of argparse's way."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _take_local_rank(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    # Only the chosen subcommand's module is imported to add its arguments.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[command][0])
        module.add_arguments(parsers[command])
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
