"""Cosine-similarity objectives of the siamese methods: BYOL and SimSiam.

Both are pure functions of an online prediction `p` and a target `z`; the target is always
detached here (stop-gradient is part of the loss's definition in both papers), so callers pass
the raw teacher/other-branch output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import upcast


def _check_pair(p: torch.Tensor, z: torch.Tensor, name: str) -> None:
    problems = []
    if p.dim() != 2 or z.dim() != 2:
        problems.append(f"p and z must be [B, d], got {tuple(p.shape)} and {tuple(z.shape)}")
    elif p.shape != z.shape:
        problems.append(f"p {tuple(p.shape)} and z {tuple(z.shape)} differ in shape")
    if p.shape[0:1] == (0,):
        problems.append("empty batch")
    if problems:
        raise ValueError(f"{name}: " + "; ".join(problems))


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """p [B, d], z [B, d] any float dtype -> fp32 scalar: mean_b (2 - 2 cos(p_b, sg(z_b))).

    Equals the mean squared distance of the l2-normalized vectors ||p^ - z^||^2 (BYOL, ExtreMA).
    Range [0, 4]; 0 when p and z point the same way. Not symmetrised: callers that want BYOL's
    symmetric form add the loss with the views swapped.
    """
    _check_pair(p, z, "byol_loss")
    cos = F.cosine_similarity(upcast(p), upcast(z.detach()), dim=-1, eps=1e-8)
    return (2.0 - 2.0 * cos).mean()


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """p [B, d], z [B, d] -> fp32 scalar: -mean_b cos(p_b, sg(z_b)) (SimSiam's D); range [-1, 1]."""
    _check_pair(p, z, "simsiam_loss")
    return -F.cosine_similarity(upcast(p), upcast(z.detach()), dim=-1, eps=1e-8).mean()


__all__ = ["byol_loss", "simsiam_loss"]
