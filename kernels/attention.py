"""Triton flash-style attention (non-causal), forward and backward, for ViT shapes.

Layouts. q [B, H, Nq, Dh], k, v [B, H, Nk, Dh], any strides (the views that come out of a fused qkv
projection are used in place, no copies). Out [B, H, Nq, Dh] is a view of a [B, Nq, H, Dh] buffer, the
layout the output projection wants (so `out.transpose(1, 2).reshape(B, Nq, H*Dh)` is free), as torch's
flash SDPA does. lse [B*H, Nq] fp32 is the row log-sum-exp in base-2 units of the scaled scores.

Grid (batch*head, row blocks): batch*head on axis 0, which has no 65535 limit. Forward: one program
per (batch*head, BLOCK_M query rows); it walks the keys BLOCK_N at a time with the
online softmax (running max m, running sum l, rescaled accumulator), in base 2 (exp2 with the scale
pre-multiplied by log2 e: one multiply per score instead of a multiply and an exp). Keys past Nk score
-inf; query rows past Nq compute on zeros and are not stored. The head dim is padded to a power of two
(>= 16, tl.dot's minimum) with masked loads, so Dh = 48, 80, 96 run on 64/128-wide tiles.

Backward (FlashAttention-2's split, no atomics, deterministic): delta = rowsum(dO * O); one kernel owns
a key block and accumulates dK, dV over all query blocks; another owns a query block and accumulates dQ
over all key blocks. Both recompute P = exp2(S * log2 e - lse) from the stored lse, so nothing of size
Nq x Nk is ever in memory. With S = scale * Q K^T: dV = P^T dO, dP = dO V^T, dS = P * (dP - delta),
dQ = scale * dS K, dK = scale * dS^T Q.

fp32 inputs use IEEE fp32 products unless torch.backends.cuda.matmul.allow_tf32 is set (then TF32),
matching what torch's own matmul would do; fp16/bf16 multiply in their dtype and accumulate in fp32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import interpreting, new_output, next_pow2

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr):
    # INTERP_BF16: Triton 3.8's CPU interpreter multiplies the raw bit patterns in a bf16 x bf16 tl.dot
    # (triton-lang/triton#11584), so under the interpreter bf16 tiles go to fp32 first. A bf16 x bf16
    # product is exact in fp32, so this matches the GPU's bf16 MMA with fp32 accumulation up to order.
    if INTERP_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _to(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even. The GPU's cvt does that; Triton 3.8's interpreter
    truncates fp32 -> bf16, which doubles and biases the rounding error (P and dS are rounded to the input
    dtype before their products), so under the interpreter the rounding is done by hand on the bits."""
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, qk_scale,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_on, s_od,
    H, NQ, NK, DH,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    pid_m = tl.program_id(1)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < NQ
    d_ok = offs_d < DH
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        kt = tl.load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s = _dot(q, kt, IEEE, INTERP_BF16) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # Every key block holds at least one real key (n0 < NK), so m_new is finite and no -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(_to(pr, v.dtype, INTERP_BF16), v, IEEE, INTERP_BF16)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od,
             _to(out, O.dtype.element_ty, INTERP_BF16), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _attention_bwd_delta_kernel(
    O, DO, DELTA, s_ob, s_oh, s_on, s_od, s_gb, s_gh, s_gn, s_gd, H, NQ, DH,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(1)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < NQ)[:, None] & (offs_d < DH)[None, :]
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od, mask=ok, other=0.0)
    do = tl.load(DO + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd, mask=ok,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * NQ + offs_m, delta, mask=offs_m < NQ)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_gb, s_gh, s_gn, s_gd,
    H, NQ, NK, DH,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    pid_n = tl.program_id(1)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < NK
    d_ok = offs_d < DH
    nd_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=nd_ok,
                other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=nd_ok,
                other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_gb + h * s_gh
    row_base = bh.to(tl.int64) * NQ
    for m0 in range(0, NQ, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < NQ
        # Transposed tiles ([BLOCK_D, BLOCK_M]) so every product below is a plain tl.dot.
        dm_ok = d_ok[:, None] & m_ok[None, :]
        qt = tl.load(q_base + offs_m[None, :] * s_qn + offs_d[:, None] * s_qd, mask=dm_ok, other=0.0)
        dot_ = tl.load(do_base + offs_m[None, :] * s_gn + offs_d[:, None] * s_gd, mask=dm_ok, other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        st = _dot(k, qt, IEEE, INTERP_BF16) * qk_scale  # [BLOCK_N, BLOCK_M] = (S log2 e)^T
        pt = tl.where(n_ok[:, None] & m_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv += _dot(_to(pt, dot_.dtype, INTERP_BF16), tl.trans(dot_), IEEE, INTERP_BF16)  # P^T dO
        dpt = _dot(v, dot_, IEEE, INTERP_BF16)  # (dO V^T)^T
        dst = pt * (dpt - delta[None, :])
        dk += _dot(_to(dst, qt.dtype, INTERP_BF16), tl.trans(qt), IEEE, INTERP_BF16)  # dS^T Q
    dk = dk * sm_scale
    tl.store(DK + (bh.to(tl.int64) * NK + offs_n[:, None]) * DH + offs_d[None, :],
             _to(dk, DK.dtype.element_ty, INTERP_BF16), mask=nd_ok)
    tl.store(DV + (bh.to(tl.int64) * NK + offs_n[:, None]) * DH + offs_d[None, :],
             _to(dv, DV.dtype.element_ty, INTERP_BF16), mask=nd_ok)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_gb, s_gh, s_gn, s_gd,
    H, NQ, NK, DH,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    pid_m = tl.program_id(1)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < NQ
    d_ok = offs_d < DH
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd, mask=md_ok,
                other=0.0)
    do = tl.load(DO + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd, mask=md_ok,
                 other=0.0)
    row_base = bh.to(tl.int64) * NQ
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    for n0 in range(0, NK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        dn_ok = d_ok[:, None] & n_ok[None, :]
        kt = tl.load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd, mask=dn_ok, other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * s_vn + offs_d[:, None] * s_vd, mask=dn_ok, other=0.0)
        s = _dot(q, kt, IEEE, INTERP_BF16) * qk_scale
        pr = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, vt, IEEE, INTERP_BF16)
        ds = pr * (dp - delta[:, None])
        dq += _dot(_to(ds, kt.dtype, INTERP_BF16), tl.trans(kt), IEEE, INTERP_BF16)
    dq = dq * sm_scale
    tl.store(DQ + (row_base + offs_m[:, None]) * DH + offs_d[None, :],
             _to(dq, DQ.dtype.element_ty, INTERP_BF16), mask=md_ok)


def _config(dtype: torch.dtype, block_d: int, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Conservative fixed tiles: 64 x 64 for 16-bit inputs up
    to a 64-wide head (ViT-B/L's 64, the decoder's 32), narrower for 128-wide tiles and fp32 so the tiles
    and the fp32 accumulators fit registers and shared memory; untuned on a GPU so far (no GPU was lent to
    the session that wrote this), see benchmarks/bench_ops.py. The interpreter gets 16 x 16 so the tests
    cover several blocks and ragged edges at tiny N."""
    if interpreting():
        return 16, 16, 4, 1
    if block_d > 128:  # 256-wide heads: keep fp32 tiles under ~100 KB of shared memory (sm_86/89 limits)
        return (32, 16, 4, 1) if backward else (32, 32, 4, 1)
    wide = block_d > 64 or dtype == torch.float32
    if backward:
        return (32, 32, 4, 2) if wide else (64, 64, 4, 2)
    return (64, 32, 4, 2) if wide else (64, 64, 4, 3)


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _interp_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


def _scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Nq, Dh], k, v [B, H, Nk, Dh] -> (out [B, H, Nq, Dh] q's dtype, lse [B*H, Nq] fp32, base 2)."""
    B, H, NQ, DH = q.shape
    NK = k.shape[2]
    sm_scale = _scale(scale, DH)
    out = new_output((B, NQ, H, DH), q.dtype, q.device).transpose(1, 2)
    lse = new_output((B * H, NQ), torch.float32, q.device)
    bd = max(16, next_pow2(DH))
    bm, bn, nw, ns = _config(q.dtype, bd)
    grid = (B * H, triton.cdiv(NQ, bm))
    _attention_fwd_kernel[grid](
        q, k, v, out, lse, sm_scale * LOG2E, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, NQ, NK, DH, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=_ieee(q.dtype),
        INTERP_BF16=_interp_bf16(q.dtype), num_warps=nw, num_stages=ns)
    return out, lse


def attention_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, scale: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad, out [B, H, Nq, Dh], q, k, v, lse from attention_fwd -> (dq, dk, dv) contiguous, inputs' dtype."""
    B, H, NQ, DH = q.shape
    NK = k.shape[2]
    sm_scale = _scale(scale, DH)
    bd = max(16, next_pow2(DH))
    bm, bn, nw, ns = _config(q.dtype, bd, backward=True)
    delta = new_output((B * H, NQ), torch.float32, q.device)
    _attention_bwd_delta_kernel[(B * H, triton.cdiv(NQ, bm))](
        out, grad, delta, *out.stride(), *grad.stride(), H, NQ, DH, BLOCK_M=bm, BLOCK_D=bd)
    dq = new_output((B, H, NQ, DH), q.dtype, q.device)
    dk = new_output((B, H, NK, DH), k.dtype, k.device)
    dv = new_output((B, H, NK, DH), v.dtype, v.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad.stride())
    ieee, up = _ieee(q.dtype), _interp_bf16(q.dtype)
    _attention_bwd_dkdv_kernel[(B * H, triton.cdiv(NK, bn))](
        q, k, v, grad, lse, delta, dk, dv, sm_scale * LOG2E, sm_scale, *strides, H, NQ, NK, DH,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=ieee, INTERP_BF16=up, num_warps=nw, num_stages=ns)
    _attention_bwd_dq_kernel[(B * H, triton.cdiv(NQ, bm))](
        q, k, v, grad, lse, delta, dq, sm_scale * LOG2E, sm_scale, *strides, H, NQ, NK, DH,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=ieee, INTERP_BF16=up, num_warps=nw, num_stages=ns)
    return dq, dk, dv
