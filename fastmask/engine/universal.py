"""Resume a ZeRO checkpoint at another world size through DeepSpeed's universal checkpoint format.

ZeRO stages 1-3 save the optimizer state (and, at stage 3, the parameters) partitioned by rank, so
a checkpoint of N ranks does not load on M != N ranks (or at another of these stages) as is.
DeepSpeed's `ds_to_universal` rewrites it per parameter (fp32 weights, exp_avg, exp_avg_sq, each
whole); loading that with `checkpoint.load_universal=true` re-partitions it for the new world size.
fastmask converts once, on rank 0, into `<checkpoint>/universal/` (staged and renamed, like every
checkpoint write), and the trainer then loads from there. Stage 0 needs none of this: its optimizer
state is whole.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

from .distributed import DistInfo, barrier


def convert_to_universal(folder: Path, out: Path, workers: int = 2) -> None:
    """DeepSpeed checkpoint folder -> universal checkpoint folder `out` (written via out.staging)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(staging),
                              num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every file it touches
        ds_to_universal(args)
    staging.replace(out)


def _provide_model_states(out: Path, stage: int, world_size: int) -> None:
    """DeepSpeed opens the model-states files of the *loading* layout (stage 3: one per rank,
    `zero_pp_rank_{r}_mp_rank_00_model_states.pt`; stages 1-2: `mp_rank_00_model_states.pt`), but the
    conversion keeps the saving layout's. A universal load takes no weights from them (those come
    from `zero/`), only bookkeeping every copy shares: add the missing names as copies."""
    names = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)] if stage == 3
             else ["mp_rank_00_model_states.pt"])
    have = sorted(out.glob("*model_states.pt"))
    for name in names:
        if not (out / name).exists():
            tmp = out / (name + ".tmp")
            shutil.copyfile(have[0], tmp)
            tmp.replace(out / name)


def ensure_universal(root: Path, tag: str, info: DistInfo, stage: int) -> Path:
    """Collective: rank 0 converts `root/tag` once into `root/tag/universal` (and gives it the
    model-states files ZeRO `stage` on this world size opens); -> that folder."""
    folder = root / tag
    out = folder / "universal"
    if info.rank == 0:
        if not out.is_dir():
            convert_to_universal(folder, out)
        _provide_model_states(out, stage, info.world_size)
    barrier()
    if not out.is_dir():
        raise RuntimeError(f"converting {folder} to DeepSpeed's universal format failed")
    return out
