"""Every method under every ZeRO stage it accepts: 2 CPU ranks, tiny shapes, one launch.

tests/zero_methods_worker.py trains MAE, ExtreMA, RelaxMIM (stopgrad and ema targets), ADIOS-BYOL
(simultaneous; alternating only at stage 0: it refuses ZeRO-3) and MST for 4 steps at ZeRO-0 and
ZeRO-3 (ExtreMA also at 2, MST at 1) on the same two ranks. Checked here:
- each run's losses and whole state (students, EMA teachers, buffers, draw counters) equal the
  ZeRO-0 run's within fp32 tolerance; MAE also when started from an official-format weights file;
- a ZeRO-3 run stopped half-way and resumed on both ranks continues exactly;
- its half-way checkpoint resumed on one rank (DeepSpeed's universal checkpoint plus
  `frozen_state`) restores the state of step 2 exactly: teachers, DINO centre, draw counters;
- refusals come before any work, in one line: a method at a stage it cannot use, offload where
  the device or stage cannot use it, a resume across stage families DeepSpeed cannot convert.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import zero_methods_worker as W  # noqa: E402

from fastmask.engine.config import ConfigError, load_config  # noqa: E402


def _load(out: Path, name: str) -> tuple[list[float], dict]:
    losses = [loss for _, loss in json.loads((out / f"{name}.json").read_text())["losses"]]
    return losses, torch.load(out / f"{name}.pt", weights_only=False)


def _assert_states_close(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], torch.Tensor):
            torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
        else:
            assert got[k] == want[k], k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_methods")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(HERE / "zero_methods_worker.py"),
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


COMPARED = [(name, case) for name, case, stage, _ in W.RUNS if stage > 0] + [("mae_init_z3", "mae_init")]


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("name,case", COMPARED)
def test_zero_stage_matches_zero0_on_the_same_ranks(runs, name, case):
    want_losses, want = _load(runs, f"{case}_z0")
    losses, got = _load(runs, name)
    assert losses == pytest.approx(want_losses, rel=2e-5, abs=1e-6)
    _assert_states_close(got, want, rtol=1e-4, atol=1e-5)
    init = torch.load(runs / f"{case}_z0_init.pt", weights_only=False)
    moved = [(want[k] - init[k]).abs().max().item() for k in want
             if k.startswith("teacher.") and not any(s in k for s in ("running_", "num_batches"))]
    if moved:  # far beyond the tolerance: a teacher left at its initial weights would fail above
        assert max(moved) > 10 * 1e-5, f"{case}: the ZeRO-0 teacher barely moved ({max(moved):.2e})"


@pytest.mark.slow
@pytest.mark.multirank
def test_init_from_official_weights_reaches_every_rank(runs):
    started, _ = _load(runs, "mae_init_z0")
    fresh, _ = _load(runs, "mae_z0")
    assert started[0] != pytest.approx(fresh[0], rel=1e-3)  # other initial weights: the file was loaded


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("case", W.RESUMED)
def test_zero3_stop_and_resume_is_exact(runs, case):
    full_losses, full = _load(runs, f"{case}_z3")
    resumed_losses, resumed = _load(runs, f"{case}_resume")
    assert json.loads((runs / f"{case}_resume.json").read_text())["resumed_from"] == W.STEPS // 2
    assert resumed_losses == full_losses[W.STEPS // 2:]
    _assert_states_close(resumed, full, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.multirank
def test_zero3_checkpoint_restores_teacher_buffers_and_draws_on_one_rank(runs):
    from fastmask.engine.trainer import pretrain
    from fastmask.engine.zero import gathered
    from fastmask.methods import build_method

    built = {}

    def keep(cfg):
        built["m"] = build_method(cfg)
        return built["m"]

    out = runs / "mst_resume_to1"
    result = pretrain(W.config("mst", 3, f"engine.stop_at={W.STEPS // 2}"), out=out, method_factory=keep,
                      progress=False)
    assert result.resumed_from == W.STEPS // 2 and (out / "checkpoints" / "step_00000002" / "universal").is_dir()
    _, want = _load(runs, "mst_resume_first")
    with gathered(list(built["m"].parameters())):
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in built["m"].state_dict().items()}
    _assert_states_close(state, want, rtol=0, atol=0)
    assert state["_extra_state"]["stream"]["draws"] == W.STEPS // 2


# ------------------------------------------------------------------ refusals (no launch)
def test_method_refuses_a_zero_stage_before_anything_is_built(monkeypatch):
    from fastmask.engine.trainer import pretrain
    from fastmask.methods.adios import ADIOS

    monkeypatch.setattr(ADIOS, "__init__", lambda *a, **k: pytest.fail("built before the refusal"))
    with pytest.raises(ConfigError, match=r"method adios cannot train at engine.zero_stage=3: mode=alternating"):
        pretrain(load_config("adios_tiny", ["engine.zero_stage=3"]), out=None)


def test_offload_settings_the_device_or_stage_cannot_use_are_refused_in_one_line():
    from fastmask.engine.trainer import pretrain

    with pytest.raises(ConfigError) as err:
        pretrain(load_config("mae_tiny", ["engine.zero_stage=2", "engine.offload_params=cpu",
                                          "engine.offload_optimizer=cpu"]), out=None)
    msg = str(err.value)
    assert "\n" not in msg
    assert "engine.offload_params=cpu needs engine.zero_stage 3 (got 2)" in msg
    assert "engine.offload_optimizer=cpu moves states from accelerator memory" in msg
    with pytest.raises(ConfigError, match="nvme offload needs engine.offload_nvme_path"):
        pretrain(load_config("mae_tiny", ["engine.zero_stage=3", "engine.offload_params=nvme"]), out=None)
    with pytest.raises(ConfigError, match="engine.offload_optimizer must be none|cpu|nvme"):
        load_config("mae_tiny", ["engine.offload_optimizer=gpu"])


def test_offload_maps_to_deepspeeds_config():
    from fastmask.engine.trainer import build_ds_config

    cfg = load_config("mae_tiny", ["engine.zero_stage=3", "engine.offload_optimizer=cpu",
                                   "engine.offload_params=nvme", "engine.offload_nvme_path=/nvme/x"])
    zero = build_ds_config(cfg, 8, "bf16", torch.device("cuda", 0))["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme/x"}
    plain = build_ds_config(load_config("mae_tiny", ["engine.zero_stage=3"]), 8, "bf16", torch.device("cuda", 0))
    assert "offload_param" not in plain["zero_optimization"] and "offload_optimizer" not in plain["zero_optimization"]


@pytest.mark.parametrize("saved,now,ok", [((3, 2), (3, 1), True), ((2, 2), (1, 4), True), ((3, 2), (2, 2), False),
                                          ((1, 2), (3, 2), False), ((0, 1), (2, 2), False), ((0, 1), (0, 2), None)])
def test_resume_across_layouts_converts_or_refuses(saved, now, ok):
    from fastmask.engine.trainer import _needs_universal

    state = {"zero_stage": saved[0], "world_size": saved[1]}
    if ok is False:
        with pytest.raises(ConfigError, match="resuming converts only within stage 0, within stages 1-2 and within"):
            _needs_universal(state, now[1], now[0], Path("ckpt"))
    else:
        assert _needs_universal(state, now[1], now[0], Path("ckpt")) is bool(ok)
