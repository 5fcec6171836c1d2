"""Triton kernels for patch_gather: patchify + keep the visible patches, and its backward.

Layouts. imgs [B, C, H, W] with any strides (NCHW or channels-last); patches [B, K, P] contiguous with
P = p*p*C in MAE's (p, q, c) order. Patch index l = ids_keep[b, k] sits at grid cell divmod(l, w).
Programs walk patches in image order (rows of p pixels per channel, see _patch_layout.py), with C and p
compile-time constants.

Forward reads only the K kept patches of each image and writes [B, K, P] once: no [B, L, P]
intermediate. Backward writes every element of the image gradient exactly once (the gradient of a kept
patch, zero elsewhere) from an inverse index inv[b, l] = k or -1, so no memset pass and no atomics;
this assumes the entries of each ids_keep row are distinct, which every mask generator guarantees
(checked when FASTMASK_CHECK=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, new_output
from ._patch_layout import patch_offsets, patch_tile


@triton.jit
def _patch_gather_fwd_kernel(
    imgs_ptr, ids_ptr, out_ptr,
    n_rows, K, w,
    s_ib, s_ic, s_ih, s_iw, s_xb, s_xk,
    C: tl.constexpr, p: tl.constexpr, PI: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CR: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cr = tl.program_id(1) * BLOCK_CR + tl.arange(0, BLOCK_CR)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    b = rows64 // K
    k = rows64 % K
    l = tl.load(ids_ptr + b * s_xb + k * s_xk, mask=row_ok, other=0).to(tl.int64)
    src, dst, e_ok = patch_offsets(cr, b, l, w, s_ib, s_ic, s_ih, s_iw, C, p, PI)
    ok = row_ok[:, None, None] & e_ok[None, :, :]
    x = tl.load(imgs_ptr + src, mask=ok)
    tl.store(out_ptr + rows64[:, None, None] * (p * p * C) + dst[None, :, :], x, mask=ok)


@triton.jit
def _patch_gather_bwd_kernel(
    grad_ptr, inv_ptr, gimg_ptr,
    n_rows, L, w,
    s_gb, s_gk, s_gp, s_ib, s_ic, s_ih, s_iw,
    C: tl.constexpr, p: tl.constexpr, PI: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CR: tl.constexpr,
):
    # One row per patch of the image (all L of them): kept patches copy their gradient, the others
    # write zeros, so the image gradient needs no separate zero fill.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cr = tl.program_id(1) * BLOCK_CR + tl.arange(0, BLOCK_CR)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    b = rows64 // L
    l = rows64 % L
    k = tl.load(inv_ptr + rows64, mask=row_ok, other=-1).to(tl.int64)
    dst, src, e_ok = patch_offsets(cr, b, l, w, s_ib, s_ic, s_ih, s_iw, C, p, PI)
    ok = row_ok[:, None, None] & e_ok[None, :, :]
    g = tl.load(grad_ptr + (b * s_gb + k * s_gk)[:, None, None] + src[None, :, :] * s_gp,
                mask=ok & (k >= 0)[:, None, None], other=0.0)
    tl.store(gimg_ptr + dst, g.to(gimg_ptr.dtype.element_ty), mask=ok)


def _blocks(C: int, p: int) -> tuple[int, int, int, int]:
    """(rows per program, tile rows (c, i) per program, tile rows per patch, PI): about 4K elements per
    program on a GPU (enough bytes in flight per SM for a copy-bound kernel), tiny in the interpreter
    so tests also cover the multi-block paths."""
    n_cr, pi = patch_tile(C, p)
    bcr = min(n_cr, max(1, (32 if interpreting() else 1024) // pi))
    return (2 if interpreting() else max(1, 4096 // (bcr * pi))), bcr, n_cr, pi


def patch_gather_fwd(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs [B, C, H, W], ids_keep [B, K] int32|int64 -> patches [B, K, p*p*C] (imgs' dtype, contiguous)."""
    B, C, H, W = imgs.shape
    p = patch_size
    K = ids_keep.shape[1]
    out = new_output((B, K, p * p * C), imgs.dtype, imgs.device)
    br, bcr, n_cr, pi = _blocks(C, p)
    grid = (triton.cdiv(B * K, br), triton.cdiv(n_cr, bcr))
    _patch_gather_fwd_kernel[grid](
        imgs, ids_keep, out, B * K, K, W // p, *imgs.stride(), *ids_keep.stride(),
        C=C, p=p, PI=pi, BLOCK_R=br, BLOCK_CR=bcr)
    return out


def patch_gather_bwd(grad: torch.Tensor, ids_keep: torch.Tensor, channels: int, height: int, width: int,
                     patch_size: int) -> torch.Tensor:
    """grad [B, K, p*p*C], ids_keep [B, K] -> image gradient [B, C, H, W] (grad's dtype).

    Zero at the patches ids_keep does not name."""
    B, K, P = grad.shape
    p = patch_size
    w = width // p
    L = (height // p) * w
    # inv[b, l] = position of patch l in ids_keep[b], -1 when hidden: B*L int32, tiny next to the image.
    inv = torch.full((B, L), -1, dtype=torch.int32, device=grad.device)
    inv.scatter_(1, ids_keep.long(), torch.arange(K, dtype=torch.int32, device=grad.device).expand(B, K))
    gimg = new_output((B, channels, height, width), grad.dtype, grad.device)
    br, bcr, n_cr, pi = _blocks(channels, p)
    grid = (triton.cdiv(B * L, br), triton.cdiv(n_cr, bcr))
    _patch_gather_bwd_kernel[grid](
        grad, inv, gimg, B * L, L, w, *grad.stride(), *gimg.stride(),
        C=channels, p=p, PI=pi, BLOCK_R=br, BLOCK_CR=bcr)
    return gimg
