"""Triton kernels for MAE's normalized-pixel loss, forward and backward, never materializing the target.

Layouts. pred [B, L, P] (any strides), imgs [B, C, H, W] (any strides), mask [B, L] (1 = hidden, any
float/bool/int dtype), P = p*p*C in MAE's (p, q, c) patch order (see patch_gather.py).

Each program takes BLOCK_R patches and holds each whole patch in registers, read in image order (rows
of p pixels per channel, vector loads on the image side, see _patch_layout.py; C and p are compile-time
constants) into a [next_pow2(C) * next_pow2(p), next_pow2(p)] tile per patch, so the per-patch mean and
the unbiased variance come from a two-pass reduction over registers (exact like the reference, no
E[x^2] - E[x]^2 cancellation), and the normalized target (t - mean) / sqrt(var + eps) only ever exists
in registers. All arithmetic is fp32 whatever the inputs.

Forward: per-program partial sums of mask * mean_e (pred - target)^2, reduced by torch and divided by
sum(mask): deterministic, no atomics. Rows whose mask is 0 skip their loads (a quarter of the bytes at
MAE's 0.75 ratio); their contribution is exactly 0, as in the reference for finite inputs.
Backward (grad wrt pred only): d loss / d pred = g * 2 * mask / (P * sum(mask)) * (pred - target),
recomputing the target; rows with mask 0 get zeros, so every element of grad_pred is written once.
The scalar g * 2 / (P * sum(mask)) is passed as a 1-element device tensor: no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_loadable, interpreting, new_output
from ._patch_layout import patch_offsets, patch_tile

EPS = 1e-6
# A whole patch per tile row in registers: next_pow2(C) * next_pow2(p)**2 elements at most (the backend
# record declines larger patches).
MAX_TILE_ELEMS = 16384


@triton.jit
def _load_rows(pred_ptr, imgs_ptr, mask_ptr, rows, n_rows, L, w,
               s_pb, s_pl, s_pe, s_ib, s_ic, s_ih, s_iw, s_mb, s_ml, eps,
               NORM: tl.constexpr, C: tl.constexpr, p: tl.constexpr, PI: tl.constexpr, CR: tl.constexpr):
    """-> (mask value [R] fp32, pred - target [R, CR, PI] fp32 in image order (0 outside the patch or
    where mask is 0), offsets in the (p, q, c) patch vector [CR, PI], element exists [CR, PI])."""
    P: tl.constexpr = p * p * C
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    b = rows64 // L
    l = rows64 % L
    m = tl.load(mask_ptr + b * s_mb + l * s_ml, mask=row_ok, other=0).to(tl.float32)
    img, vec, e_ok = patch_offsets(tl.arange(0, CR), b, l, w, s_ib, s_ic, s_ih, s_iw, C, p, PI)
    ok = (row_ok & (m != 0.0))[:, None, None] & e_ok[None, :, :]
    t = tl.load(imgs_ptr + img, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(pred_ptr + (b * s_pb + l * s_pl)[:, None, None] + vec[None, :, :] * s_pe, mask=ok, other=0.0)
    x = x.to(tl.float32)
    if NORM:
        mean = tl.sum(tl.sum(t, axis=2), axis=1) / P
        diff = tl.where(ok, t - mean[:, None, None], 0.0)
        var = tl.sum(tl.sum(diff * diff, axis=2), axis=1) / (P - 1)  # unbiased, as the official code
        t = diff / tl.sqrt_rn(var + eps)[:, None, None]
    return m, tl.where(ok, x - t, 0.0), vec, e_ok


@triton.jit
def _norm_pix_loss_fwd_kernel(
    pred_ptr, imgs_ptr, mask_ptr, part_ptr,
    n_rows, L, w,
    s_pb, s_pl, s_pe, s_ib, s_ic, s_ih, s_iw, s_mb, s_ml, eps,
    NORM: tl.constexpr, C: tl.constexpr, p: tl.constexpr, PI: tl.constexpr, CR: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m, err, _, _ = _load_rows(pred_ptr, imgs_ptr, mask_ptr, rows, n_rows, L, w,
                              s_pb, s_pl, s_pe, s_ib, s_ic, s_ih, s_iw, s_mb, s_ml, eps, NORM, C, p, PI, CR)
    row_loss = tl.sum(tl.sum(err * err, axis=2), axis=1) / (p * p * C)
    tl.store(part_ptr + tl.program_id(0), tl.sum(row_loss * m, axis=0))


@triton.jit
def _norm_pix_loss_bwd_kernel(
    pred_ptr, imgs_ptr, mask_ptr, coef_ptr, gpred_ptr,
    n_rows, L, w,
    s_pb, s_pl, s_pe, s_ib, s_ic, s_ih, s_iw, s_mb, s_ml, eps,
    NORM: tl.constexpr, C: tl.constexpr, p: tl.constexpr, PI: tl.constexpr, CR: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m, err, vec, e_ok = _load_rows(pred_ptr, imgs_ptr, mask_ptr, rows, n_rows, L, w,
                                   s_pb, s_pl, s_pe, s_ib, s_ic, s_ih, s_iw, s_mb, s_ml, eps, NORM, C, p, PI,
                                   CR)
    coef = tl.load(coef_ptr)
    g = err * (coef * m)[:, None, None]
    ok = (rows < n_rows)[:, None, None] & e_ok[None, :, :]
    tl.store(gpred_ptr + rows.to(tl.int64)[:, None, None] * (p * p * C) + vec[None, :, :],
             g.to(gpred_ptr.dtype.element_ty), mask=ok)


def _config(C: int, p: int) -> tuple[int, int, int, int]:
    """(rows per program, CR, PI, num_warps): a whole patch per row of the tile (CR*PI elements, image
    order), about 4K fp32 values per tensor per program on a GPU."""
    cr, pi = patch_tile(C, p)
    if interpreting():
        return 2, cr, pi, 4
    br = max(1, 4096 // (cr * pi))
    return br, cr, pi, (4 if br * cr * pi <= 4096 else 8)


def norm_pix_loss_fwd(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                      norm_pix: bool = True) -> torch.Tensor:
    """pred [B, L, p*p*C], imgs [B, C, H, W], mask [B, L] (1 = hidden) -> scalar fp32 loss."""
    B, C, H, W = imgs.shape
    p = patch_size
    L = pred.shape[1]
    m = as_loadable(mask)
    br, cr, pi, nw = _config(C, p)
    n_prog = triton.cdiv(B * L, br)
    part = new_output((n_prog,), torch.float32, pred.device)
    _norm_pix_loss_fwd_kernel[(n_prog,)](
        pred, imgs, m, part, B * L, L, W // p,
        *pred.stride(), *imgs.stride(), *m.stride(), EPS,
        NORM=bool(norm_pix), C=C, p=p, PI=pi, CR=cr, BLOCK_R=br, num_warps=nw)
    return part.sum() / mask.float().sum()


def norm_pix_loss_bwd(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
                      patch_size: int, norm_pix: bool = True) -> torch.Tensor:
    """grad [] (d out), pred [B, L, P], imgs, mask -> grad_pred [B, L, P] contiguous (pred's dtype)."""
    B, C, H, W = imgs.shape
    p = patch_size
    L, P = pred.shape[1], pred.shape[2]
    m = as_loadable(mask)
    coef = (grad.float() * 2.0 / (P * mask.float().sum())).reshape(1)
    br, cr, pi, nw = _config(C, p)
    gpred = new_output((B, L, P), pred.dtype, pred.device)
    _norm_pix_loss_bwd_kernel[(triton.cdiv(B * L, br),)](
        pred, imgs, m, coef, gpred, B * L, L, W // p,
        *pred.stride(), *imgs.stride(), *m.stride(), EPS,
        NORM=bool(norm_pix), C=C, p=p, PI=pi, CR=cr, BLOCK_R=br, num_warps=nw)
    return gpred
