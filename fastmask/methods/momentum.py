"""Momentum (EMA) teachers: copy, update, schedule. Shared by ExtreMA, MST, RelaxMIM and ADIOS-BYOL.

    teacher = make_teacher(student, build)               # frozen copy, same architecture and weights
    ...optimizer step...
    ema_update_(teacher, student, cosine_momentum(step, total_steps, 0.996))

`build()` makes a fresh module of the student's architecture. The teacher is built with it (its
random draws discarded, so the RNG stream continues as if the teacher had been deep-copied) and
then takes the student's weights. Built this way, a teacher made inside DeepSpeed's partitioned
construction (`zero.Init`, ZeRO-3) is partitioned like the student; a deep copy of a partitioned
module would share DeepSpeed's bookkeeping with it.

The update runs as two foreach kernels over the parameter lists (no Python loop over tensors, no
host sync). Only parameters are averaged: buffers (BatchNorm running statistics, DINO centres)
stay the teacher's own, as BYOL/solo-learn and DINO do.

ZeRO-3: a parameter partitioned by DeepSpeed holds only this rank's slice (`p.ds_tensor`, flat, of
the padded flattened parameter) outside a gather. Teacher and student parameters of equal shapes
are partitioned identically (same numel, same group, same slice per rank), which is checked on
every update, so the EMA runs slice by slice on `ds_tensor` with no gather: a rank touches
1/world_size of the teacher. Small parameters DeepSpeed keeps gathered between steps
("persistent") are re-gathered from their updated slices after the update.

Low-precision teachers: when the engine casts the whole method to bf16/fp16 (DeepSpeed's bf16
mode), an update of (1 - m) * (theta_s - theta_t) with m >= 0.996 falls mostly below bf16's
resolution and the teacher would stop moving. The EMA then runs on an fp32 shadow of the
teacher's local tensors (kept on the teacher module, not a parameter or buffer, so never cast;
`ema_shadow` / `set_ema_shadow` let the engine checkpoint it) and is copied into the teacher.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from .partition import full_shape, is_partitioned, local_tensor, regather

_SHADOW = "_ema_fp32_shadow"


def make_teacher(student: nn.Module, build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A copy of `student` with every parameter frozen (requires_grad False) and the same weights
    and buffers. `build()` makes a module of the same architecture (see the module docstring);
    without it the teacher is a deep copy, which only an unpartitioned student allows."""
    if build is None:
        if any(is_partitioned(p) for p in student.parameters()):
            raise ValueError("make_teacher: the student is partitioned (ZeRO-3); pass build= to construct "
                             "the teacher partitioned as well")
        teacher = copy.deepcopy(student)
    else:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # its init draws are overwritten: leave the stream as is
            teacher = build()
        copy_weights_(teacher, student)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    for name, p in teacher.named_parameters():
        p.requires_grad_(False)
        p._ema_frozen = name in trainable  # frozen here only: `unfreeze_ema_` gives it back (fine-tuning)
    teacher._ema_teacher = True  # found by `teachers()` (the engine checkpoints their fp32 shadows)
    return teacher


def unfreeze_ema_(module: nn.Module) -> nn.Module:
    """Make trainable again the parameters `make_teacher` froze that the student trains (not those frozen
    in the student too, like a fixed position embedding): a teacher's encoder handed out to fine-tune."""
    for p in module.parameters():
        if getattr(p, "_ema_frozen", False):
            p.requires_grad_(True)
    return module


def teacher_mode_(teacher: nn.Module, training: bool) -> nn.Module:
    """Put a target network in its training-time mode: eval (no drop-path or dropout in the target,
    as the official teachers are built with drop_path 0), except its BatchNorm layers, which follow
    `training`. A BYOL-style target (BYOL, solo-learn's momentum heads) runs in train mode: its
    BatchNorm normalizes with the batch's statistics and keeps its own running statistics (not
    averaged, see the module docstring). In eval mode it would normalize with running statistics it
    never updates, its initial 0 / 1."""
    teacher.eval()
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(training)
    return teacher


def teachers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The EMA teachers `make_teacher` made inside `module`, with their qualified names."""
    return [(n, m) for n, m in module.named_modules() if getattr(m, "_ema_teacher", False)]


@torch.no_grad()
def copy_weights_(dst: nn.Module, src: nn.Module) -> None:
    """In place: every parameter (slice by slice under ZeRO-3) and buffer of `src` into `dst`."""
    d_loc, s_loc = _local_pairs(dst, src)
    torch._foreach_copy_(d_loc, s_loc)
    d_buf, s_buf = list(dst.named_buffers()), list(src.named_buffers())
    if [n for n, _ in d_buf] != [n for n, _ in s_buf]:
        raise ValueError("copy_weights_: the modules' buffers differ")
    for (_, d), (_, s) in zip(d_buf, s_buf):
        d.copy_(s)
    regather(list(dst.parameters()))


def _pairs(teacher: nn.Module,
           student: nn.Module) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    t_named, s_named = list(teacher.named_parameters()), list(student.named_parameters())
    if [n for n, _ in t_named] != [n for n, _ in s_named]:
        t_names, s_names = {n for n, _ in t_named}, {n for n, _ in s_named}
        raise ValueError("teacher and student parameters differ: only in teacher "
                         f"{sorted(t_names - s_names)[:5]}, only in student {sorted(s_names - t_names)[:5]}")
    bad = [n for (n, t), (_, s) in zip(t_named, s_named) if full_shape(t) != full_shape(s)]
    if bad:
        raise ValueError(f"teacher and student parameter shapes differ at {bad[:5]}")
    return [n for n, _ in t_named], [t for _, t in t_named], [s for _, s in s_named]


def _partition_mismatch(t: torch.Tensor, s: torch.Tensor) -> str | None:
    """Why the ZeRO-3 slices of t and s cannot be combined element by element, or None."""
    if is_partitioned(t) != is_partitioned(s):
        return "one is partitioned (ZeRO-3), the other is not"
    if not is_partitioned(t):
        return None
    tt, st = t.ds_tensor, s.ds_tensor
    if t.ds_numel != s.ds_numel or tt.ds_numel != st.ds_numel or t.ds_process_group is not s.ds_process_group:
        return f"partitioned differently ({t.ds_numel}/{tt.ds_numel} vs {s.ds_numel}/{st.ds_numel} elements)"
    if tt.numel() != tt.ds_numel or st.numel() != st.ds_numel:
        return "a partition is not resident (swapped out to NVMe): the EMA needs both slices in memory"
    if getattr(t, "ds_secondary_tensor", None) is not None \
            or getattr(s, "ds_secondary_tensor", None) is not None:
        return "hierarchical partitioning (ZeRO++ hpZ) keeps a second copy the EMA would not update"
    return None


def _local_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """-> the teacher's and the student's local tensors (whole parameters, or ZeRO-3 slices), checked."""
    names, t_params, s_params = _pairs(teacher, student)
    bad = [f"{n}: {why}" for n, t, s in zip(names, t_params, s_params) if (why := _partition_mismatch(t, s))]
    if bad:
        raise ValueError(f"teacher and student cannot be averaged slice by slice: {'; '.join(bad[:3])}")
    return [local_tensor(t) for t in t_params], [local_tensor(s) for s in s_params]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: theta_t <- m * theta_t + (1 - m) * theta_s, over all parameters (names must match),
    on each rank's ZeRO-3 slices when partitioned.

    Student parameters of another dtype (bf16 module, fp32 teacher) are cast by the foreach add.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_loc, s_loc = _local_pairs(teacher, student)
    if momentum == 1.0 or not t_loc:
        return
    if any(t.dtype in (torch.bfloat16, torch.float16) for t in t_loc):
        shadow = _fp32_shadow(teacher, t_loc)
        torch._foreach_mul_(shadow, momentum)
        torch._foreach_add_(shadow, [s.float() for s in s_loc], alpha=1.0 - momentum)
        torch._foreach_copy_(t_loc, shadow)
    else:
        if any(t.dtype != s.dtype for t, s in zip(t_loc, s_loc)):
            s_loc = [s.to(t.dtype) for t, s in zip(t_loc, s_loc)]
        torch._foreach_mul_(t_loc, momentum)
        torch._foreach_add_(t_loc, s_loc, alpha=1.0 - momentum)
    regather(list(teacher.parameters()))


def _fits(shadow: list[torch.Tensor] | None, t_loc: list[torch.Tensor]) -> bool:
    return shadow is not None and len(shadow) == len(t_loc) and all(
        a.shape == b.shape and a.device == b.device for a, b in zip(shadow, t_loc))


def _fp32_shadow(teacher: nn.Module, t_loc: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 copies of the teacher's local tensors, created on first use (or when their layout changed)."""
    shadow = teacher.__dict__.get(_SHADOW)
    if not _fits(shadow, t_loc):
        shadow = [t.detach().float().clone() for t in t_loc]
        teacher.__dict__[_SHADOW] = shadow
    return shadow


def ema_shadow(teacher: nn.Module) -> list[torch.Tensor] | None:
    """The fp32 shadow of a low-precision teacher (one tensor per `teacher.named_parameters()`,
    shaped like its local tensor), or None when the EMA has not needed one."""
    return teacher.__dict__.get(_SHADOW)


def set_ema_shadow(teacher: nn.Module, shadow: list[torch.Tensor]) -> None:
    """Install a shadow (a resumed run's): one fp32 tensor per teacher parameter, shaped like its local
    tensor."""
    t_loc = [local_tensor(p) for p in teacher.parameters()]
    shadow = [s.to(device=t.device, dtype=torch.float32) for s, t in zip(shadow, t_loc)]
    if len(shadow) != len(t_loc) or not _fits(shadow, t_loc):
        raise ValueError("set_ema_shadow: the shadow does not match the teacher's parameters")
    teacher.__dict__[_SHADOW] = shadow


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """m(t) = final - (final - base) * (cos(pi t / T) + 1) / 2: base at t = 0, final at t = T (BYOL, DINO)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    t = min(max(step, 0), total_steps)
    return final - (final - base) * (math.cos(math.pi * t / total_steps) + 1.0) / 2.0


__all__ = ["make_teacher", "teachers", "copy_weights_", "ema_update_", "ema_shadow", "set_ema_shadow",
           "cosine_momentum"]
