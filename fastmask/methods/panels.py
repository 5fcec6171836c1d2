"""Pictures of what a method does, for the methods' `visualize(imgs)` hooks (`fastmask visualize`).

A panel is either an image batch [B, 3, H, W], ImageNet-normalized like the method's input, or a
map [B, 1, H, W] with values in [0, 1] (masks: 1 = hidden). Patch-level quantities [B, L] become
maps by repeating each value over its patch.

    patch_map(mask, grid, p)                      # [B, L] -> [B, 1, H, W]
    hide_patches(imgs, mask, p)                   # hidden patches drawn mid-grey
    reconstruction_panels(imgs, mask, pred, p, norm_pix)   # MAE-style: masked / reconstruction / pasted
"""
from __future__ import annotations

import torch

from ..ops import reference
from .views import IMAGENET_MEAN, IMAGENET_STD


def patch_map(values: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """values [B, L] (L = h*w, row-major) -> [B, 1, h*p, w*p] fp32: each patch filled with its value."""
    h, w = grid
    x = values.float().reshape(values.shape[0], 1, h, w)
    return x.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def rescale(values: torch.Tensor) -> torch.Tensor:
    """values [B, ...] -> per-sample min-max scaled to [0, 1] (a constant sample becomes 0)."""
    flat = values.float().flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(values.shape)


def _grey(imgs: torch.Tensor) -> torch.Tensor:
    """The normalized value of mid-grey (0.5 in every channel) as [1, 3, 1, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device)
    std = torch.tensor(IMAGENET_STD, device=imgs.device)
    return ((0.5 - mean) / std).view(1, 3, 1, 1).to(imgs.dtype)


def hide_patches(imgs: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs [B, 3, H, W] normalized, mask [B, L] (1 = hidden) -> imgs with hidden patches mid-grey."""
    grid = (imgs.shape[-2] // patch_size, imgs.shape[-1] // patch_size)
    m = patch_map(mask, grid, patch_size).to(imgs.dtype)
    return imgs * (1 - m) + _grey(imgs) * m


def reconstruction_panels(imgs: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, patch_size: int,
                          norm_pix: bool) -> dict[str, torch.Tensor]:
    """imgs [B, C, H, W] normalized, mask [B, L] (1 = hidden), pred [B, L, p*p*C] (a pixel decoder's
    output) -> {"masked", "reconstruction", "recon + visible"}, each [B, C, H, W] normalized.

    With norm_pix the decoder predicts per-patch normalized pixels; each predicted patch is mapped
    back with the mean and (unbiased) variance of the true patch, eps 1e-6, as the MAE demo does.
    """
    p, C = patch_size, imgs.shape[1]
    grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
    target = reference.patchify(imgs.float(), p)                       # [B, L, p*p*C]
    pred = pred.float()
    if norm_pix:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    m = mask.float().unsqueeze(-1)
    return {"masked": hide_patches(imgs.float(), mask, p),
            "reconstruction": reference.unpatchify(pred, p, C, grid),
            "recon + visible": reference.unpatchify(target * (1 - m) + pred * m, p, C, grid)}


__all__ = ["patch_map", "rescale", "hide_patches", "reconstruction_panels"]
