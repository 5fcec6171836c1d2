"""Triton kernels for bias + GELU (exact, erf form as timm's nn.GELU) after a bias-free matmul, and its
backward.

    y = gelu(x + bias),  gelu(u) = u * Phi(u) = 0.5 u (1 + erf(u / sqrt(2)))
    dx = dy * (Phi(u) + u * phi(u)),  phi(u) = exp(-u^2 / 2) / sqrt(2 pi),  dbias = sum_rows(dx)

The MLP's fc1 runs as a matmul without bias; this kernel reads its output once and writes the
activation once (eager PyTorch reads and writes it twice: bias add, then GELU). The backward
recomputes u from the saved pre-bias input rather than storing u.

Tiles. Both kernels are autotuned over a few tiles of 2K-4K elements (16 fp32 values per thread per
tensor): the former fixed 32 x 256 tile on 4 warps (64 values per thread) needed 147 (forward) and 175
(backward) registers on sm_90, which caps an SM at 2-3 blocks for a kernel that only streams memory;
these take 40 and 94-95 (triton 3.8 ptxas, no spills). `python -m fastmask.kernels._compile_check`
prints the registers of every config. The backward's
programs each own a fixed chunk of ROWS rows (not a tile), walked BLOCK_M rows at a time, so the
[chunks, N] fp32 buffer of per-chunk dbias sums (summed by torch: deterministic, no atomics) has one
size whatever config the autotuner picks. Under the interpreter one tiny config runs, with chunks of
several tiles and a ragged last tile, so tests cover the loop and the edges.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, new_output, next_pow2

# (BLOCK_M, BLOCK_N, num_warps): 2K-4K elements per program, 16 per thread.
_TILES = [(8, 256, 4), (16, 256, 8), (4, 512, 4), (8, 512, 8)]
ROWS_PER_CHUNK = 128  # backward: rows per program (the dbias partials are [M / 128, N] fp32, ~1% of dx)
_INTERP_ROWS_PER_CHUNK = 5


def _configs():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in _TILES]


def _prune(configs, named_args, **kwargs):
    """Under the interpreter run one tiny tile (no benchmarking on a CPU); on a GPU drop tiles wider than
    the row (they would only add masked lanes)."""
    n_cols = named_args["N"]
    if interpreting():  # several column tiles on narrow rows (op tests), few programs on a model's MLP
        return [triton.Config({"BLOCK_M": 2, "BLOCK_N": 16 if n_cols < 64 else 128}, num_warps=1)]
    fit = [c for c in configs if c.kwargs["BLOCK_N"] <= max(next_pow2(n_cols), 256)]
    return fit or configs[:1]


_TUNE = dict(configs=_configs(), key=["N"], prune_configs_by={"early_config_prune": _prune})


@triton.autotune(**_TUNE)
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


@triton.autotune(**_TUNE)
@triton.jit
def _bias_gelu_bwd_kernel(dy_ptr, x_ptr, b_ptr, dx_ptr, db_part_ptr, M, N, ROWS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_end = tl.minimum(chunk * ROWS + ROWS, M)
    for r0 in range(chunk * ROWS, chunk * ROWS + ROWS, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        off = rows.to(tl.int64)[:, None] * N + cols[None, :]
        u = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
        dx = tl.where(ok, dy * (cdf + u * pdf), 0.0)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        db += tl.sum(dx, axis=0)
    tl.store(db_part_ptr + chunk.to(tl.int64) * N + cols, db, mask=col_ok)


def _grid(M, N, rows_per_program=None):
    def grid(meta):
        rows = rows_per_program or meta["BLOCK_M"]
        return triton.cdiv(M, rows), triton.cdiv(N, meta["BLOCK_N"])
    return grid


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [M, N] contiguous, bias [N] -> gelu(x + bias) [M, N] in x's dtype."""
    M, N = x.shape
    y = new_output((M, N), x.dtype, x.device)
    _bias_gelu_fwd_kernel[_grid(M, N)](x, bias, y, M, N)
    return y


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x [M, N] contiguous, bias [N] -> (dx [M, N] x.dtype, dbias [N] fp32)."""
    M, N = x.shape
    rows = _INTERP_ROWS_PER_CHUNK if interpreting() else ROWS_PER_CHUNK
    chunks = triton.cdiv(M, rows)
    dx = new_output((M, N), x.dtype, x.device)
    db_part = new_output((chunks, N), torch.float32, x.device)
    _bias_gelu_bwd_kernel[_grid(M, N, rows)](dy, x, bias, dx, db_part, M, N, ROWS=rows)
    return dx, db_part.sum(0)
