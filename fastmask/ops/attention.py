"""attention: non-causal softmax attention in torch SDPA's [B, heads, N, head_dim] layout."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import reference
from ._checks import ALL_DEVICES, TORCH_DTYPES, fail_if
from .backends import Backend, register, select, set_priority


# On CUDA, ask SDPA for cuDNN first: on Hopper at ViT lengths (50-257 tokens) it measured 1.7-2.3x
# the flash backend (docs/performance.md); SDPA itself skips any backend that cannot take the inputs.
_SDPA_CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]


def _sdpa(q, k, v, scale=None):
    if q.is_cuda:
        with sdpa_kernel(_SDPA_CUDA_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


register(Backend(op="attention", name="torch", fn=reference.attention, devices=ALL_DEVICES,
                 dtypes=TORCH_DTYPES, key_input="q"))
register(Backend(op="attention", name="sdpa", fn=_sdpa, devices=ALL_DEVICES, dtypes=TORCH_DTYPES,
                 key_input="q"))

# auto's order. SDPA (cuDNN first) leads on CUDA: at MAE's lengths (50-257 tokens, head dims 32-80)
# docs/performance.md cites cuDNN's SDPA 1.7-2.3x ahead of flash-style kernels on Hopper, and no GPU
# measurement of our Triton kernel has yet shown it ahead at these shapes. The Triton kernel stays
# one name away (backend="triton") and takes over where SDPA declines (for example fp64 is not
# served by triton either, so the reference catches that). Reorder only from committed
# benchmark results (benchmarks/results/) naming the GPU they came from.
set_priority("attention", {"cuda": ("sdpa", "triton", "xformers", "torch"), "cpu": ("sdpa", "torch")},
             "rule: SDPA (cuDNN first) before triton: at MAE lengths cuDNN's SDPA measured 1.7-2.3x the "
             "flash backend on Hopper, and no GPU measurement has shown the Triton kernel ahead")


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    problems = []
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        problems.append(f"q, k, v must be [B, heads, N, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
                        f"{tuple(v.shape)}")
    elif k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        problems.append(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        problems.append(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        problems.append(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    fail_if("attention", problems)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """q [B, heads, Nq, head_dim], k, v [B, heads, Nk, head_dim] fp32|bf16|fp16 -> [B, heads, Nq, head_dim].

    Non-causal softmax(q k^T * scale) v with scale = head_dim ** -0.5 by default; the fused backends
    never hold the Nq x Nk matrix in memory. Differentiable with respect to q, k and v.

    Equivalent PyTorch: `fastmask.ops.reference.attention`.
    """
    check_attention(q, k, v)
    impl = select("attention", backend, q=q, k=k, v=v, scale=scale)
    return impl.fn(q, k, v, scale)
