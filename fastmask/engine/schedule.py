"""Per-step schedules: MAE's linear warmup then half-cycle cosine (official `util/lr_sched.py`, per step),
and DINO's cosine weight decay.

The engine computes the lr (and the weight decay) from the optimizer-step index alone and writes it
into the param groups before each step, so a resumed run needs nothing but the step number to be on
the same schedule.
"""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """lr for optimizer step `step` (0-based) of `total_steps`.

    Warmup: base_lr * step / warmup_steps (0 at step 0, as the official code at iteration 0).
    Then: min_lr + (base_lr - min_lr) * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))).
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(blr: float, effective_batch: int) -> float:
    """MAE's linear scaling rule: lr = blr * effective_batch / 256."""
    return blr * effective_batch / 256


def weight_decay_at(step: int, total_steps: int, start: float, end: float | None) -> float:
    """Weight decay for optimizer step `step` (0-based): `start` constant when `end` is None, else DINO's
    `cosine_scheduler(start, end)` per step: end + (start - end) * 0.5 * (1 + cos(pi * step / total)),
    `start` at step 0 rising (or falling) towards `end` (DINO/MST: 0.04 -> 0.4)."""
    if end is None:
        return start
    return lr_at(step, total_steps, start, 0, end)  # the same half cosine, from start to end, no warmup
