"""Two CPU ranks (gloo, launched with torchrun) at ZeRO stages 1, 2 and 3.

- the 2-rank losses (batch 8 per rank) agree with a 1-rank run of the same global batch (16);
- a 2-rank run stopped half-way and resumed gives exactly the uninterrupted 2-rank losses;
- a 2-rank ZeRO-2/3 checkpoint resumes on 1 rank (DeepSpeed's universal format) and continues the
  1-rank trajectory within fp32 tolerance.
Everything runs in two launcher invocations to keep process start-up (torch + DeepSpeed imports) down.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine_helpers import tiny_config, tiny_factory

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

HERE = Path(__file__).parent
STEPS = 4
STAGES = (1, 2, 3)


def _launch(out: Path, mode: str) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(HERE / "multirank_worker.py"),
           str(out), ",".join(map(str, STAGES)), str(STEPS), mode]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _losses(path: Path) -> list[float]:
    return [loss for _, loss in json.loads(path.read_text())["losses"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multirank")
    _launch(out, "first")
    # Keep the half-way checkpoints for the 1-rank (world size change) resume before they advance.
    for s in (2, 3):
        shutil.copytree(out / f"z{s}", out / f"z{s}_to1")
    _launch(out, "resume")
    return out


@pytest.fixture(scope="module")
def one_rank():
    from fastmask.engine.trainer import pretrain
    cfg = tiny_config("engine.zero_stage=0", "data.batch_size=16", steps=STEPS)
    return [loss for _, loss in pretrain(cfg, out=None, method_factory=tiny_factory(), progress=False).losses]


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_match_one_rank_of_the_same_global_batch(runs, one_rank, stage):
    two = _losses(runs / f"z{stage}_full.json")
    assert len(two) == len(one_rank) == STEPS
    assert two == pytest.approx(one_rank, rel=2e-5, abs=1e-6)
    assert one_rank[-1] != one_rank[0]  # the weights did move


@pytest.mark.parametrize("stage", STAGES)
def test_two_rank_stop_and_resume_is_exact(runs, stage):
    full = _losses(runs / f"z{stage}_full.json")
    first = json.loads((runs / f"z{stage}.json").read_text())
    assert first["resumed_from"] == STEPS // 2
    resumed = [json.loads(line)["loss"]
               for line in (runs / f"z{stage}" / "metrics.jsonl").read_text().splitlines()]
    assert resumed == full


@pytest.mark.parametrize("stage", (2, 3))
def test_resume_two_rank_zero_checkpoint_on_one_rank(runs, one_rank, stage):
    from fastmask.engine.trainer import pretrain
    cfg = tiny_config(f"engine.zero_stage={stage}", "data.batch_size=16", steps=STEPS)
    result = pretrain(cfg, out=runs / f"z{stage}_to1", method_factory=tiny_factory(), progress=False)
    assert result.resumed_from == STEPS // 2
    assert (runs / f"z{stage}_to1" / "checkpoints" / f"step_{STEPS // 2:08d}" / "universal").is_dir()
    assert [loss for _, loss in result.losses] == pytest.approx(one_rank[STEPS // 2:], rel=2e-5, abs=1e-6)
