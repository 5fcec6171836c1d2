"""Triton kernels for the fused residual-add + LayerNorm of pre-norm transformer blocks, and its backward.

    h = x + residual            (residual optional: h = x)
    y = (h - mean(h)) * rstd * weight + bias,   rstd = 1 / sqrt(biased var(h) + eps)

Both h (the new residual stream, in the caller's `residual_dtype`: `fastmask.ops.add_layer_norm` makes it
fp32 under autocast, as the official AMP code keeps it, so the stream does not lose bits across 24-32
blocks) and y (in x's dtype) are written by one pass over the row; the backward recomputes x_hat from h
and the saved per-row mean/rstd instead of storing it.

Backward, per row with g = dy * weight and x_hat = (h - mean) * rstd (N = row length):
    dh = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) + dh_out
where dh_out is the gradient arriving on h from later uses (the residual stream). dx = dresidual = dh,
computed in fp32 and written once per dtype it is needed in: one tensor in x's dtype serves both dx and
dresidual when their dtypes agree (all-bf16: read dy, h, dh_out and write dh, 8 bytes per element, the
minimum); with an fp32 stream beside a bf16 branch the same pass also writes dresidual in fp32.
dweight = sum_rows(dy * x_hat) and dbias = sum_rows(dy) are reduced per program into a [programs, N]
fp32 buffer and summed by torch: no atomics, deterministic.

Layouts: rows of x, residual, y, h are contiguous with stride N (the launcher reshapes to [M, N]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, new_output, next_pow2


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr,
    M, N, eps,
    HAS_RES: tl.constexpr, STORE_H: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < M:
            off = row.to(tl.int64) * N + cols
            h = tl.load(x_ptr + off, mask=col_ok, other=0.0).to(tl.float32)
            if HAS_RES:
                h += tl.load(res_ptr + off, mask=col_ok, other=0.0).to(tl.float32)
            if STORE_H:
                tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=col_ok)
            mean = tl.sum(h, axis=0) / N
            d = tl.where(col_ok, h - mean, 0.0)
            var = tl.sum(d * d, axis=0) / N
            rstd = 1.0 / tl.sqrt(var + eps)
            tl.store(mean_ptr + row, mean)
            tl.store(rstd_ptr + row, rstd)
            y = d * rstd * w + b
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, dh_out_ptr, dx_ptr, dres_ptr, dw_part_ptr, db_part_ptr,
    M, N,
    HAS_DH_OUT: tl.constexpr, STORE_DRES: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < M:
            off = row.to(tl.int64) * N + cols
            h = tl.load(h_ptr + off, mask=col_ok, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + off, mask=col_ok, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(col_ok, (h - mean) * rstd, 0.0)
            g = dy * w
            c1 = tl.sum(xhat * g, axis=0) / N
            c2 = tl.sum(g, axis=0) / N
            dh = (g - c2 - xhat * c1) * rstd
            if HAS_DH_OUT:
                dh += tl.load(dh_out_ptr + off, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off, dh.to(dx_ptr.dtype.element_ty), mask=col_ok)
            if STORE_DRES:
                tl.store(dres_ptr + off, dh.to(dres_ptr.dtype.element_ty), mask=col_ok)
            dw += dy * xhat
            db += dy
    tl.store(dw_part_ptr + pid * N + cols, dw, mask=col_ok)
    tl.store(db_part_ptr + pid * N + cols, db, mask=col_ok)


def _rows_per_program(M: int, N: int) -> int:
    # Several rows per program amortize the weight loads and shrink the dw/db partial buffer; on a GPU
    # aim for a few programs per SM. Tiny in the interpreter so tests cover the row-tail path.
    if interpreting():
        return 3
    return max(1, min(16, M // 1024))


def layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, residual_dtype: torch.dtype | None = None, store_h: bool = True):
    """x, residual [M, N] contiguous, weight/bias [N] -> (y [M, N] x.dtype, h [M, N] residual_dtype or None,
    mean [M] fp32, rstd [M] fp32). h is only written when a residual is given or store_h is set."""
    M, N = x.shape
    rdt = residual_dtype or (residual.dtype if residual is not None else x.dtype)
    y = new_output((M, N), x.dtype, x.device)
    write_h = store_h or residual is not None
    h = new_output((M, N), rdt, x.device) if write_h else None
    mean = new_output((M,), torch.float32, x.device)
    rstd = new_output((M,), torch.float32, x.device)
    rows = _rows_per_program(M, N)
    _layer_norm_fwd_kernel[(triton.cdiv(M, rows),)](
        x, residual if residual is not None else x, weight, bias, y, h if h is not None else y, mean, rstd,
        M, N, eps, HAS_RES=residual is not None, STORE_H=write_h, BLOCK_N=next_pow2(N), ROWS=rows)
    return y, h, mean, rstd


def layer_norm_bwd(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, dh_out: torch.Tensor | None, dx_dtype: torch.dtype,
                   dres_dtype: torch.dtype | None = None):
    """dy [M, N], h [M, N] (the normalized input), dh_out [M, N] or None -> (dx [M, N] dx_dtype,
    dresidual [M, N] dres_dtype or None, dweight [N] fp32, dbias [N] fp32).

    dresidual is a second tensor only when dres_dtype differs from dx_dtype; otherwise dx is the
    gradient of the residual too (None returned: the caller reuses dx)."""
    M, N = dy.shape
    rows = _rows_per_program(M, N)
    programs = triton.cdiv(M, rows)
    dx = new_output((M, N), dx_dtype, dy.device)
    separate = dres_dtype is not None and dres_dtype != dx_dtype
    dres = new_output((M, N), dres_dtype, dy.device) if separate else None
    dw_part = new_output((programs, N), torch.float32, dy.device)
    db_part = new_output((programs, N), torch.float32, dy.device)
    _layer_norm_bwd_kernel[(programs,)](
        dy, h, weight, mean, rstd, dh_out if dh_out is not None else dy, dx, dres if separate else dx,
        dw_part, db_part, M, N, HAS_DH_OUT=dh_out is not None, STORE_DRES=separate, BLOCK_N=next_pow2(N),
        ROWS=rows)
    return dx, dres, dw_part.sum(0), db_part.sum(0)
