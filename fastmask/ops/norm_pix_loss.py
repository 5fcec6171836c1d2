"""norm_pix_loss: MAE's per-patch normalized pixel reconstruction loss over hidden patches."""
from __future__ import annotations

import torch

from . import reference
from ._checks import ALL_DEVICES, TORCH_DTYPES, check_images, fail_if
from .backends import CUDA_FIRST, CUDA_FIRST_RULE, Backend, register, select, set_priority

register(Backend(op="norm_pix_loss", name="torch", fn=reference.norm_pix_loss, devices=ALL_DEVICES,
                 dtypes=TORCH_DTYPES, key_input="pred"))
set_priority("norm_pix_loss", CUDA_FIRST, CUDA_FIRST_RULE)


def check_norm_pix_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int) -> None:
    problems = check_images(imgs, patch_size)
    if not problems:
        B, C, H, W = imgs.shape
        L, D = (H // patch_size) * (W // patch_size), patch_size * patch_size * C
        if tuple(pred.shape) != (B, L, D):
            problems.append(f"pred must be [B, L, p*p*C] = {(B, L, D)}, got {tuple(pred.shape)}")
        if tuple(mask.shape) != (B, L):
            problems.append(f"mask must be [B, L] = {(B, L)}, got {tuple(mask.shape)}")
        if pred.device != imgs.device or mask.device != imgs.device:
            problems.append(f"pred, imgs, mask must share a device, got {pred.device}, {imgs.device}, "
                            f"{mask.device}")
    fail_if("norm_pix_loss", problems)


def norm_pix_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                  norm_pix: bool = True, backend: str = "auto") -> torch.Tensor:
    """pred [B, L, p*p*C] fp32|bf16|fp16, imgs [B, C, H, W], mask [B, L] (1 = hidden) -> scalar fp32.

    Per-patch target (t - mean) / sqrt(unbiased var + 1e-6) when norm_pix, squared error averaged
    over the patch, then over hidden patches. The fused backends never materialize the target.
    Differentiable with respect to pred.

    Equivalent PyTorch: `fastmask.ops.reference.norm_pix_loss`.
    """
    check_norm_pix_loss(pred, imgs, mask, patch_size)
    impl = select("norm_pix_loss", backend, pred=pred, imgs=imgs, mask=mask, patch_size=patch_size,
                  norm_pix=norm_pix)
    return impl.fn(pred, imgs, mask, patch_size, norm_pix)
