"""Drop-in modules over the fused ops, for users who plug them into their own models and trainers."""
from __future__ import annotations

import torch
from torch import nn

from .attention import attention
from .norm_pix_loss import norm_pix_loss


class NormPixLoss(nn.Module):
    """MAE's loss as a module: forward(pred [B, L, p*p*C], imgs [B, C, H, W], mask [B, L]) -> scalar fp32."""

    def __init__(self, patch_size: int, norm_pix: bool = True, backend: str = "auto"):
        super().__init__()
        self.patch_size, self.norm_pix, self.backend = patch_size, norm_pix, backend

    def forward(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return norm_pix_loss(pred, imgs, mask, self.patch_size, self.norm_pix, backend=self.backend)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, norm_pix={self.norm_pix}, backend={self.backend!r}"


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (`qkv`, `proj`), so state dicts of timm
    and the official MAE code load unchanged; the product runs through `fastmask.ops.attention`.

    forward(x [B, N, dim]) -> [B, N, dim].
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = attention(q, k, v, scale=self.scale, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
