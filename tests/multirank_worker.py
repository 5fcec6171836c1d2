"""Run by the multi-rank tests under a launcher (torchrun / deepspeed): tiny runs at several ZeRO stages.

    torchrun --nproc_per_node 2 tests/multirank_worker.py OUT STAGES STEPS MODE [key=value ...]

For each ZeRO stage s in STAGES (comma-separated), trains TinyMethod (deterministic, content-based
masks) with `data.batch_size=8` per rank for STEPS steps. MODE:
- `first`: an uninterrupted run into OUT/z{s}_full, then a run stopped after STEPS // 2 steps
  (engine.stop_at) into OUT/z{s};
- `resume`: runs OUT/z{s} again (it resumes from its checkpoint).
Rank 0 writes OUT/<run>.json per run: the logged (step, loss) pairs and the step resumed from.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine_helpers import tiny_config, tiny_factory  # noqa: E402

from fastmask.engine.trainer import pretrain  # noqa: E402


def _run(out: Path, name: str, stage: str, steps: int, extra: list[str]) -> None:
    cfg = tiny_config(f"engine.zero_stage={stage}", "data.batch_size=8", *extra, steps=steps)
    result = pretrain(cfg, out=out / name, method_factory=tiny_factory(), progress=False)
    if int(os.environ["RANK"]) == 0:
        (out / f"{name}.json").write_text(json.dumps({"losses": result.losses,
                                                      "resumed_from": result.resumed_from,
                                                      "world_size": int(os.environ["WORLD_SIZE"])}))


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    out, stages, steps, mode, extra = Path(argv[0]), argv[1].split(","), int(argv[2]), argv[3], argv[4:]
    for s in stages:
        if mode == "first":
            _run(out, f"z{s}_full", s, steps, extra)
            _run(out, f"z{s}", s, steps, [*extra, f"engine.stop_at={steps // 2}"])
        else:
            _run(out, f"z{s}", s, steps, extra)


if __name__ == "__main__":
    main()
