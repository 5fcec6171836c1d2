"""Momentum (EMA) teachers: copy, update, schedule. Shared by ExtreMA, MST, RelaxMIM and ADIOS-BYOL.

    teacher = make_teacher(student)                      # frozen deep copy, same architecture
    ...optimizer step...
    ema_update_(teacher, student, cosine_momentum(step, total_steps, 0.996))

The update runs as two foreach kernels over the parameter lists (no Python loop over tensors, no
host sync). Only parameters are averaged: buffers (BatchNorm running statistics, DINO centres)
stay the teacher's own, as BYOL/solo-learn and DINO do.

Low-precision teachers: when the engine casts the whole method to bf16/fp16 (DeepSpeed's bf16
mode), an update of (1 - m) * (theta_s - theta_t) with m >= 0.996 falls mostly below bf16's
resolution and the teacher would stop moving. The EMA then runs on an fp32 shadow of the teacher
(kept on the teacher module, not a parameter or buffer, so neither cast nor checkpointed; after a
resume it restarts from the bf16 teacher) and is copied into the teacher's parameters.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of `student` with every parameter frozen (requires_grad False), same initial weights."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    t_named, s_named = list(teacher.named_parameters()), list(student.named_parameters())
    if [n for n, _ in t_named] != [n for n, _ in s_named]:
        t_names, s_names = {n for n, _ in t_named}, {n for n, _ in s_named}
        raise ValueError("teacher and student parameters differ: only in teacher "
                         f"{sorted(t_names - s_names)[:5]}, only in student {sorted(s_names - t_names)[:5]}")
    bad = [n for (n, t), (_, s) in zip(t_named, s_named) if t.shape != s.shape]
    if bad:
        raise ValueError(f"teacher and student parameter shapes differ at {bad[:5]}")
    return [t for _, t in t_named], [s for _, s in s_named]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: theta_t <- m * theta_t + (1 - m) * theta_s, over all parameters (names must match).

    Student parameters of another dtype (bf16 module, fp32 teacher) are cast by the foreach add.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params, s_params = _pairs(teacher, student)
    if momentum == 1.0 or not t_params:
        return
    low = [t for t in t_params if t.dtype in (torch.bfloat16, torch.float16)]
    if low:
        shadow = _fp32_shadow(teacher, t_params)
        s32 = [s.float() for s in s_params]
        torch._foreach_mul_(shadow, momentum)
        torch._foreach_add_(shadow, s32, alpha=1.0 - momentum)
        torch._foreach_copy_(t_params, shadow)
        return
    if any(t.dtype != s.dtype for t, s in zip(t_params, s_params)):
        s_params = [s.to(t.dtype) for t, s in zip(t_params, s_params)]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def _fp32_shadow(teacher: nn.Module, t_params: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 copies of the teacher's parameters, created on first use (or when their layout changed)."""
    shadow = teacher.__dict__.get("_ema_fp32_shadow")
    if shadow is None or len(shadow) != len(t_params) or any(
            a.shape != b.shape or a.device != b.device for a, b in zip(shadow, t_params)):
        shadow = [t.detach().float().clone() for t in t_params]
        teacher.__dict__["_ema_fp32_shadow"] = shadow
    return shadow


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """m(t) = final - (final - base) * (cos(pi t / T) + 1) / 2: base at t = 0, final at t = T (BYOL, DINO)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    t = min(max(step, 0), total_steps)
    return final - (final - base) * (math.cos(math.pi * t / total_steps) + 1.0) / 2.0


__all__ = ["make_teacher", "ema_update_", "cosine_momentum"]
