"""One optimizer step of the engine: the single implementation `fastmask pretrain`'s loop and
`fastmask bench`'s engine step both run, so what the bench times is what training does.

    sched = Schedule.of(e, base_lr, total, warmup)   # lr warmup + cosine, weight decay cosine (when set)
    sums = StepSums(device)
    decaying = decaying_groups(optimizer)            # once, when the optimizer is built
    lr = sched.apply(optimizer, step, decaying)      # before the step's first micro-batch
    outputs = micro_step(engine, imgs, keys, dtype, keep_fp32)   # forward (with keys), backward, step
    sums.add(step, outputs)                          # on-device sums; the first non-finite step
    after_step(method, step + 1, total, lr)          # the method's own phase, then its step-end hook

Nothing here syncs with the host; logging, checkpoints and the loader stay with the caller.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import lr_at, weight_decay_at

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Schedule:
    """Per-step learning rate (linear warmup, cosine to min_lr) and weight decay (constant, or cosine
    from weight_decay to weight_decay_end, DINO's schedule) for the optimizer's groups."""
    base_lr: float
    total: int
    warmup: int
    min_lr: float
    weight_decay: float
    weight_decay_end: float | None

    @classmethod
    def of(cls, e, base_lr: float, total: int, warmup: int) -> "Schedule":
        """From the engine config `e` (min_lr, weight_decay, weight_decay_end)."""
        return cls(base_lr, total, warmup, e.min_lr, e.weight_decay, e.weight_decay_end)

    def lr(self, step: int) -> float:
        return lr_at(step, self.total, self.base_lr, self.warmup, self.min_lr)

    def wd(self, step: int) -> float:
        return weight_decay_at(step, self.total, self.weight_decay, self.weight_decay_end)

    def apply(self, optimizer: torch.optim.Optimizer, step: int, decaying: set[int]) -> float:
        """Write step `step`'s lr and weight decay into the groups; returns the lr.

        A group's `lr_scale` multiplies its lr (ADIOS's occluder); a group with `scheduled: False` keeps
        the base lr (SimSiam's predictor); the groups in `decaying` (`decaying_groups`, taken once when
        the optimizer is built) follow the weight-decay schedule."""
        lr, wd = self.lr(step), self.wd(step)
        for i, g in enumerate(optimizer.param_groups):
            g["lr"] = (lr if g.get("scheduled", True) else self.base_lr) * g.get("lr_scale", 1.0)
            if i in decaying:
                g["weight_decay"] = wd
        return lr


def decaying_groups(optimizer: torch.optim.Optimizer) -> set[int]:
    """The groups built with weight decay (the method's decay groups): those the schedule moves."""
    return {i for i, g in enumerate(optimizer.param_groups) if g["weight_decay"] > 0}


class StepSums:
    """The steps' scalar outputs summed on the device and the first step whose loss was not finite
    (1-based; -1 while none): read them only when logging, so the step stays free of host syncs."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.acc: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, step: int, outputs: dict) -> torch.Tensor:
        """Add one micro-batch's outputs (of 0-based optimizer step `step`); returns the detached fp32
        loss."""
        loss = outputs["loss"].detach().float()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss),
                                     torch.full_like(self.first_bad, step + 1), self.first_bad)
        for k, v in outputs.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.detach().float().reshape(())
                self.acc[k] = self.acc[k] + v if k in self.acc else v.clone()
        self.n += 1
        return loss

    def take(self) -> tuple[dict[str, torch.Tensor], int]:
        """The sums and their count since the last take, and reset them."""
        acc, n = self.acc, self.n
        self.acc, self.n = {}, 0
        return acc, n


def cast_images(imgs: torch.Tensor | list[torch.Tensor], dtype: torch.dtype):
    """A batch (one tensor, or a list of views) in the run's dtype; tensors already in it pass as they are."""
    if isinstance(imgs, torch.Tensor):
        return imgs if imgs.dtype == dtype else imgs.to(dtype)
    return [cast_images(x, dtype) for x in imgs]


def micro_step(engine, imgs, keys: torch.Tensor, dtype: torch.dtype, keep_fp32: bool) -> dict:
    """Forward with the samples' global keys (the method's per-sample draws), backward, DeepSpeed's step
    (which applies the optimizer only at an accumulation boundary). Images go in the run's dtype unless
    the method `keeps_fp32_images` (pixel targets from fp32 pixels, as the official AMP code)."""
    outputs = engine(imgs if keep_fp32 else cast_images(imgs, dtype), keys=keys)
    engine.backward(outputs["loss"])
    engine.step()
    return outputs


def after_step(method, step: int, total: int, lr: float) -> None:
    """After optimizer step `step` (1-based): the method's own phase (`post_step(lr)`: ADIOS's occluder),
    then its `on_step_end(step, total)` (EMA teachers, schedules)."""
    if hasattr(method, "post_step"):
        method.post_step(lr)
    if hasattr(method, "on_step_end"):
        method.on_step_end(step, total)
