"""patch_gather: patchify an image batch and keep only the visible patches, in one op."""
from __future__ import annotations

import torch

from . import reference
from ._checks import ALL_DEVICES, TORCH_DTYPES, check_images, check_index, check_index_values, fail_if
from .backends import CUDA_FIRST, CUDA_FIRST_RULE, Backend, register, select, set_priority

register(Backend(op="patch_gather", name="torch", fn=reference.patch_gather, devices=ALL_DEVICES,
                 dtypes=TORCH_DTYPES, key_input="imgs"))
set_priority("patch_gather", CUDA_FIRST, CUDA_FIRST_RULE)


def check_patch_gather(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> None:
    problems = check_images(imgs, patch_size)
    if not problems:
        problems = check_index("ids_keep", ids_keep, imgs.shape[0], imgs)
        L = (imgs.shape[-2] // patch_size) * (imgs.shape[-1] // patch_size)
        if not problems and not 1 <= ids_keep.shape[1] <= L:
            problems.append(f"ids_keep keeps {ids_keep.shape[1]} patches, must be in [1, L={L}]")
    fail_if("patch_gather", problems)
    check_index_values("patch_gather", "ids_keep", ids_keep, L, permutation=False)


def patch_gather(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                 backend: str = "auto") -> torch.Tensor:
    """imgs [B, C, H, W] fp32|bf16|fp16, ids_keep [B, K] int64 -> [B, K, p*p*C] (same dtype).

    Patchify in MAE's (p, q, c) order and take the K kept patches in ids_keep's order, without
    materializing all L patches on the fused backends. Differentiable with respect to imgs.
    The entries of each ids_keep row must be distinct (every mask generator guarantees it; the fused
    backwards rely on it; checked when FASTMASK_CHECK=1, off by default since it syncs with the host).

    Equivalent PyTorch: `fastmask.ops.reference.patch_gather`.
    """
    check_patch_gather(imgs, ids_keep, patch_size)
    impl = select("patch_gather", backend, imgs=imgs, ids_keep=ids_keep, patch_size=patch_size)
    return impl.fn(imgs, ids_keep, patch_size)
