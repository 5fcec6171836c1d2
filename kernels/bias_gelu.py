"""Triton kernels for bias + GELU (exact, erf form as timm's nn.GELU) after a bias-free matmul, and its backward.

    y = gelu(x + bias),  gelu(u) = u * Phi(u) = 0.5 u (1 + erf(u / sqrt(2)))
    dx = dy * (Phi(u) + u * phi(u)),  phi(u) = exp(-u^2 / 2) / sqrt(2 pi),  dbias = sum_rows(dx)

The MLP's fc1 runs as a matmul without bias; this kernel reads its output once and writes the
activation once (eager PyTorch reads and writes it twice: bias add, then GELU). The backward
recomputes u from the saved pre-bias input rather than storing u. dbias is reduced per program
into a [programs, N] fp32 buffer and summed by torch (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, new_output, next_pow2



@triton.jit
def _bias_gelu_fwd_kernel(x_ptr, b_ptr, y_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    off = rows.to(tl.int64)[:, None] * N + cols[None, :]
    u = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
    u += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_bwd_kernel(dy_ptr, x_ptr, b_ptr, dx_ptr, db_part_ptr, M, N,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ok = (rows < M)[:, None] & col_ok[None, :]
    off = rows.to(tl.int64)[:, None] * N + cols[None, :]
    u = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
    u += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
    pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
    dx = tl.where(ok, dy * (cdf + u * pdf), 0.0)
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(db_part_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(dx, axis=0), mask=col_ok)


def _blocks(M: int, N: int) -> tuple[int, int]:
    if interpreting():
        return 4, min(next_pow2(N), 16)
    bn = min(next_pow2(N), 256)
    return max(1, 8192 // bn), bn


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [M, N] contiguous, bias [N] -> gelu(x + bias) [M, N] in x's dtype."""
    M, N = x.shape
    y = new_output((M, N), x.dtype, x.device)
    bm, bn = _blocks(M, N)
    _bias_gelu_fwd_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](x, bias, y, M, N, BLOCK_M=bm, BLOCK_N=bn)
    return y


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x [M, N] contiguous, bias [N] -> (dx [M, N] x.dtype, dbias [N] fp32)."""
    M, N = x.shape
    bm, bn = _blocks(M, N)
    gm = triton.cdiv(M, bm)
    dx = new_output((M, N), x.dtype, x.device)
    db_part = new_output((gm, N), torch.float32, x.device)
    _bias_gelu_bwd_kernel[(gm, triton.cdiv(N, bn))](dy, x, bias, dx, db_part, M, N, BLOCK_M=bm, BLOCK_N=bn)
    return dx, db_part.sum(0)
