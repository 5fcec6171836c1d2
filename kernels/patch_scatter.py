"""Triton kernels for patch_scatter: MAE's decoder unshuffle with mask tokens, and its backward.

Layouts. tokens [B, K, D] (visible tokens in shuffled order, any strides), ids_restore [B, L],
out [B, L, D] contiguous: out[b, l] = tokens[b, ids_restore[b, l]] when ids_restore[b, l] < K, else the
mask token. One pass writes every output row; nothing is concatenated first.

Backward. ids_restore is a permutation of [0, L) in every row (the mask generators' contract), so each
visible token receives exactly one output row's gradient: a plain copy, no atomics. The mask token's
gradient is the sum over all hidden rows of all images; each program owns one image and one slice of D,
sums its hidden rows in fp32 and writes a [B, D] partial that torch reduces over B. That keeps the
result deterministic (no atomic adds) at the cost of a B*D*4-byte buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, new_output, next_pow2


@triton.jit
def _patch_scatter_fwd_kernel(
    tok_ptr, ids_ptr, mtok_ptr, out_ptr,
    n_rows, L, K, D,
    s_tb, s_tk, s_td, s_xb, s_xl, s_m,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    d_ok = d < D
    rows64 = rows.to(tl.int64)
    b = rows64 // L
    l = rows64 % L
    src = tl.load(ids_ptr + b * s_xb + l * s_xl, mask=row_ok, other=0).to(tl.int64)
    vis = src < K
    x = tl.load(tok_ptr + (b * s_tb + src * s_tk)[:, None] + d[None, :] * s_td,
                mask=(row_ok & vis)[:, None] & d_ok[None, :], other=0.0)
    m = tl.load(mtok_ptr + d * s_m, mask=d_ok, other=0.0)
    y = tl.where(vis[:, None], x, m[None, :])
    tl.store(out_ptr + rows64[:, None] * D + d[None, :], y.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _patch_scatter_bwd_kernel(
    gout_ptr, ids_ptr, gtok_ptr, gmask_part_ptr,
    L, K, D,
    s_gb, s_gl, s_gd, s_xb, s_xl,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_R):
        l = l0 + tl.arange(0, BLOCK_R)
        l_ok = l < L
        src = tl.load(ids_ptr + b * s_xb + l * s_xl, mask=l_ok, other=0).to(tl.int64)
        ok = l_ok[:, None] & d_ok[None, :]
        g = tl.load(gout_ptr + b * s_gb + l[:, None] * s_gl + d[None, :] * s_gd, mask=ok, other=0.0)
        vis = src < K
        tl.store(gtok_ptr + (b * K + src)[:, None] * D + d[None, :], g, mask=ok & vis[:, None])
        acc += tl.sum(tl.where(vis[:, None], 0.0, g.to(tl.float32)), axis=0)
    tl.store(gmask_part_ptr + b * D + d, acc, mask=d_ok)


def _blocks(D: int) -> tuple[int, int]:
    if interpreting():
        return 4, min(next_pow2(D), 16)
    bd = min(next_pow2(D), 256)
    return max(1, 4096 // bd), bd


def patch_scatter_fwd(tokens: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor
                      ) -> torch.Tensor:
    """tokens [B, K, D], ids_restore [B, L] int32|int64, mask_token [D] -> [B, L, D] (tokens' dtype)."""
    B, K, D = tokens.shape
    L = ids_restore.shape[1]
    out = new_output((B, L, D), tokens.dtype, tokens.device)
    # Cast the D-element mask token on the host side of the kernel: the same rounding as the reference.
    mask_token = mask_token.to(tokens.dtype)
    br, bd = _blocks(D)
    grid = (triton.cdiv(B * L, br), triton.cdiv(D, bd))
    _patch_scatter_fwd_kernel[grid](
        tokens, ids_restore, mask_token, out, B * L, L, K, D,
        *tokens.stride(), *ids_restore.stride(), mask_token.stride(0), BLOCK_R=br, BLOCK_D=bd)
    return out


def patch_scatter_bwd(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """grad [B, L, D], ids_restore [B, L] -> (grad_tokens [B, K, D] grad's dtype, grad_mask [D] fp32)."""
    B, L, D = grad.shape
    K = num_visible
    gtok = new_output((B, K, D), grad.dtype, grad.device)
    part = new_output((B, D), torch.float32, grad.device)
    br, bd = _blocks(D)
    if not interpreting():
        br = max(1, min(br, 32))  # rows per loop step: each program walks all L rows of its image
    grid = (B, triton.cdiv(D, bd))
    _patch_scatter_bwd_kernel[grid](
        grad, ids_restore, gtok, part, L, K, D, *grad.stride(), *ids_restore.stride(),
        BLOCK_R=br, BLOCK_D=bd)
    return gtok, part.sum(0)
