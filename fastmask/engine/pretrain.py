"""`fastmask pretrain [--config RECIPE] [--steps N] [--out DIR] [--resume|--no-resume] [key=value ...]`

    fastmask pretrain                                   # MAE ViT-Tiny on the embedded photos, CPU minutes
    fastmask pretrain --config mae_vit_large_patch16 data.root=/data/imagenet/train --out runs/mae_l
    deepspeed --num_gpus 8 -m fastmask.cli pretrain --config mae_vit_base_patch16 --out runs/mae_b
    torchrun --nproc_per_node 8 -m fastmask.cli pretrain --config mae_vit_base_patch16 --out runs/mae_b

The run folder (`--out`, default `runs/<recipe>`) receives config.yaml (the resolved config),
metrics.jsonl, checkpoints/ and, with TensorBoard installed, tensorboard/. Running again with the
same folder resumes from its latest checkpoint (engine.resume=auto; `--no-resume` starts over,
`--resume` insists on a checkpoint). `--export PATH` writes the trained encoder as a plain
timm-loadable state dict at the end. Overrides `key=value` may stand anywhere on the line.

Bad input (unknown keys or names, sizes that do not fit, corrupt images with
data.on_corrupt=fail, a run folder or export path that cannot be written) prints one error line
and exits with status 2 before any training. An error during training ends with one line too,
naming the checkpoint the run folder keeps. FASTMASK_DEBUG=1 shows the traceback instead.
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
                        help=f"a shipped recipe name or a YAML path (default: {DEFAULT_RECIPE}, or "
                             "<method>_tiny when method=<name> is given)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps to train (sets engine.steps, the schedule's length)")
    parser.add_argument("--out", default=None,
                        help="run folder (default: the config's `out`, else runs/<recipe>)")
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


def _kept(out: Path) -> str:
    """Where a run that failed part-way left its work (for the error line)."""
    from .resume import newest_good

    good = newest_good(out)
    if good is None:
        return f"the run folder {out} holds no good checkpoint"
    return f"the run folder keeps its newest good checkpoint {good.path}, which running again resumes"


def check_outputs(out: Path, export: str | None) -> None:
    """Everything this run will write can be written: checked before any work."""
    from fastmask.paths import check_output_dir, check_output_file

    check_output_dir(out, "--out", files=("config.yaml", "metrics.jsonl", "checkpoints"))
    if export:
        check_output_file(export, "--export")


def main(args: argparse.Namespace) -> int:
    import yaml

    from .config import ConfigError, load_config, to_dict

    if args.local_rank is not None:  # the deepspeed launcher passes --local_rank; the env holds it too
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    overrides = list(args.overrides)
    if args.config is None:
        args.config = default_recipe(overrides)
    if args.steps is not None:
        overrides.append(f"engine.steps={args.steps}")
    if args.resume is not None:
        overrides.append(f"engine.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    out = Path(args.out or cfg.out or Path("runs") / Path(args.config).stem)
    check_outputs(out, args.export)
    from fastmask.cli import add_note

    from .signals import StoppedBySignal
    from .trainer import pretrain

    t0 = time.perf_counter()
    try:
        result = pretrain(cfg, out=out)
    except StoppedBySignal as e:
        # SIGTERM/Ctrl-C: a checkpoint was saved; 128 + the signal, as a shell reports it
        print(f"fastmask pretrain: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except (Exception, KeyboardInterrupt) as e:
        # A refusal before any work (ConfigError: a lock, a config change that cannot resume) changed
        # nothing; NonFiniteLossError names its own checkpoint.
        if out.is_dir() and not isinstance(e, ConfigError) and not hasattr(e, "last_checkpoint"):
            add_note(e, _kept(out))
        raise
    rank = int(os.environ.get("RANK", "0"))
    if args.export and rank == 0 and result.last_checkpoint is not None:
        from .export import export_encoder
        try:
            export_encoder(result.last_checkpoint, args.export)
        except Exception as e:
            add_note(e, f"training finished and kept {result.last_checkpoint}; export it with "
                        f"`fastmask pretrain --out {out} --export PATH`")
            raise
    if rank == 0:
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
        how = (f"resumed at step {result.resumed_from}, " if result.resumed_from is not None else "")
        print(f"fastmask pretrain: done: step {result.step}/{result.total_steps}, {how}final loss {loss}, "
              f"{time.perf_counter() - t0:.1f} s, run folder {out}"
              + (f", encoder exported to {args.export}" if args.export else ""), flush=True)
    return 0
