"""Triton kernels for MAE's decoder unshuffle with mask tokens (patch_scatter), optionally with the cls
row and the position embedding in the same pass (decoder_unshuffle), and their backward.

Layouts. tokens [B, CLS + K, D] (the cls token first when CLS, then the visible tokens in shuffled
order; any strides), ids_restore [B, L], pos [CLS + L, D] (any strides), out [B, CLS + L, D] contiguous:

    out[b, 0]       = tokens[b, 0] (+ pos[0])                                    (cls row, when CLS)
    out[b, CLS + l] = (tokens[b, CLS + r] if r < K else mask_token) (+ pos[CLS + l]),  r = ids_restore[b, l]

One pass writes every output row; nothing is concatenated first. The sum is formed in fp32 and rounded
once to the output's dtype, which the caller picks: the tokens' dtype for patch_scatter, the promoted
dtype of tokens, mask token and pos for decoder_unshuffle (fp32 under autocast: the official code
concatenates bf16 tokens with the fp32 mask token and adds the fp32 position embedding, so its decoder's
residual stream is fp32). Where the output is fp32 the result is bit-identical to the official order.

Backward. ids_restore is a permutation of [0, L) in every row (the mask generators' contract, checked
when FASTMASK_CHECK=1), so each visible token receives exactly one output row's gradient: a plain copy
(cast to the tokens' dtype), no atomics. The mask token's gradient is the sum over all hidden rows of
all images; each program owns one image and one slice of D, sums its hidden rows in fp32 and writes a
[B, D] partial that torch reduces over B: deterministic (no atomic adds) at the cost of B*D*4 bytes.
The position embedding's gradient (a sum over the batch) is torch's, and only when it is trainable
(MAE's is a fixed sin-cos buffer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, new_output, next_pow2


@triton.jit
def _patch_scatter_fwd_kernel(
    tok_ptr, ids_ptr, mtok_ptr, pos_ptr, out_ptr,
    n_rows, L_OUT, K, D,
    s_tb, s_tk, s_td, s_xb, s_xl, s_m, s_pl, s_pd,
    CLS: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    d_ok = d < D
    rows64 = rows.to(tl.int64)
    b = rows64 // L_OUT
    j = rows64 % L_OUT  # output row: the cls row is j = 0 when CLS
    is_patch = j >= CLS
    src = tl.load(ids_ptr + b * s_xb + (j - CLS) * s_xl, mask=row_ok & is_patch, other=0).to(tl.int64)
    vis = (src < K) | (j < CLS)
    t_row = tl.where(is_patch, src + CLS, 0)
    x = tl.load(tok_ptr + (b * s_tb + t_row * s_tk)[:, None] + d[None, :] * s_td,
                mask=(row_ok & vis)[:, None] & d_ok[None, :], other=0.0)
    m = tl.load(mtok_ptr + d * s_m, mask=d_ok, other=0.0)
    y = tl.where(vis[:, None], x.to(tl.float32), m.to(tl.float32)[None, :])
    ok = row_ok[:, None] & d_ok[None, :]
    if HAS_POS:
        y += tl.load(pos_ptr + j[:, None] * s_pl + d[None, :] * s_pd, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * D + d[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _patch_scatter_bwd_kernel(
    gout_ptr, ids_ptr, gtok_ptr, gmask_part_ptr,
    L, K, D,
    s_gb, s_gl, s_gd, s_xb, s_xl,
    CLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    gtok_b = gtok_ptr + b * (CLS + K) * D
    if CLS:
        g0 = tl.load(gout_ptr + b * s_gb + d * s_gd, mask=d_ok, other=0.0)
        tl.store(gtok_b + d, g0.to(gtok_ptr.dtype.element_ty), mask=d_ok)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_R):
        l = l0 + tl.arange(0, BLOCK_R)
        l_ok = l < L
        src = tl.load(ids_ptr + b * s_xb + l * s_xl, mask=l_ok, other=0).to(tl.int64)
        ok = l_ok[:, None] & d_ok[None, :]
        g = tl.load(gout_ptr + b * s_gb + (l + CLS)[:, None] * s_gl + d[None, :] * s_gd, mask=ok, other=0.0)
        vis = src < K
        tl.store(gtok_b + (CLS + src)[:, None] * D + d[None, :], g.to(gtok_ptr.dtype.element_ty),
                 mask=ok & vis[:, None])
        acc += tl.sum(tl.where(vis[:, None], 0.0, g.to(tl.float32)), axis=0)
    tl.store(gmask_part_ptr + b * D + d, acc, mask=d_ok)


def _blocks(D: int) -> tuple[int, int]:
    if interpreting():
        return 4, min(next_pow2(D), 16)
    bd = min(next_pow2(D), 256)
    return max(1, 4096 // bd), bd


def patch_scatter_fwd(tokens: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                      pos: torch.Tensor | None = None, cls: bool = False,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """tokens [B, cls + K, D], ids_restore [B, L] int32|int64, mask_token [D], pos [cls + L, D] or None
    -> [B, cls + L, D] in out_dtype (default tokens' dtype)."""
    B, KT, D = tokens.shape
    L = ids_restore.shape[1]
    c = int(cls)
    out = new_output((B, c + L, D), out_dtype or tokens.dtype, tokens.device)
    br, bd = _blocks(D)
    grid = (triton.cdiv(B * (c + L), br), triton.cdiv(D, bd))
    _patch_scatter_fwd_kernel[grid](
        tokens, ids_restore, mask_token, pos if pos is not None else mask_token, out,
        B * (c + L), c + L, KT - c, D, *tokens.stride(), *ids_restore.stride(), mask_token.stride(0),
        *(pos.stride() if pos is not None else (0, 0)), CLS=c, HAS_POS=pos is not None, BLOCK_R=br,
        BLOCK_D=bd)
    return out


def patch_scatter_bwd(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int, cls: bool = False,
                      tok_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """grad [B, cls + L, D], ids_restore [B, L] -> (grad_tokens [B, cls + K, D] in tok_dtype (default
    grad's), grad_mask [D] fp32)."""
    B, _, D = grad.shape
    L = ids_restore.shape[1]
    K, c = num_visible, int(cls)
    gtok = new_output((B, c + K, D), tok_dtype or grad.dtype, grad.device)
    part = new_output((B, D), torch.float32, grad.device)
    br, bd = _blocks(D)
    if not interpreting():
        br = max(1, min(br, 32))  # rows per loop step: each program walks all L rows of its image
    _patch_scatter_bwd_kernel[(B, triton.cdiv(D, bd))](
        grad, ids_restore, gtok, part, L, K, D, *grad.stride(), *ids_restore.stride(),
        CLS=c, BLOCK_R=br, BLOCK_D=bd)
    return gtok, part.sum(0)
