"""Reconstruction objectives: MAE's normalized-pixel loss over hidden patches (a pure module) and
R-MAE's relaxed form, the decoder's reconstruction distance between two branches (a pure function)."""
from __future__ import annotations

import torch

from ..ops import reference
from ..ops.nn import NormPixLoss
from ._common import upcast


class PixelReconstruction(NormPixLoss):
    """forward(pred [B, L, p*p*C], imgs [B, C, H, W], mask [B, L] (1 = hidden)) -> scalar fp32.

    MAE's loss: each patch's target is normalized by its own mean and unbiased variance (eps 1e-6)
    when `norm_pix`, squared error averaged over the patch, then over hidden patches only. Runs
    through `fastmask.ops.norm_pix_loss` (the fused backends never materialize the target).
    `target(imgs)` gives the target itself, for visualizing predictions.

    Equivalent PyTorch: `fastmask.ops.reference.norm_pix_loss`.
    """

    def target(self, imgs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """imgs [B, C, H, W] -> target patches [B, L, p*p*C] fp32 (normalized per patch when norm_pix)."""
        t = reference.patchify(imgs, self.patch_size).float()
        if self.norm_pix:
            t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + eps) ** 0.5
        return t


def relaxed_reconstruction(pred_masked: torch.Tensor, pred_full: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
    """pred_masked [B, L, P] (the decoder's output from the visible patches), pred_full [B, L, P] (its
    output from the full image), mask [B, L] (1 = hidden) -> scalar fp32.

    RelaxMIM's relaxed MAE term: MAE's loss with the pixel target replaced by the full branch's
    reconstruction g(f(x)), averaged as MAE averages (over the patch vector, then over hidden patches):
    sum_i mask_i * mean_P (pred_masked_i - pred_full_i)^2 / sum_i mask_i. Gradients flow into both
    arguments: pass `pred_full.detach()` for a stop-gradient target.
    """
    if pred_masked.dim() != 3 or pred_full.shape != pred_masked.shape or mask.shape != pred_masked.shape[:2]:
        raise ValueError("relaxed_reconstruction: pred_masked and pred_full must both be [B, L, P] and mask "
                         f"[B, L], got {tuple(pred_masked.shape)}, {tuple(pred_full.shape)}, "
                         f"{tuple(mask.shape)}")
    err = (upcast(pred_masked) - upcast(pred_full)).square().mean(dim=-1)
    mask = mask.to(err.dtype)
    return (err * mask).sum() / mask.sum()
