"""`fastmask pretrain [--config RECIPE] [--steps N] [--out DIR] [--resume|--no-resume] [key=value ...]`

    fastmask pretrain                                   # MAE ViT-Tiny on the embedded photos, CPU minutes
    fastmask pretrain --config mae_vit_large_patch16 data.root=/data/imagenet/train --out runs/mae_l
    deepspeed --num_gpus 8 -m fastmask.cli pretrain --config mae_vit_base_patch16 --out runs/mae_b
    torchrun --nproc_per_node 8 -m fastmask.cli pretrain --config mae_vit_base_patch16 --out runs/mae_b

The run folder (`--out`, default `runs/<recipe>`) receives config.yaml (the resolved config),
metrics.jsonl, checkpoints/ and, with TensorBoard installed, tensorboard/. Running again with the
same folder resumes from its latest checkpoint (engine.resume=auto; `--no-resume` starts over,
`--resume` insists on a checkpoint). `--export PATH` writes the trained encoder as a plain
timm-loadable state dict at the end. Bad input (unknown keys or names, sizes that do not fit,
corrupt images with data.on_corrupt=fail) prints one error and exits with status 2 before any
training; FASTMASK_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_RECIPE = "mae_tiny"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"a shipped recipe name or a YAML path (default: {DEFAULT_RECIPE}, or <method>_tiny "
                             "when method=<name> is given)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps to train (sets engine.steps, the schedule's length)")
    parser.add_argument("--out", default=None, help="run folder (default: the config's `out`, else runs/<recipe>)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="resume", action="store_const", const="always",
                       help="resume from the run folder's latest checkpoint; fail if there is none")
    group.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                       help="start over even if the run folder holds checkpoints")
    parser.add_argument("--export", default=None, metavar="PATH",
                        help="after training, write the encoder's timm-loadable state dict to PATH")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model=vit_small_patch16 engine.zero_stage=2")


def default_recipe(overrides: list[str]) -> str:
    """Without --config: the tiny CPU recipe of the method named by a `method=<name>` override (each
    method's options differ, so starting from MAE's recipe would carry MAE's method_args over)."""
    from .config import list_recipes

    methods = [o.split("=", 1)[1].strip() for o in overrides if o.startswith("method=")]
    if methods and f"{methods[-1]}_tiny" in list_recipes():
        return f"{methods[-1]}_tiny"
    return DEFAULT_RECIPE


def _user_errors() -> tuple[type[BaseException], ...]:
    from fastmask.data.files import CorruptImageError

    from .config import ConfigError
    from .trainer import NonFiniteLossError
    errors = [ConfigError, ValueError, KeyError, FileNotFoundError, ImportError, CorruptImageError,
              NonFiniteLossError]
    try:
        from fastmask.ops import BackendUnavailable
        errors.append(BackendUnavailable)
    except ImportError:
        pass
    return tuple(errors)


def _message(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return f"{type(e).__name__}: {text}" if not text.startswith(type(e).__name__) else text


def main(args: argparse.Namespace) -> int:
    import yaml

    from .config import load_config, to_dict

    if args.local_rank is not None:  # the deepspeed launcher passes --local_rank; the env holds it too
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    overrides = list(args.overrides)
    if args.config is None:
        args.config = default_recipe(overrides)
    if args.steps is not None:
        overrides.append(f"engine.steps={args.steps}")
    if args.resume is not None:
        overrides.append(f"engine.resume={args.resume}")
    from .signals import StoppedBySignal

    errors = _user_errors()
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        out = Path(args.out or cfg.out or Path("runs") / Path(args.config).stem)
        from .trainer import pretrain

        t0 = time.perf_counter()
        result = pretrain(cfg, out=out)
        rank = int(os.environ.get("RANK", "0"))
        if args.export and rank == 0 and result.last_checkpoint is not None:
            from .export import export_encoder
            export_encoder(result.last_checkpoint, args.export)
        if rank == 0:
            loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
            how = (f"resumed at step {result.resumed_from}, " if result.resumed_from is not None else "")
            print(f"fastmask pretrain: done: step {result.step}/{result.total_steps}, {how}final loss {loss}, "
                  f"{time.perf_counter() - t0:.1f} s, run folder {out}"
                  + (f", encoder exported to {args.export}" if args.export else ""), flush=True)
        return 0
    except StoppedBySignal as e:  # SIGTERM/Ctrl-C: a checkpoint was saved; 128 + the signal, as a shell reports it
        print(f"fastmask pretrain: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except errors as e:
        if os.environ.get("FASTMASK_DEBUG"):
            raise
        print(f"fastmask pretrain: error: {_message(e)}", file=sys.stderr, flush=True)
        return 2
