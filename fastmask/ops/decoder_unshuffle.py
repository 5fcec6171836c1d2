"""decoder_unshuffle: MAE's decoder input in one pass (unshuffle with mask tokens, cls row, position
embedding)."""
from __future__ import annotations

import torch

from . import reference
from ._checks import ALL_DEVICES, TORCH_DTYPES, check_index, check_index_values, fail_if
from .backends import Backend, register, select

register(Backend(op="decoder_unshuffle", name="torch", fn=reference.decoder_unshuffle, devices=ALL_DEVICES,
                 dtypes=TORCH_DTYPES, key_input="x"))


def check_decoder_unshuffle(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                            pos_embed: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[1] < 1:
        fail_if("decoder_unshuffle", [f"x must be [B, 1+K, D] (cls first), got shape {tuple(x.shape)}"])
    B, K1, D = x.shape
    problems = check_index("ids_restore", ids_restore, B, x)
    L = ids_restore.shape[1] if ids_restore.dim() == 2 else -1
    if not problems and L < K1 - 1:
        problems.append(f"ids_restore has L={L} places for K={K1 - 1} visible tokens")
    if mask_token.numel() != D:
        problems.append(f"mask_token must have D={D} elements, got shape {tuple(mask_token.shape)}")
    if pos_embed.numel() != (L + 1) * D or pos_embed.shape[-1] != D:
        problems.append(f"pos_embed must be [1+L, D] = {(L + 1, D)} (or [1, 1+L, D]), got "
                        f"{tuple(pos_embed.shape)}")
    for name, t in (("mask_token", mask_token), ("pos_embed", pos_embed)):
        if t.device != x.device:
            problems.append(f"{name} is on {t.device}, x on {x.device}")
    fail_if("decoder_unshuffle", problems)
    check_index_values("decoder_unshuffle", "ids_restore", ids_restore, L, permutation=True)


def decoder_unshuffle(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                      pos_embed: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [B, 1+K, D] (cls token, then the K visible tokens in the encoder's order), ids_restore [B, L] int64,
    mask_token [D], pos_embed [1+L, D] (or [1, 1+L, D]) -> [B, 1+L, D].

    Row 0 is x's cls token, row 1+i the visible token that came from patch i or mask_token where patch i
    is hidden (mask convention 1 = hidden), each plus its row of pos_embed: MAE's decoder input. The
    output dtype is the promoted dtype of x, mask_token and pos_embed, so under autocast (bf16 x, fp32
    parameters) the decoder's residual stream is fp32, as in the official code. One pass on the fused
    backends, where the official code makes three (cat + gather, cat, add). Each ids_restore row must be
    a permutation of 0..L-1 (checked when FASTMASK_CHECK=1). Differentiable with respect to x,
    mask_token and pos_embed.

    Equivalent PyTorch: `fastmask.ops.reference.decoder_unshuffle`.
    """
    check_decoder_unshuffle(x, ids_restore, mask_token, pos_embed)
    pos = pos_embed.reshape(-1, x.shape[-1])
    impl = select("decoder_unshuffle", backend, x=x, ids_restore=ids_restore, mask_token=mask_token,
                  pos_embed=pos)
    return impl.fn(x, ids_restore, mask_token.reshape(-1), pos)
