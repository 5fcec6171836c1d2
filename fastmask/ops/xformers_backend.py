"""The `xformers` backend of `fastmask.ops.attention`: xformers.ops.memory_efficient_attention.

Optional: used when xformers imports and a CUDA GPU is present, never required. xformers reads
[B, N, heads, head_dim]; `fastmask.ops.nn.Attention` produces q, k, v as transposed views of the
qkv projection's output, so transposing back here is free (no copy on the way in or out).
"""
from __future__ import annotations

import functools

import torch

from .backends import Backend, register


@functools.lru_cache(maxsize=1)
def _xformers_reason() -> str | None:
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # ImportError, or a binary built for another torch
        return f"xformers is not importable ({type(e).__name__}: {e}); pip install fastmask[xformers]"
    return None


def _xformers_attention(q, k, v, scale=None):
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=scale)
    return out.transpose(1, 2)


def _why_not(q=None, **_):
    if q is not None and q.shape[-1] > 256:
        return [f"head_dim {q.shape[-1]} > 256"]
    return []


register(Backend(op="attention", name="xformers", fn=_xformers_attention, devices=("cuda",),
                 dtypes=(torch.float16, torch.bfloat16, torch.float32), available=_xformers_reason,
                 why_not_extra=_why_not, key_input="q", deterministic=False,
                 tolerances={torch.float32: (2e-4, 2e-4), torch.float16: (4e-3, 4e-3),
                             torch.bfloat16: (3e-2, 3e-2)}))
