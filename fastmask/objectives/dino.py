"""DINO's self-distillation loss: centred, sharpened teacher targets, cross-entropy to the student.

Follows DINO (Caron et al. 2021, `main_dino.py` DINOLoss), as MST uses it:
- teacher probabilities softmax((t - center) / tau_t), detached;
- student log-probabilities log_softmax(s / tau_s);
- cross-entropy summed over the output dimension, averaged over the batch and over every
  (teacher global view, student view) pair except the pairs that are the same view;
- the centre is an EMA (momentum 0.9) of the teacher's batch mean, all-reduced across ranks when
  torch.distributed is initialised, updated after the loss is computed;
- tau_t warms up from `warmup_teacher_temp` to `teacher_temp` over the first `warmup_epochs`
  epochs as DINO's schedule does, one value per epoch: linspace(warmup_teacher_temp, teacher_temp,
  warmup_epochs)[epoch], then teacher_temp (DINO's ViT-S/16 300-epoch run: 0.04 -> 0.07 over 30).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._common import upcast


class DINOLoss(nn.Module):
    """forward(student_views: list of [B, K], teacher_views: list of [B, K], epoch=None) -> fp32 scalar.

    Student view v and teacher view t are the same view when v == t: put the student's outputs
    for the global crops first, in the teacher's order (local crops after them).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_epochs: int = 0, center_momentum: float = 0.9):
        super().__init__()
        problems = []
        if out_dim < 1:
            problems.append(f"out_dim must be >= 1, got {out_dim}")
        if not (student_temp > 0 and teacher_temp > 0 and warmup_teacher_temp > 0):
            problems.append("temperatures must be > 0")
        if not 0.0 <= center_momentum < 1.0:
            problems.append(f"center_momentum must be in [0, 1), got {center_momentum}")
        if warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if problems:
            raise ValueError("DINOLoss: " + "; ".join(problems))
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_epochs = warmup_teacher_temp, int(warmup_epochs)
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp_at(self, epoch: int | None) -> float:
        """tau_t in epoch `epoch` (0-based): DINO's linspace(warmup_teacher_temp, teacher_temp,
        warmup_epochs)[epoch] during the warm-up, teacher_temp after it (and for epoch None)."""
        W = self.warmup_epochs
        if epoch is None or epoch >= W:
            return self.teacher_temp
        frac = epoch / (W - 1) if W > 1 else 0.0  # linspace: the warm-up's last epoch has teacher_temp
        return self.warmup_teacher_temp + frac * (self.teacher_temp - self.warmup_teacher_temp)

    def forward(self, student_views: Sequence[torch.Tensor], teacher_views: Sequence[torch.Tensor],
                epoch: int | None = None) -> torch.Tensor:
        self._check(student_views, teacher_views)
        t_temp = self.teacher_temp_at(epoch)
        teacher = [F.softmax((upcast(t.detach()) - self.center) / t_temp, dim=-1) for t in teacher_views]
        student = [F.log_softmax(upcast(s) / self.student_temp, dim=-1) for s in student_views]
        total, n_terms = 0.0, 0
        for ti, t in enumerate(teacher):
            for si, s in enumerate(student):
                if si == ti:
                    continue
                total = total + torch.sum(-t * s, dim=-1).mean()
                n_terms += 1
        if self.training:
            self.update_center(teacher_views)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_views: Sequence[torch.Tensor]) -> None:
        """center <- m * center + (1 - m) * mean of the raw teacher outputs over views, batch and ranks."""
        t = torch.cat([upcast(v.detach()) for v in teacher_views], dim=0)
        batch_sum = t.sum(dim=0, keepdim=True)
        count = t.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)  # every rank holds the same number of samples (drop_last)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1.0 - self.center_momentum)

    def _check(self, student_views, teacher_views) -> None:
        problems = []
        if len(teacher_views) < 1 or len(student_views) < 1:
            problems.append("need at least one teacher view and one student view")
        elif len(student_views) == 1 and len(teacher_views) == 1:
            problems.append("one student view and one teacher view are the same view: no pair is left")
        K = self.center.shape[1]
        for name, views in (("student", student_views), ("teacher", teacher_views)):
            for i, v in enumerate(views):
                if v.dim() != 2 or v.shape[1] != K:
                    problems.append(f"{name} view {i} must be [B, {K}], got {tuple(v.shape)}")
        if problems:
            raise ValueError("DINOLoss: " + "; ".join(problems))

    def extra_repr(self) -> str:
        return (f"out_dim={self.center.shape[1]}, student_temp={self.student_temp}, "
                f"teacher_temp={self.warmup_teacher_temp}->{self.teacher_temp} "
                f"over {self.warmup_epochs} epochs, "
                f"center_momentum={self.center_momentum}")


__all__ = ["DINOLoss"]
