"""fastmask's training step as `fastmask pretrain` runs it: the method inside the DeepSpeed engine.

    step = make_engine_step(cfg, method)      # cfg: the pretrain Config (load_config(...))
    loss = step(imgs)                         # one optimizer step; no host sync (keys= optional)

Built from the engine's own pieces (`fastmask.engine.trainer`): `resolve_precision`,
`build_optimizer` (engine.optimizer over `method.param_groups`), `build_ds_config` (ZeRO stage,
precision, accumulation, clipping) and `deepspeed.initialize`, plus `engine.compile` when
`engine.compile` / `engine.cuda_graphs` is set. One call = one iteration of the trainer's loop with
grad_accum 1, through the same functions (`fastmask.engine.step`): the lr and weight-decay schedule
written into the groups, `micro_step` (forward with the samples' keys, backward, step), the on-device
sums, `after_step` (the method's post_step and on_step_end). Logging, checkpointing, the
checkpoint-health probe and the loader are not part of a step; tests/test_bench.py checks that this
step and `pretrain()` give the same losses on the same images.
"""
from __future__ import annotations

import os
from typing import Callable
from unittest import mock

import torch
from torch import nn


def why_not_engine() -> str | None:
    """Why the DeepSpeed engine cannot run here (deepspeed missing), else None."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        return f"the engine step needs deepspeed ({e})"
    return None


def make_engine_step(cfg, module: nn.Module, total_steps: int | None = None) -> Callable:
    """cfg: a fastmask Config; module: the method (forward(imgs) -> {"loss", ...}, param_groups(wd)),
    built by the caller (seeded as it likes) -> step(imgs) -> loss (detached).

    total_steps: the lr schedule's length (default cfg.engine.steps, else 1,000,000); warmup is
    engine.warmup_steps (engine.warmup_epochs needs a loader's epoch length: taken as none). The
    process group is initialized once per process (world size 1 unless a launcher set RANK/WORLD_SIZE).
    """
    import deepspeed

    from fastmask.engine.distributed import dist_info, init_distributed
    from fastmask.engine.schedule import scaled_lr
    from fastmask.engine.step import DTYPES, Schedule, StepSums, after_step, decaying_groups, micro_step
    from fastmask.engine.trainer import build_ds_config, build_optimizer, resolve_precision

    e = cfg.engine
    # The rendezvous variables a plain process sets for itself (dist_info) are dropped again when the
    # engine is built, as pretrain() does, so a process started later does not inherit the port.
    with mock.patch.dict(os.environ):
        info = dist_info()
        device = info.device
        precision = resolve_precision(e.precision, device)
        init_distributed(info)
        module.to(device)
        global_batch = cfg.data.batch_size * e.grad_accum * info.world_size
        base_lr = e.lr if e.lr is not None else scaled_lr(e.blr, global_batch)
        groups = module.param_groups(e.weight_decay)
        optimizer = build_optimizer(e.optimizer, groups, base_lr, e, device)
        ds_config = build_ds_config(cfg, info.world_size, precision, device)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        if e.compile or e.cuda_graphs:
            engine.compile(compile_kwargs={"mode": "reduce-overhead"} if e.cuda_graphs else {})
    total = total_steps or e.steps or 1_000_000
    sched = Schedule.of(e, base_lr, total, e.warmup_steps or 0)
    decaying = decaying_groups(optimizer)
    dtype, sums, B = DTYPES[precision], StepSums(device), cfg.data.batch_size
    keep_fp32 = getattr(module, "keeps_fp32_images", False)
    state = {"step": 0}

    def step(imgs, keys: torch.Tensor | None = None) -> torch.Tensor:
        n = state["step"]
        lr = sched.apply(optimizer, n, decaying)
        if keys is None:  # what the loader gives at epoch 0 on one rank: the samples' global positions
            keys = torch.arange(n * B, (n + 1) * B, dtype=torch.int64)
        outputs = micro_step(engine, imgs, keys.to(device, non_blocking=True), dtype, keep_fp32)
        loss = sums.add(n, outputs)
        state["step"] = n + 1
        after_step(module, n + 1, total, lr)
        return loss

    step.optimizer = optimizer  # type: ignore[attr-defined]
    step.engine = engine  # type: ignore[attr-defined]
    step.precision = precision  # type: ignore[attr-defined]
    return step
