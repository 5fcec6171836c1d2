"""Pixel reconstruction objective (MAE): the normalized-pixel loss over hidden patches, as a pure module."""
from __future__ import annotations

import torch

from ..ops import reference
from ..ops.nn import NormPixLoss


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
