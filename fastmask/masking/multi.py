"""ExtreMA's disjoint multi-masking: M masks per image from one shuffle, stacked on the batch dim."""
from __future__ import annotations

import torch

from ..draws import Draws, as_draws
from .base import MaskGenerator, Masks, check_ratio, grid_length, masks_from_shuffle, register_masker


@register_masker("multi")
class MultiMasking(MaskGenerator):
    """forward(batch_size B, grid (h, w) or L, draws | generator) -> Masks for a batch of M*B rows.

    As microsoft/ExtreMA (disjoint sampling, always on there): one noise draw and argsort per image;
    mask k keeps sorted[:, k*n : (k+1)*n] with n = int(L * (1 - mask_ratio)), so the M masks of an
    image keep disjoint patch sets (80% x 5 keeps 39 x 5 = 195 of 196 patches). Row k*B + b is mask
    k of image b: the student batch is the M masked copies concatenated along the batch dimension
    (`imgs.repeat(M, 1, 1, 1)` lines up with it). ids_keep [M*B, n], ids_restore and mask [M*B, L].
    """

    def __init__(self, mask_ratio: float = 0.8, num_masks: int = 5):
        super().__init__()
        self.mask_ratio = check_ratio(mask_ratio, "multi masking")
        if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
            raise ValueError(f"multi masking: num_masks must be an int >= 1, got {num_masks!r}")
        self.num_masks = num_masks

    def num_keep(self, num_patches: int) -> int:
        n = int(num_patches * (1 - self.mask_ratio))
        problems = []
        if n < 1:
            problems.append(f"mask_ratio {self.mask_ratio} keeps no patch of L={num_patches}")
        elif n * self.num_masks > num_patches:
            problems.append(f"{self.num_masks} disjoint masks of {n} visible patches need "
                            f"{n * self.num_masks} patches, the image has L={num_patches}: raise mask_ratio "
                            "or lower num_masks")
        if problems:
            raise ValueError("multi masking: " + "; ".join(problems))
        return n

    def forward(self, batch_size: int, grid: int | tuple[int, int], device: torch.device | str | None = None,
                generator: torch.Generator | None = None, draws: Draws | None = None, **context) -> Masks:
        """draws: for the B images (one shuffle each), not for the M*B rows."""
        L = grid_length(grid)
        if batch_size < 1:
            raise ValueError(f"multi masking: batch_size must be >= 1, got {batch_size}")
        n = self.num_keep(L)
        noise = as_draws(batch_size, draws, generator, device, "multi masking").uniform(L)
        ids_sorted = torch.argsort(noise, dim=1, stable=True)
        # Rolling the shuffle left by k*n puts chunk k first: it becomes mask k's kept set, and every
        # other patch follows as hidden, so MAE's bookkeeping applies per mask unchanged.
        shuffles = torch.stack([torch.roll(ids_sorted, -k * n, dims=1) for k in range(self.num_masks)])
        return masks_from_shuffle(shuffles.reshape(self.num_masks * batch_size, L), n)

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}, num_masks={self.num_masks}"
