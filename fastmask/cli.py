"""`fastmask pretrain | bench | eval | visualize | plan | info`: a thin dispatcher.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`,
imported only when that subcommand runs (so `fastmask eval` never imports DeepSpeed).

What every subcommand shares, done here once:
- config overrides `key=value` are taken anywhere on the line, before or after options (they
  join `args.overrides` in the order given);
- errors never end in a traceback: a user error (bad config, missing or unfit file, unwritable
  path, ...) prints one line `fastmask <command>: error: ...` and exits 2; anything else prints one
  line `fastmask <command>: internal error: ...` and exits 1. Notes a command attached to the
  exception (`add_note`: e.g. which checkpoint a failed run kept) end the line; Ctrl-C ends with
  `fastmask <command>: interrupted` and status 130. FASTMASK_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

SUBCOMMANDS = {
    "pretrain": ("fastmask.engine.pretrain", "pretrain a model with a masking method (DeepSpeed engine)"),
    "bench": ("fastmask.bench.cli", "benchmark training steps, ops or the data loader against baselines"),
    "eval": ("fastmask.eval.cli", "k-NN and linear-probe evaluation of a checkpoint's encoder"),
    "visualize": ("fastmask.eval.visualize", "PNG grids of masks and reconstructions"),
    "plan": ("fastmask.engine.plan_cli",
             "memory per GPU, micro-batch, accumulation and throughput per ZeRO stage"),
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


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.-]*=")


def _in_line_order(items: list[str], argv: list[str]) -> list[str]:
    """`items` (override strings from positionals, extras and `--set` values) in the order the line
    gives them, so the last `key=value` for a key wins as written."""
    pending, ordered = list(items), []
    for token in argv:
        token = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if token in pending:
            pending.remove(token)
            ordered.append(token)
    return ordered + pending


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input or an environment problem, not a bug in fastmask.
    The project's own RuntimeError subclasses are looked up only where their module is loaded
    (an exception of a module never imported cannot have been raised)."""
    errors: list[type[BaseException]] = [ValueError, KeyError, OSError, ImportError]
    for module, name in (("fastmask.engine.trainer", "NonFiniteLossError"),
                         ("fastmask.ops.backends", "BackendUnavailable"),
                         ("fastmask.data.files", "CorruptImageError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            errors.append(cls)
    return tuple(errors)


def add_note(e: BaseException, note: str) -> BaseException:
    """`BaseException.add_note` (Python 3.11) on every supported Python: the CLI's error line ends with it."""
    e.__notes__ = [*getattr(e, "__notes__", []), note]
    return e


def error_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = text if text.startswith(type(e).__name__) else f"{type(e).__name__}: {text}"
    return " ".join("; ".join([text, *getattr(e, "__notes__", [])]).split())  # one line, whatever the message


def run_command(command: str, fn, args) -> int:
    """fn(args) -> exit status, with the error contract of the module docstring."""
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt as e:
        if os.environ.get("FASTMASK_DEBUG"):
            raise
        print("; ".join([f"fastmask {command}: interrupted", *getattr(e, "__notes__", [])]), file=sys.stderr,
              flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - the contract: one line, never a traceback
        if os.environ.get("FASTMASK_DEBUG"):
            raise
        user = isinstance(e, _user_errors())
        kind = "error" if user else "internal error"
        hint = "" if user else " (a bug in fastmask: FASTMASK_DEBUG=1 shows the traceback)"
        print(f"fastmask {command}: {kind}: {error_line(e)}{hint}", file=sys.stderr, flush=True)
        return 2 if user else 1


def main(argv: list[str] | None = None) -> int:
    argv = _take_local_rank(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    # Only the chosen subcommand's module is imported to add its arguments.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[command][0])
        module.add_arguments(parsers[command])
    args, extra = parser.parse_known_args(argv)
    # argparse gives a `nargs="*"` positional only its first run of values: `key=value` items after
    # later options come back as extras. Later items win, so keep the order of the line.
    overrides = [a for a in extra if _OVERRIDE.match(a)]
    unknown = [a for a in extra if not _OVERRIDE.match(a)]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = _in_line_order([*args.overrides, *overrides], argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return run_command(args.command, module.main, args)


if __name__ == "__main__":
    sys.exit(main())
