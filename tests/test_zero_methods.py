"""Every method under every ZeRO stage it accepts: 2 CPU ranks, tiny shapes, one launch.

tests/zero_methods_worker.py trains MAE, ExtreMA, RelaxMIM (stopgrad and ema targets), ADIOS-BYOL
(simultaneous, also with a fixed patch projection; alternating, whose occluder takes its own optimizer's
step in `post_step`, at stages 0 and 2: it refuses ZeRO-3) and MST for 4 steps at ZeRO-0 and ZeRO-3
(ExtreMA also at 2, MST at 1) on the same two ranks. Checked here:
- each run's losses and whole state (students, EMA teachers, buffers, draw counters) equal the
  ZeRO-0 run's within fp32 tolerance; MAE also when started from an official-format weights file;
- the 2-rank ZeRO-3 runs of ExtreMA, MST and RelaxMIM-ema equal a 1-rank ZeRO-0 run of the same
  global batch (masks and views are keyed per sample: `fastmask.draws`); ADIOS-BYOL is left out,
  its BatchNorm heads normalize over each rank's batch;
- ADIOS's fixed patch projection stays at its init at ZeRO-0 and ZeRO-3 while its blocks train;
- a ZeRO-3 run stopped half-way and resumed on both ranks continues exactly;
- its half-way checkpoint resumed on one rank (DeepSpeed's universal checkpoint plus
  `frozen_state`) restores the state of step 2 exactly (teachers, DINO centre, step counter) and
  continues the 2-rank trajectory;
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


def _assert_states_close(got, want, rtol: float, atol: float, key: str = "") -> None:
    """Tensors within tolerance, anything else equal, through nested extra state (ADIOS's side optimizer)."""
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), key
        for k in want:
            _assert_states_close(got[k], want[k], rtol, atol, f"{key}.{k}" if key else str(k))
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), key
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_states_close(g, w, rtol, atol, f"{key}[{i}]")
    else:
        assert got == want, key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_methods")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(HERE / "zero_methods_worker.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
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
@pytest.mark.parametrize("name", ["adios_byol_frozenpatch_z0", "adios_byol_frozenpatch_z3"])
def test_a_fixed_patch_projection_stays_at_its_init_while_the_rest_trains(runs, name):
    _, got = _load(runs, name)
    init = torch.load(runs / "adios_byol_frozenpatch_z0_init.pt", weights_only=False)
    fixed = [k for k in init if ".patch_embed." in k]
    assert fixed and any(k.startswith("teacher.") for k in fixed)  # the student's and its EMA's
    for k in fixed:  # the EMA averages it with itself, as the official teachers do: round-off only
        atol = 1e-7 if k.startswith("teacher.") else 0
        torch.testing.assert_close(got[k], init[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")
    trained = [k for k in init if ".blocks.0.attn.qkv.weight" in k and not k.startswith("teacher.")]
    assert trained and all((got[k] - init[k]).abs().max() > 1e-4 for k in trained)


@pytest.mark.slow
@pytest.mark.multirank
def test_init_from_official_weights_reaches_every_rank(runs):
    started, _ = _load(runs, "mae_init_z0")
    fresh, _ = _load(runs, "mae_z0")
    assert started[0] != pytest.approx(fresh[0], rel=1e-3)  # other initial weights: the file was loaded


def _split_key_biases(state: dict) -> tuple[dict, dict]:
    """-> (the state without attention key biases, {layer: its key bias})."""
    rest, keys = {}, {}
    for k, v in state.items():
        if k.endswith("attn.qkv.bias"):
            q, keys[k], val = v.chunk(3)
            rest[k] = torch.cat([q, val])
        elif k.endswith("attn.k.bias"):
            keys[k] = v
        else:
            rest[k] = v
    return rest, keys


def _assert_same_across_world_sizes(got: dict, want: dict) -> None:
    """States of runs on different world sizes (same global batch): fp32 tolerance, except the
    attention key biases: they get no gradient (softmax is shift-invariant), and AdamW turns their
    round-off gradients, which change with the batch split, into updates of up to lr per step."""
    (got, got_keys), (want, want_keys) = _split_key_biases(got), _split_key_biases(want)
    _assert_states_close(got, want, rtol=1e-4, atol=1e-5)
    _assert_states_close(got_keys, want_keys, rtol=0, atol=2 * W.STEPS * 1e-3)


def _one_rank(case: str, stage: int, out: Path | None, *extra: str):
    """A 1-rank run in this process with the 2-rank runs' global batch -> (losses, method)."""
    from fastmask.engine.trainer import pretrain
    from fastmask.methods import build_method

    built = {}

    def keep(cfg):
        built["m"] = build_method(cfg)
        return built["m"]

    cfg = W.config(case, stage, "data.batch_size=8", *extra)
    result = pretrain(cfg, out=out, method_factory=keep, progress=False)
    return result, built["m"]


def _state(method) -> dict:
    from fastmask.engine.zero import gathered

    with gathered(list(method.parameters())):
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in method.state_dict().items()}


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("case", ["extrema", "mst", "relaxmim_ema"])
def test_two_ranks_at_zero3_equal_one_rank_at_zero0(runs, case):
    result, method = _one_rank(case, 0, None)
    losses, two = _load(runs, f"{case}_z3")
    assert losses == pytest.approx([loss for _, loss in result.losses], rel=2e-5, abs=1e-6)
    one = _state(method)
    assert any(k.startswith("teacher.") for k in one)
    _assert_same_across_world_sizes(two, one)


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
def test_zero3_checkpoint_resumes_on_one_rank_with_teacher_and_buffers_exact(runs):
    out = runs / "mst_resume_to1"
    result, method = _one_rank("mst", 3, out, f"engine.stop_at={W.STEPS // 2}")  # restores, trains nothing
    assert result.resumed_from == W.STEPS // 2 \
        and (out / "checkpoints" / "step_00000002" / "universal").is_dir()
    _, want = _load(runs, "mst_resume_first")
    state = _state(method)
    _assert_states_close(state, want, rtol=0, atol=0)
    assert state["_extra_state"]["step"] == W.STEPS // 2
    result, method = _one_rank("mst", 3, out)  # and continues the 2-rank trajectory
    losses, full = _load(runs, "mst_z3")
    assert [loss for _, loss in result.losses] == pytest.approx(losses[W.STEPS // 2:], rel=2e-5, abs=1e-6)
    _assert_same_across_world_sizes(_state(method), full)


# ------------------------------------------------------------------ refusals (no launch)
def test_method_refuses_a_zero_stage_before_anything_is_built(monkeypatch):
    from fastmask.engine.trainer import pretrain
    from fastmask.methods.adios import ADIOS

    monkeypatch.setattr(ADIOS, "__init__", lambda *a, **k: pytest.fail("built before the refusal"))
    with pytest.raises(ConfigError,
                       match=r"method adios cannot train at engine.zero_stage=3: mode=alternating"):
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
    plain = build_ds_config(load_config("mae_tiny", ["engine.zero_stage=3"]), 8, "bf16",
                            torch.device("cuda", 0))
    assert "offload_param" not in plain["zero_optimization"] \
        and "offload_optimizer" not in plain["zero_optimization"]


@pytest.mark.parametrize("saved,now,ok", [((3, 2), (3, 1), True), ((2, 2), (1, 4), True),
                                          ((3, 2), (2, 2), False), ((1, 2), (3, 2), False),
                                          ((0, 1), (2, 2), False), ((0, 1), (0, 2), None)])
def test_resume_across_layouts_converts_or_refuses(saved, now, ok):
    from fastmask.engine.trainer import _needs_universal

    state = {"zero_stage": saved[0], "world_size": saved[1]}
    if ok is False:
        with pytest.raises(ConfigError,
                           match="resuming converts only within stage 0, within stages 1-2 and within"):
            _needs_universal(state, now[1], now[0], Path("ckpt"))
    else:
        assert _needs_universal(state, now[1], now[0], Path("ckpt")) is bool(ok)


def test_lars_is_refused_where_deepspeed_hands_it_flat_partitions():
    from fastmask.engine.trainer import pretrain

    with pytest.raises(ConfigError,
                       match="engine.optimizer=lars takes a trust ratio per parameter, but ZeRO stage 1"):
        pretrain(load_config("mae_tiny", ["engine.zero_stage=1", "engine.optimizer=lars"]), out=None)
