"""patch_scatter: MAE's decoder unshuffle, visible tokens back in image order with mask tokens between."""
from __future__ import annotations

import torch

from . import reference
from ._checks import ALL_DEVICES, TORCH_DTYPES, check_index, check_index_values, fail_if
from .backends import Backend, register, select

register(Backend(op="patch_scatter", name="torch", fn=reference.patch_scatter, devices=ALL_DEVICES,
                 dtypes=TORCH_DTYPES, key_input="tokens"))


def check_patch_scatter(tokens: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> None:
    if tokens.dim() != 3:
        fail_if("patch_scatter", [f"tokens must be [B, K, D], got shape {tuple(tokens.shape)}"])
    B, K, D = tokens.shape
    problems = check_index("ids_restore", ids_restore, B, tokens)
    if not problems and ids_restore.shape[1] < K:
        problems.append(f"ids_restore has L={ids_restore.shape[1]} places for K={K} visible tokens")
    if mask_token.numel() != D:
        problems.append(f"mask_token must have D={D} elements, got shape {tuple(mask_token.shape)}")
    if mask_token.device != tokens.device:
        problems.append(f"mask_token is on {mask_token.device}, tokens on {tokens.device}")
    fail_if("patch_scatter", problems)
    check_index_values("patch_scatter", "ids_restore", ids_restore, ids_restore.shape[1], permutation=True)


def patch_scatter(tokens: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                  backend: str = "auto") -> torch.Tensor:
    """tokens [B, K, D], ids_restore [B, L] int64, mask_token [D] (any shape with D elements) -> [B, L, D].

    Output row i is the visible token that came from patch i, or mask_token where patch i is hidden
    (mask convention 1 = hidden). Differentiable with respect to tokens and mask_token.
    Each ids_restore row must be a permutation of 0..L-1 (checked when FASTMASK_CHECK=1, off by default
    since it syncs with the host).

    Equivalent PyTorch: `fastmask.ops.reference.patch_scatter`.
    """
    check_patch_scatter(tokens, ids_restore, mask_token)
    impl = select("patch_scatter", backend, tokens=tokens, ids_restore=ids_restore, mask_token=mask_token)
    return impl.fn(tokens, ids_restore, mask_token.reshape(-1))
