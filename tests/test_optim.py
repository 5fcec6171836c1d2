"""fastmask.optim: optimizers by name (the engine's and a method's own) and SideOptimizer, the optimizer of
a part of a method trained outside DeepSpeed (ADIOS's occluder): LARS as the official ADIOS code runs it,
fp32 master weights for bf16 parameters, state that round-trips through a state dict, gradients averaged
over ranks (two gloo processes)."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fastmask.optim import OptimizerSettings, SideOptimizer, build_optimizer


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # group order
    return [nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in ((6, 5), (3, 2, 2), (5,), (4,))]


def _groups(params, wd=0.1):
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": wd},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def _grads(seed, params):
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(p.shape, generator=g) for p in params]


def test_lars_is_solo_learns_lars_wrapper_over_sgd():
    """build_optimizer('lars') with 1-D tensors in a weight-decay-0 group equals solo-learn's LARSWrapper(SGD
    momentum 0.9, eta, clip=True, exclude_bias_n_norm=True) written out by hand, over steps with changing
    lr."""
    pytest.importorskip("timm")
    ours, ref = _params(), _params()
    opt = build_optimizer("lars", _groups(ours), 0.5, OptimizerSettings(momentum=0.9, lars_eta=0.02))
    bufs = {}
    for step, lr in enumerate((0.5, 0.3, 2e-3)):
        grads = _grads(step, ours)
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        with torch.no_grad():
            for i, p in enumerate(ref):
                d = p.grad.clone()
                if p.ndim != 1:  # excluded: no decay, no trust ratio
                    ratio = min(0.02 * p.norm() / (d.norm() + 0.1 * p.norm() + 1e-8) / lr, 1)
                    d = (d + 0.1 * p) * ratio
                bufs[i] = d if i not in bufs else bufs[i] * 0.9 + d
                p -= lr * bufs[i]
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ours[0], _params()[0])


def test_optimizer_names_and_their_errors(monkeypatch):
    params = _params()
    assert type(build_optimizer("sgd", _groups(params), 0.1)).__name__ == "SGD"
    assert build_optimizer("sgd", _groups(params), 0.1).defaults["momentum"] == 0.9
    assert type(build_optimizer("adamw", _groups(params), 0.1)).__name__ == "AdamW"
    with pytest.raises(ValueError,
                       match="optimizer must be one of adamw|apex_fused_adam|sgd|lars, got 'adam'"):
        build_optimizer("adam", _groups(params), 0.1)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        build_optimizer("apex_fused_adam", _groups(params), 0.1)
    monkeypatch.setitem(sys.modules, "timm.optim", None)  # as if timm were not installed
    with pytest.raises(ValueError, match=r"timm is not importable.*fastmask\[timm\]"):
        build_optimizer("lars", _groups(params), 0.1)


def test_engine_refuses_unknown_optimizer_names_before_work():
    from fastmask.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="engine.optimizer must be adamw|apex_fused_adam|sgd|lars"):
        load_config("adios_tiny", ["engine.optimizer=lamb"])
    with pytest.raises(ConfigError, match="engine.momentum must be in"):
        load_config("adios_tiny", ["engine.momentum=1.5"])


def test_resuming_sgd_zero_state_at_another_world_size_is_refused():
    """DeepSpeed's universal conversion (needed to re-partition ZeRO 1-3 state) reads Adam's moments only
    (deepspeedai/DeepSpeed#8608): an SGD/LARS run is refused with one line; stage 0 and the same world size
    need no conversion."""
    from pathlib import Path

    from fastmask.engine.config import ConfigError
    from fastmask.engine.trainer import _needs_universal

    saved = {"zero_stage": 2, "world_size": 2}
    with pytest.raises(ConfigError, match=r"engine.optimizer=lars.*DeepSpeed#8608.*on 2 rank\(s\)"):
        _needs_universal(saved, 1, 2, Path("run/step_4"), "lars")
    assert _needs_universal(saved, 2, 2, Path("run/step_4"), "sgd") is False
    assert _needs_universal({"zero_stage": 0, "world_size": 2}, 1, 0, Path("run/step_4"), "sgd") is False
    assert _needs_universal(saved, 1, 2, Path("run/step_4"), "adamw") is True


def test_side_optimizer_steps_scaled_lr_and_clears_grads():
    """lr of each group = the engine's lr x its lr_scale; the parameters' .grad is left None (nothing for
    the engine's clipping to see)."""
    ours, ref = _params(), _params()
    groups = _groups(ours)
    groups[0]["lr_scale"] = 0.5
    side = SideOptimizer(groups, "sgd")
    plain = torch.optim.SGD([{**g, "params": [q for q in ref if (q.ndim > 1) == (i == 0)]}
                             for i, g in enumerate(_groups(ref))], lr=0.0, momentum=0.9)
    for step in range(2):
        grads = _grads(step, ours)
        side.step(grads, lr=0.2)
        for q, g in zip(ref, grads):
            q.grad = g
        plain.param_groups[0]["lr"], plain.param_groups[1]["lr"] = 0.1, 0.2
        plain.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q)
        assert all(p.grad is None for p in ours)
    with pytest.raises(RuntimeError, match="set_groups after"):
        side.set_groups(groups)
    with pytest.raises(ValueError, match="2 gradients for 4 parameters"):
        side.step(grads[:2], 0.1)


def test_side_optimizer_bf16_masters_and_exact_resume():
    """bf16 parameters (as DeepSpeed's bf16 mode casts the whole module) are stepped through fp32 masters:
    the trajectory is the fp32 one, rounded; the state (optimizer + masters) round-trips through
    get/set_extra_state, so a resumed optimizer continues exactly; weights written from outside are
    adopted."""
    f32, b16 = _params(), _params(dtype=torch.bfloat16)
    with torch.no_grad():
        for a, b in zip(f32, b16):
            a.copy_(b.float())  # the same starting point
    side32, side16 = SideOptimizer(_groups(f32), "sgd"), SideOptimizer(_groups(b16), "sgd")
    for step in range(2):
        grads = [g.bfloat16().float() for g in _grads(step, f32)]  # the same values in both dtypes
        side32.step(grads, 0.05)
        side16.step([g.bfloat16() for g in grads], 0.05)
    assert all(p.dtype == torch.bfloat16 for p in b16)
    for a, b in zip(f32, b16):  # masters keep the small updates that bf16 rounds away
        torch.testing.assert_close(b, a.bfloat16(), rtol=0, atol=0)
    state = side16.get_extra_state()
    assert state["masters"][0].dtype == torch.float32
    again = _params(dtype=torch.bfloat16)
    resumed = SideOptimizer(_groups(again), "sgd")
    resumed.set_extra_state(state)
    for a, b in zip(again, b16):
        assert torch.equal(a, b)
    grads = _grads(7, f32)
    side16.step([g.bfloat16() for g in grads], 0.05)
    resumed.step([g.bfloat16() for g in grads], 0.05)
    for a, b in zip(again, b16):
        assert torch.equal(a, b)
    with torch.no_grad():
        b16[0].fill_(1.0)  # e.g. weights loaded into the module
    side16.step([torch.zeros_like(p) for p in b16], 0.0)
    assert (b16[0] == 1.0).all() and (side16._masters[0] == 1.0).all()


def _rank_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    params = _params()
    side = SideOptimizer(_groups(params), "sgd")
    side.step(_grads(rank, params), 0.1)  # each rank its own gradient
    out[rank] = [p.detach().clone() for p in params]
    dist.destroy_process_group()


@pytest.mark.multirank
def test_side_optimizer_averages_gradients_over_ranks():
    """Two gloo ranks with different gradients end with the same weights: the step of the mean gradient."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")  # not fork: a child would inherit the process group earlier tests left
    with ctx.Manager() as manager:
        out = manager.dict()
        procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert all(p.exitcode == 0 for p in procs)
        got = {r: out[r] for r in range(2)}
    ref = _params()
    mean = [(a + b) / 2 for a, b in zip(_grads(0, ref), _grads(1, ref))]
    SideOptimizer(_groups(ref), "sgd").step(mean, 0.1)
    for a, b, r in zip(got[0], got[1], ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, r.detach())
