"""bias_gelu: y = GELU(x + bias) (exact erf GELU, as timm's Mlp), fused after the bias-free fc1 matmul."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._checks import ALL_DEVICES, TORCH_DTYPES, fail_if
from .backends import Backend, register, select


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: F.gelu(x + bias)."""
    return F.gelu(x + bias.to(x.dtype))


@torch.library.custom_op("fastmask::bias_gelu_fwd_triton", mutates_args=())
def _fwd_triton(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from fastmask.kernels.bias_gelu import bias_gelu_fwd

    N = x.shape[-1]
    return bias_gelu_fwd(x.reshape(-1, N).contiguous(), bias.contiguous()).view(x.shape)


@_fwd_triton.register_fake
def _(x, bias):
    return torch.empty_like(x)


@torch.library.custom_op("fastmask::bias_gelu_bwd_triton", mutates_args=())
def _bwd_triton(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fastmask.kernels.bias_gelu import bias_gelu_bwd

    N = x.shape[-1]
    dx, db = bias_gelu_bwd(dy.reshape(-1, N).contiguous(), x.reshape(-1, N).contiguous(), bias.contiguous())
    return dx.view(x.shape), db.to(bias.dtype)


@_bwd_triton.register_fake
def _(dy, x, bias):
    return torch.empty_like(x), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    return _bwd_triton(dy, x, bias)


_fwd_triton.register_autograd(_backward, setup_context=_setup_context)


def _triton_available() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install fastmask[triton])"
    return None


register(Backend(op="bias_gelu", name="torch", fn=bias_gelu_reference, devices=ALL_DEVICES,
                 dtypes=TORCH_DTYPES, key_input="x"))
register(Backend(op="bias_gelu", name="triton", fn=_fwd_triton,
                 devices=("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",),
                 available=_triton_available, key_input="x"))


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [..., N] fp32|bf16|fp16, bias [N] -> GELU(x + bias) [..., N] (x's dtype), exact erf GELU.

    Differentiable in x and bias. Equivalent PyTorch: `fastmask.ops.bias_gelu.bias_gelu_reference`.
    """
    if bias.shape != (x.shape[-1],):
        fail_if("bias_gelu", [f"bias must be [{x.shape[-1]}], got {tuple(bias.shape)}"])
    return select("bias_gelu", backend, x=x, bias=bias).fn(x, bias)
