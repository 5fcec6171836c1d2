"""Run by test_run_folder.py under torchrun (2 CPU ranks, ZeRO-3): the run folder's decisions are shared.

    torchrun --nproc_per_node 2 tests/multirank_safety_worker.py OUT

1. `sigterm`: only rank 1 receives SIGTERM (it signals itself during its 3rd forward); both ranks
   must stop after the same step with one checkpoint between them;
2. `refused`: the same folder with data.img_size=64: rank 0 refuses the changed config and every
   rank must fail with the same error (not wait for rank 0 in a collective);
3. `resumed`: the same command again continues from the checkpoint of step 3.
Each rank writes OUT/<phase>_rank<r>.json with what it saw.
"""
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine_helpers import TinyMethod, tiny_config  # noqa: E402

from fastmask.engine.config import ConfigError  # noqa: E402
from fastmask.engine.signals import StoppedBySignal  # noqa: E402
from fastmask.engine.trainer import pretrain  # noqa: E402


class SignalsItselfOnRank1(TinyMethod):
    calls = 0

    def forward(self, imgs, keys=None):
        type(self).calls += 1
        if type(self).calls == 3 and int(os.environ["RANK"]) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(imgs, keys)


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    run = out / "run"
    base = ("engine.zero_stage=3", "engine.checkpoint_every=0")

    def record(phase: str, **what) -> None:
        (out / f"{phase}_rank{rank}.json").write_text(json.dumps(what))

    try:
        pretrain(tiny_config(*base, steps=6), out=run, method_factory=lambda c: SignalsItselfOnRank1(),
                 progress=False)
        record("sigterm", stopped=None)
    except StoppedBySignal as stop:
        record("sigterm", stopped=[stop.signum, stop.step, stop.checkpoint])
    try:
        pretrain(tiny_config(*base, "data.img_size=64", steps=6), out=run,
                 method_factory=lambda c: TinyMethod(), progress=False)
        record("refused", error=None)
    except ConfigError as err:
        record("refused", error=str(err))
    result = pretrain(tiny_config(*base, steps=6), out=run, method_factory=lambda c: TinyMethod(),
                      progress=False)
    record("resumed", resumed_from=result.resumed_from, step=result.step)


if __name__ == "__main__":
    main()
