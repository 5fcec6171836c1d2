"""BEiT-style block-wise masking with an exact number of hidden patches, vectorised over the batch."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..draws import Draws, as_draws
from .base import MaskGenerator, Masks, check_ratio, masks_from_shuffle, register_masker


@register_masker("block")
class BlockMasking(MaskGenerator):
    """forward(batch_size B, grid (h, w), draws | generator) -> Masks, exactly L - K hidden per sample,
    K = int(L * (1 - mask_ratio)) (the same K as random masking at the same ratio).

    BEiT's MaskingGenerator (microsoft/unilm beit/masking_generator.py), run for the whole batch at
    once instead of per image in the data workers: each of `rounds` rounds draws one rectangle per
    sample, area ~ U[min_num_patches, remaining], aspect ratio log-uniform in
    [min_aspect, 1/min_aspect], position uniform, and accepts it when it adds between 1 and
    `remaining` new hidden patches (BEiT's test). BEiT stops short of the target when no block fits;
    here the shortfall is then filled with visible patches that touch the hidden region first
    (random among them), so the count is exact and the mask stays contiguous-ish.
    Visible tokens come out in random order, as MAE.
    """

    def __init__(self, mask_ratio: float = 0.4, min_num_patches: int = 16, max_num_patches: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None, rounds: int = 40):
        super().__init__()
        self.mask_ratio = check_ratio(mask_ratio, "block masking")
        problems = []
        if min_num_patches < 1:
            problems.append(f"min_num_patches must be >= 1, got {min_num_patches}")
        if max_num_patches is not None and max_num_patches < min_num_patches:
            problems.append(f"max_num_patches {max_num_patches} < min_num_patches {min_num_patches}")
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        if not 0 < min_aspect <= max_aspect:
            problems.append(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        if rounds < 1:
            problems.append(f"rounds must be >= 1, got {rounds}")
        if problems:
            raise ValueError("block masking: " + "; ".join(problems))
        self.min_num_patches, self.max_num_patches, self.rounds = min_num_patches, max_num_patches, rounds
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def forward(self, batch_size: int, grid: int | tuple[int, int], device: torch.device | str | None = None,
                generator: torch.Generator | None = None, draws: Draws | None = None, **context) -> Masks:
        if isinstance(grid, int):
            raise ValueError("block masking needs the 2-D patch grid (h, w), got a length")
        H, W = int(grid[0]), int(grid[1])
        L = H * W
        K = int(L * (1 - self.mask_ratio))
        if batch_size < 1 or K < 1 or K >= L:
            raise ValueError(f"block masking: batch_size {batch_size}, mask_ratio {self.mask_ratio} on L={L} "
                             f"keeps K={K} patches; need B >= 1 and 1 <= K < L")
        d = as_draws(batch_size, draws, generator, device, "block masking")
        device = d.device
        B, target = batch_size, L - K
        cap = self.max_num_patches or target

        def rand(*shape):  # shape[0] is always B: one keyed row per sample
            return d.uniform(*shape[1:])

        rows = torch.arange(H, device=device).view(1, H, 1)
        cols = torch.arange(W, device=device).view(1, 1, W)
        mask = torch.zeros(B, H, W, dtype=torch.bool, device=device)
        remaining = torch.full((B,), target, device=device)
        for _ in range(self.rounds):
            upper = remaining.clamp(max=cap).float()
            area = self.min_num_patches + (upper - self.min_num_patches) * rand(B)
            aspect = torch.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * rand(B))
            h = torch.round(torch.sqrt(area * aspect)).long()
            w = torch.round(torch.sqrt(area / aspect)).long()
            fits = (h >= 1) & (w >= 1) & (h < H) & (w < W)
            top = (rand(B) * (H - h + 1).clamp(min=1)).long()
            left = (rand(B) * (W - w + 1).clamp(min=1)).long()
            block = ((rows >= top.view(B, 1, 1)) & (rows < (top + h).view(B, 1, 1))
                     & (cols >= left.view(B, 1, 1)) & (cols < (left + w).view(B, 1, 1)))
            new = (block & ~mask).flatten(1).sum(1)
            accept = fits & (new > 0) & (new <= remaining)
            mask |= block & accept.view(B, 1, 1)
            remaining = remaining - new * accept
        mask = mask.flatten(1)
        # Exact count: fill the shortfall, preferring visible patches next to hidden ones.
        touching = F.max_pool2d(mask.view(B, 1, H, W).float(), 3, stride=1, padding=1).flatten(1) > 0
        key = rand(B, L) + (~touching).float() + 2.0 * mask.float()
        rank = torch.argsort(torch.argsort(key, dim=1, stable=True), dim=1, stable=True)
        mask = mask | (rank < remaining.view(B, 1))
        # Visible first, in random order; hidden after.
        ids_shuffle = torch.argsort(rand(B, L) + 2.0 * mask.float(), dim=1, stable=True)
        return masks_from_shuffle(ids_shuffle, K)

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, min_num_patches={self.min_num_patches}, "
                f"max_num_patches={self.max_num_patches}, rounds={self.rounds}")
