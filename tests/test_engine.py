"""The DeepSpeed training loop on CPU with a tiny stand-in method (tests/engine_helpers.py).

Single-process runs happen in this pytest process (world size 1; the engine sets the rendezvous
variables itself); crash tests run the engine in a subprocess that dies with os._exit at a chosen
point (FASTMASK_TEST_CRASH_AT), as a kill -9 would.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_helpers import TinyMethod, tiny_config, tiny_factory
from fastmask.engine import checkpoint as ckpt
from fastmask.engine.config import ConfigError
from fastmask.engine.schedule import lr_at
from fastmask.engine.trainer import NonFiniteLossError, pretrain

HERE = Path(__file__).parent


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_logs_checkpoints_and_learns(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config("engine.checkpoint_every=4", "engine.keep_last=2", "engine.log_every=2", steps=16)
    result = pretrain(cfg, out=out, method_factory=tiny_factory(), progress=False)
    assert result.step == 16 and result.resumed_from is None
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12, 14, 16]
    for r in rows:
        assert {"step", "epoch", "loss", "lr", "imgs_per_s", "mem_gb", "tflops", "hidden",
                "skipped"} <= set(r)
        assert r["imgs_per_s"] > 0 and r["hidden"] == pytest.approx(0.5, abs=0.1)
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 16, 0.003, 2, 0.0))
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000012", "step_00000016"]
    assert ckpt.latest_tag(out) == "step_00000016"
    state = ckpt.read_state(out, "step_00000016")
    assert (state["step"], state["world_size"], state["zero_stage"], state["precision"]) == (16, 1, 0, "fp32")
    assert state["config"]["data"]["img_size"] == 32
    assert (root / "step_00000016" / "config.yaml").is_file() and (out / "config.yaml").is_file()
    assert (root / "step_00000016" / "rng_rank0.pt").is_file()


@pytest.mark.parametrize("overrides", [
    ("engine.zero_stage=0",),
    ("engine.zero_stage=2", "engine.grad_accum=2", "engine.clip_grad=0.5"),
])
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, overrides):
    # noise=0.1: the method draws from torch's global RNG, so the RNG states must be restored too.
    make = tiny_factory(noise=0.1)
    full = pretrain(tiny_config(*overrides, steps=8), out=tmp_path / "a", method_factory=make, progress=False)
    half = pretrain(tiny_config(*overrides, "engine.stop_at=4", steps=8), out=tmp_path / "b",
                    method_factory=make, progress=False)
    assert half.step == 4 and ckpt.latest_tag(tmp_path / "b") == "step_00000004"
    rest = pretrain(tiny_config(*overrides, steps=8), out=tmp_path / "b", method_factory=make, progress=False)
    assert rest.resumed_from == 4 and rest.step == 8
    assert [x for x in half.losses + rest.losses] == full.losses  # exact, fp32 on CPU
    assert [r["loss"] for r in _metrics(tmp_path / "b")] == [r["loss"] for r in _metrics(tmp_path / "a")]


def _run_in_subprocess(out: Path, crash_at: str, steps: int) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
            "from engine_helpers import tiny_config, tiny_factory\n"
            "from fastmask.engine.trainer import pretrain\n"
            f"pretrain(tiny_config('engine.checkpoint_every=3', steps={steps}), out={str(out)!r}, "
            "method_factory=tiny_factory(noise=0.1), progress=False)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["FASTMASK_TEST_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kill_mid_run_and_mid_checkpoint_then_resume(tmp_path):
    steps = 9
    make = tiny_factory(noise=0.1)
    full = pretrain(tiny_config("engine.checkpoint_every=3", steps=steps), out=tmp_path / "ref",
                    method_factory=make, progress=False)
    out = tmp_path / "run"
    # Killed while writing the checkpoint of step 6: DeepSpeed's files are in .staging, not renamed.
    proc = _run_in_subprocess(out, "ckpt:6", steps)
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert ckpt.latest_tag(out) == "step_00000003"
    assert (out / "checkpoints" / ".staging" / "step_00000006").is_dir()
    assert not (out / "checkpoints" / "step_00000006").exists()
    # Resumed, then killed right after optimizer step 8 (before its checkpoint).
    proc = _run_in_subprocess(out, "step:8", steps)
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert ckpt.latest_tag(out) == "step_00000006"
    assert not (out / "checkpoints" / ".staging").exists()
    rest = pretrain(tiny_config("engine.checkpoint_every=3", steps=steps), out=out, method_factory=make,
                    progress=False)
    assert rest.resumed_from == 6
    assert rest.losses == full.losses[6:]
    # metrics.jsonl holds the one trajectory: lines past a resumed checkpoint were dropped.
    assert [r["loss"] for r in _metrics(out)] == [loss for _, loss in full.losses]


class _NaNAt(TinyMethod):
    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, imgs, keys=None):
        out = super().forward(imgs, keys)
        self.calls += 1
        if self.calls >= self.at:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config("engine.checkpoint_every=2", "engine.log_every=100", steps=10)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 6") as ei:
        pretrain(cfg, out=tmp_path, method_factory=lambda c: _NaNAt(6), progress=False)
    assert ei.value.step == 6 and ei.value.last_checkpoint.endswith("step_00000004")
    assert ckpt.latest_tag(tmp_path) == "step_00000004"
    assert not (tmp_path / "checkpoints" / "step_00000006").exists()


def test_a_checkpoint_whose_weights_give_a_nonfinite_loss_is_not_good(tmp_path):
    # The NaN comes at step 5, the first step from step 4's weights: step 4 is not named as good.
    cfg = tiny_config("engine.checkpoint_every=2", "engine.log_every=100", steps=10)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 5") as ei:
        pretrain(cfg, out=tmp_path, method_factory=lambda c: _NaNAt(5), progress=False)
    assert ei.value.last_checkpoint.endswith("step_00000002")
    health = ckpt.read_state(tmp_path, "step_00000004")["health"]
    assert health["good"] is False and "the first loss from its weights (step 5) is nan" in health["why"][0]
    assert ckpt.read_state(tmp_path, "step_00000002")["health"]["good"] is True
    assert ckpt.latest_tag(tmp_path) == "step_00000002"


def test_resume_modes_and_option_checks(tmp_path):
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        pretrain(tiny_config("engine.resume=always", steps=2), out=tmp_path, method_factory=tiny_factory())
    pretrain(tiny_config(steps=2), out=tmp_path, method_factory=tiny_factory(), progress=False)
    again = pretrain(tiny_config("engine.resume=never", steps=2), out=tmp_path, method_factory=tiny_factory(),
                     progress=False)
    assert again.resumed_from is None and len(_metrics(tmp_path)) == 2
    with pytest.raises(ConfigError, match="on_nonfinite=skip needs"):
        pretrain(tiny_config("engine.on_nonfinite=skip"), out=None, method_factory=tiny_factory())
    with pytest.raises(ConfigError, match="resuming converts only within stage 0, within stages 1-2"):
        pretrain(tiny_config("engine.zero_stage=2", steps=3), out=tmp_path, method_factory=tiny_factory())


def test_activation_checkpointing_and_bf16_on_cpu():
    made = []

    def make(cfg):
        made.append(TinyMethod())
        return made[-1]

    result = pretrain(tiny_config("engine.activation_checkpointing=true", "engine.precision=bf16",
                                  "engine.zero_stage=1", steps=3), out=None, method_factory=make,
                      progress=False)
    assert made[0].grad_checkpointing is True and made[0].steps_seen == 3
    assert next(made[0].parameters()).dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
