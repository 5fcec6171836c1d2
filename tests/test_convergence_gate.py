"""Convergence gate of the tiny default MAE run (recipe `mae_tiny`) on the CPU.

1. Gate: the same training run with every optimization on (backend="triton" for every op: the visible-only
   patch embedding, scatter, loss, attention and the fused add+LayerNorm / bias+GELU chain, through Triton's
   interpreter, plus torch.compile) and with all of them off (backend="torch", eager) gives the same
   per-step losses within fp32 tolerance. The math is the same function in both (no approximation is
   switched on), so the bound is a float bound, not a modelling one: measured max relative difference
   1.2e-7 over 8 steps and 2.4e-7 over 50 (losses differ in the last bits only); the test allows 1e-4,
   as Adam amplifies rounding differences step by step over longer runs.

   Shrunk for CI time, and only here: the interpreter costs seconds of CPU per step even at the smallest
   size, so the gate runs `GATE_STEPS` = 50 steps (FASTMASK_GATE_STEPS overrides; the whole suite takes
   about 4 min on a quiet 2-core machine without it, so CI affords the 50) of mae_tiny with img_size
   32 (4 patches, 1 visible), batch 2, decoder_depth 1 and the
   encoder cut to its first 2 of 12 blocks (same class, same init, a ModuleList slice).
   torch.compile uses backend="aot_eager": inductor's C++ compile of the step took ~8 min of wall time
   on this machine, too slow for CI; aot_eager still traces forward and backward through dynamo and
   AOTAutograd with the custom ops in the graph.
2. Golden losses moved to tests/test_loss_parity.py: they pin the engine run that test checks against
   the independent official MAE step, rather than numbers this code produced about itself.

The gate uses plain torch AdamW (lr, betas, weight decay from the recipe; constant lr, no warmup) over the
method's param groups and the method directly (build_method(load_config(...))), not DeepSpeed.
"""
from __future__ import annotations

import os

import pytest
import torch

from fastmask.data.synthetic import SyntheticLoader
from fastmask.engine.config import load_config
from fastmask.methods import build_method

GATE_OVERRIDES = ["data.img_size=32", "data.batch_size=2", "method_args.decoder_depth=1"]
GATE_ENCODER_DEPTH = 2
GATE_STEPS = int(os.environ.get("FASTMASK_GATE_STEPS", "50"))
GATE_RTOL = 1e-4


def train_losses(overrides: list[str], steps: int, encoder_depth: int | None = None,
                 compile_backend: str | None = None, seed: int = 0) -> list[float]:
    """Per-step losses of `steps` optimizer steps of mae_tiny with `overrides`, deterministic given `seed`."""
    cfg = load_config("mae_tiny", [*overrides, f"engine.seed={seed}"])
    torch.manual_seed(seed)
    method = build_method(cfg)
    if encoder_depth is not None:
        method.blocks = method.blocks[:encoder_depth]
    e = cfg.engine
    opt = torch.optim.AdamW(method.param_groups(e.weight_decay), lr=e.lr, betas=tuple(e.betas))
    model = torch.compile(method, backend=compile_backend) if compile_backend else method
    loader = SyntheticLoader(cfg.data, seed=seed)
    losses = []
    for imgs, _ in zip(loader.epoch(0), range(steps)):
        loss = model(imgs)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [float(v) for v in torch.stack(losses)]  # one host sync, after the run


@pytest.fixture
def one_thread():
    # Fixed thread count: fp32 reductions may split differently with more threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_gate_every_optimization_on_matches_all_off(one_thread):
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the fused backends need a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    off = train_losses([*GATE_OVERRIDES, "engine.backend=torch"], GATE_STEPS, GATE_ENCODER_DEPTH)
    on = train_losses([*GATE_OVERRIDES, "engine.backend=triton"], GATE_STEPS, GATE_ENCODER_DEPTH,
                      compile_backend="aot_eager")
    rel = [abs(a - b) / abs(b) for a, b in zip(on, off)]
    print(f"gate: {GATE_STEPS} steps, max relative loss difference {max(rel):.3e}, losses off {off}, on {on}")
    assert all(torch.isfinite(torch.tensor(off))) and off[-1] < off[0]  # it trains
    assert max(rel) <= GATE_RTOL, list(zip(off, on))
