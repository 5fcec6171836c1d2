"""fastmask's training step as `fastmask pretrain` runs it: the method inside the DeepSpeed engine.

    step = make_engine_step(cfg, method)      # cfg: the pretrain Config (load_config(...))
    loss = step(imgs)                         # one optimizer step; no host sync (keys= optional)

Built from the engine's own pieces (`fastmask.engine.trainer`): `resolve_precision`,
`build_optimizer` (torch AdamW, fused, over `method.param_groups`), `build_ds_config` (ZeRO stage,
precision, accumulation, clipping) and `deepspeed.initialize`, plus `engine.compile` when
`engine.compile` / `engine.cuda_graphs` is set. One call = one iteration of the trainer's loop
with grad_accum 1: the lr written into every group (warmup + cosine from the step index),
`engine(imgs, keys=keys)` (imgs cast to the run's dtype unless the method `keeps_fp32_images`;
keys, the samples' global keys for the per-sample draws, copied to the device as the loop does),
`engine.backward`, `engine.step`, the loss and scalar metrics summed on the device with the first
non-finite step recorded, `on_step_end`.
Logging, checkpointing, the checkpoint-health probe (it records only the step after a checkpoint)
and the loader are not part of a step.

Keep this in step with `fastmask.engine.trainer._pretrain`'s loop: tests/test_bench.py checks that
this step and `pretrain()` give the same losses on the same images.
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
    from fastmask.engine.schedule import lr_at, scaled_lr
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
        optimizer = build_optimizer(e.optimizer, groups, base_lr, tuple(e.betas), device)
        ds_config = build_ds_config(cfg, info.world_size, precision, device)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        if e.compile or e.cuda_graphs:
            engine.compile(compile_kwargs={"mode": "reduce-overhead"} if e.cuda_graphs else {})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    total = total_steps or e.steps or 1_000_000
    warmup = e.warmup_steps or 0
    state = {"step": 0, "acc": {}, "first_bad": torch.full((), -1, dtype=torch.long, device=device)}

    B = cfg.data.batch_size
    keep_fp32 = getattr(module, "keeps_fp32_images", False)  # as the trainer: pixel targets from fp32 pixels

    def step(imgs: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        n = state["step"]
        lr = lr_at(n, total, base_lr, warmup, e.min_lr)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        if keys is None:  # what the loader gives at epoch 0 on one rank: the samples' global positions
            keys = torch.arange(n * B, (n + 1) * B, dtype=torch.int64)
        if not keep_fp32:
            imgs = imgs if imgs.dtype == dtype else imgs.to(dtype)
        outputs = engine(imgs, keys=keys.to(device, non_blocking=True))
        loss = outputs["loss"]
        engine.backward(loss)
        engine.step()
        loss_d = loss.detach().float()
        bad = state["first_bad"]
        state["first_bad"] = torch.where((bad < 0) & ~torch.isfinite(loss_d), torch.full_like(bad, n + 1),
                                         bad)
        acc = state["acc"]
        for k, v in outputs.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.detach().float().reshape(())
                acc[k] = acc[k] + v if k in acc else v.clone()
        state["step"] = n + 1
        if hasattr(module, "on_step_end"):
            module.on_step_end(n + 1, total)
        return loss.detach()

    step.optimizer = optimizer  # type: ignore[attr-defined]
    step.engine = engine  # type: ignore[attr-defined]
    step.precision = precision  # type: ignore[attr-defined]
    return step
