"""add_layer_norm: the residual add and LayerNorm of a pre-norm transformer block, fused.

    y, h = add_layer_norm(x, residual, weight, bias)   # h = x + residual, y = LayerNorm(h)

A pre-norm block (timm's, MAE's) computes `h = h + attn(norm1(h)); h = h + mlp(norm2(h))`: each
add is followed by the next norm. Fusing the pair reads both addends once and writes both the new
residual stream and the normalized activations in one pass, where eager PyTorch makes three passes
(add, then mean/var, then normalize) and keeps extra activations for the backward.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._checks import ALL_DEVICES, TORCH_DTYPES, fail_if
from .backends import Backend, register, select


def stream_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    """h's dtype when the caller names none: the dtype eager `x + residual` has (type promotion), and at
    least fp32 under autocast, where the official AMP code keeps the residual stream in fp32 (its blocks
    add bf16 branch outputs to an fp32 stream that starts from fp32 position embeddings)."""
    dt = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.promote_types(dt, torch.float32)
    return dt


def add_layer_norm_reference(x, residual, weight, bias, eps=1e-6, residual_dtype=None):
    """Plain PyTorch: h = x + residual (in residual_dtype, default `stream_dtype`), y = F.layer_norm(h) in
    x's dtype."""
    rdt = residual_dtype or stream_dtype(x, residual)
    h = x.to(rdt) if residual is None else (x.float() + residual.float()).to(rdt)
    y = F.layer_norm(h.float(), (h.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)
    return y, h


# ---- Triton backend: torch.library custom ops so torch.compile traces them without a graph break ----

@torch.library.custom_op("fastmask::add_layer_norm_fwd_triton", mutates_args=())
def _fwd_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                eps: float, residual_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastmask.kernels.layer_norm import layer_norm_fwd

    N = x.shape[-1]
    y, h, mean, rstd = layer_norm_fwd(x.reshape(-1, N).contiguous(),
                                      None if residual is None else residual.reshape(-1, N).contiguous(),
                                      weight.contiguous(), bias.contiguous(), eps, residual_dtype,
                                      store_h=True)
    return y.view(x.shape), h.view(x.shape), mean, rstd


@_fwd_triton.register_fake
def _(x, residual, weight, bias, eps, residual_dtype):
    M = x.numel() // x.shape[-1]
    return (torch.empty_like(x), torch.empty(x.shape, dtype=residual_dtype, device=x.device),
            x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32))


def _separate_dres(dx_dtype: torch.dtype, dres_dtype: torch.dtype | None) -> bool:
    return dres_dtype is not None and dres_dtype != dx_dtype


@torch.library.custom_op("fastmask::add_layer_norm_bwd_triton", mutates_args=())
def _bwd_triton(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor,
                dh_out: torch.Tensor | None, dx_dtype: torch.dtype, dres_dtype: torch.dtype | None
                ) -> list[torch.Tensor]:
    """-> [dweight, dbias, dx] and, only when dres_dtype differs from dx_dtype, dresidual (a custom op's
    outputs may not alias, so the shared gradient is returned once and reused by the autograd backward)."""
    from fastmask.kernels.layer_norm import layer_norm_bwd

    N = dy.shape[-1]
    dx, dres, dw, db = layer_norm_bwd(
        dy.reshape(-1, N).contiguous(), h.reshape(-1, N).contiguous(), weight.contiguous(), mean, rstd,
        None if dh_out is None else dh_out.reshape(-1, N).contiguous(), dx_dtype, dres_dtype)
    out = [dw.to(weight.dtype), db.to(weight.dtype), dx.view(dy.shape)]
    return out + ([dres.view(dy.shape)] if dres is not None else [])


@_bwd_triton.register_fake
def _(dy, h, weight, mean, rstd, dh_out, dx_dtype, dres_dtype):
    out = [torch.empty_like(weight), torch.empty_like(weight),
           torch.empty(dy.shape, dtype=dx_dtype, device=dy.device)]
    if _separate_dres(dx_dtype, dres_dtype):
        out.append(torch.empty(dy.shape, dtype=dres_dtype, device=dy.device))
    return out


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, residual_dtype = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.x_dtype, ctx.res_dtype = x.dtype, None if residual is None else residual.dtype


def _backward(ctx, dy, dh_out, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    grads = _bwd_triton(dy, h, weight, mean, rstd, dh_out, ctx.x_dtype, ctx.res_dtype)
    dw, db, dx = grads[:3]
    dres = None if ctx.res_dtype is None else (grads[3] if len(grads) > 3 else dx)
    return dx, dres, dw, db, None, None


_fwd_triton.register_autograd(_backward, setup_context=_setup_context)


def _triton_impl(x, residual, weight, bias, eps, residual_dtype=None):
    y, h, _, _ = _fwd_triton(x, residual, weight, bias, eps, residual_dtype or stream_dtype(x, residual))
    return y, h


def _triton_available() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install fastmask[triton])"
    return None


def _triton_why_not(x=None, **_):
    n = x.shape[-1] if x is not None else 0
    return [f"row length {n} > 16384 (one row per program)"] if n > 16384 else []


register(Backend(op="add_layer_norm", name="torch", fn=add_layer_norm_reference, devices=ALL_DEVICES,
                 dtypes=TORCH_DTYPES, key_input="x"))
register(Backend(
    op="add_layer_norm", name="triton", fn=_triton_impl,
    # On the CPU only through Triton's interpreter (tests); never picked by auto there.
    devices=("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",),
    available=_triton_available, why_not_extra=_triton_why_not, key_input="x",
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}))


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-6, residual_dtype: torch.dtype | None = None,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., N], residual [..., N] or None, weight/bias [N] -> (y [..., N] x.dtype, h [..., N]).

    h = x + residual in `residual_dtype` (default `stream_dtype(x, residual)`: the promoted dtype of x and
    residual, fp32 under autocast, so the residual stream of an AMP model stays fp32 as in the official
    code), y = LayerNorm(h) with biased variance and `eps` (torch's LayerNorm). Differentiable in x,
    residual, weight and bias; gradient flowing into h (the residual stream) is added in the fused backward.

    Equivalent PyTorch: `fastmask.ops.layer_norm.add_layer_norm_reference`.
    """
    problems = []
    if residual is not None and residual.shape != x.shape:
        problems.append(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        problems.append(f"weight/bias must be [{x.shape[-1]}], got {tuple(weight.shape)}, "
                        f"{tuple(bias.shape)}")
    fail_if("add_layer_norm", problems)
    impl = select("add_layer_norm", backend, x=x, residual=residual, weight=weight, bias=bias)
    return impl.fn(x, residual, weight, bias, eps, residual_dtype or stream_dtype(x, residual))
