"""MAE's random masking: per-sample uniform noise, argsort, keep the smallest."""
from __future__ import annotations

import torch

from ..draws import Draws, as_draws
from .base import MaskGenerator, Masks, check_ratio, grid_length, masks_from_shuffle, register_masker


@register_masker("random")
class RandomMasking(MaskGenerator):
    """forward(batch_size B, grid (h, w) or L, draws | generator, noise=None) -> Masks with
    K = int(L * (1 - mask_ratio)).

    As facebookresearch/mae `random_masking`: noise ~ U[0, 1)^[B, L], ids_shuffle = argsort(noise)
    (ascending: the smallest are kept), ids_keep = ids_shuffle[:, :K], so the visible tokens are in
    random order; ids_restore = argsort(ids_shuffle); mask 1 = hidden, in image order.
    """

    def __init__(self, mask_ratio: float = 0.75):
        super().__init__()
        self.mask_ratio = check_ratio(mask_ratio, "random masking")

    def num_keep(self, num_patches: int) -> int:
        """K = int(L * (1 - mask_ratio)) (49 of 196 at 0.75); ValueError when that keeps no patch."""
        k = int(num_patches * (1 - self.mask_ratio))
        if k < 1:
            raise ValueError(f"random masking: mask_ratio {self.mask_ratio} keeps no patch of "
                             f"L={num_patches} (int(L * (1 - r)) = 0); lower the ratio or use more patches")
        return k

    def forward(self, batch_size: int, grid: int | tuple[int, int], device: torch.device | str | None = None,
                generator: torch.Generator | None = None, draws: Draws | None = None,
                noise: torch.Tensor | None = None, **context) -> Masks:
        """noise [B, L] (optional, as HF ViTMAE's `noise`): use it instead of drawing."""
        L = grid_length(grid)
        if batch_size < 1 or L < 1:
            raise ValueError(f"random masking: batch_size and L must be >= 1, got {batch_size}, {L}")
        len_keep = self.num_keep(L)
        if noise is None:
            noise = as_draws(batch_size, draws, generator, device, "random masking").uniform(L)
        elif tuple(noise.shape) != (batch_size, L):
            raise ValueError(f"random masking: noise must be [B, L] = {(batch_size, L)}, got "
                             f"{tuple(noise.shape)}")
        return masks_from_shuffle(torch.argsort(noise, dim=1, stable=True), len_keep)

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}"
