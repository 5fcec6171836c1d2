"""CaiT's class-attention blocks (Touvron et al. 2021) and ExtreMA's encoder built on them.

`ClassAttentionBlock` (timm `LayerScaleBlockClassAttn`, ExtreMA `Block_CA`): only the class token
is updated; its query attends to keys/values of [cls, patches]:

    u   = cat(cls, x);  cls = cls + gamma_1 * proj(softmax(q(LN1(u)_0) k(LN1(u))^T / sqrt(d_h)) v(LN1(u)))
    cls = cls + gamma_2 * MLP(LN2(cls))

`ClassAttentionViT` is ExtreMA's encoder: a `VisionTransformer`'s patch embedding and blocks run on
the patch tokens only (the class token never enters the main blocks), then the class-attention
blocks pool them into the class token, then the final LayerNorm on cat(cls, x). It reuses the
ViT's `cls_token` (as CaiT's class token) and `norm`, so every ViT parameter is trained and the ViT
part of the state dict keeps timm's names.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .blocks import DropPath, LayerNorm, Mlp, init_mae_weights, run_blocks


class ClassAttention(nn.Module):
    """cls-query attention (timm `ClassAttn` names q, k, v, proj).
    u [B, 1+N, D] -> [B, 1, D]: the query is the first token only; keys/values are every token."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        B, N, C = u.shape
        h, d = self.num_heads, self.head_dim
        q = self.q(u[:, :1]).reshape(B, 1, h, d).transpose(1, 2)  # [B, h, 1, d]
        k = self.k(u).reshape(B, N, h, d).transpose(1, 2)          # [B, h, N, d]
        v = self.v(u).reshape(B, N, h, d).transpose(1, 2)
        out = ops.attention(q, k, v, scale=self.scale, backend=self.backend)  # [B, h, 1, d]
        return self.proj(out.transpose(1, 2).reshape(B, 1, C))


class ClassAttentionBlock(nn.Module):
    """forward(x [B, N, D] patch tokens, cls [B, 1, D]) -> updated cls [B, 1, D]; x is not changed.

    Layer scale gamma_1, gamma_2 [D] start at `init_values` (ExtreMA: 0.1); drop-path off by default.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: float = 0.1, drop_path: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias=qkv_bias, backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        u = torch.cat([cls, x], dim=1)
        cls = cls + self.drop_path(self.gamma_1 * self.attn(self.norm1(u)))
        return cls + self.drop_path(self.gamma_2 * self.mlp(self.norm2(cls)))


class ClassAttentionViT(nn.Module):
    """ExtreMA's encoder around a `VisionTransformer` `vit` (its blocks, patch embed, cls_token, norm).

    forward_features(imgs [B, C, H, W]) -> [B, 1+L, D];
    forward_visible(imgs, ids_keep [B, K]) -> [B, 1+K, D];
    token 0 is the class token pooled by `depth_ca` class-attention blocks, the rest are the patch
    tokens (in ids_keep's order), all after the final LayerNorm. `pooled(tokens)` = token 0.
    """

    def __init__(self, vit: nn.Module, depth_ca: int = 2, init_values: float = 0.1, mlp_ratio: float = 4.0):
        super().__init__()
        if depth_ca < 1:
            raise ValueError(f"depth_ca must be >= 1, got {depth_ca}")
        self.vit = vit
        D, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
        self.embed_dim, self.patch_size, self.num_patches = D, vit.patch_size, vit.num_patches
        self.img_size, self.grid_size = vit.img_size, vit.grid_size
        self.ca_blocks = nn.ModuleList([
            ClassAttentionBlock(D, heads, mlp_ratio=mlp_ratio, init_values=init_values, backend=vit.backend)
            for _ in range(depth_ca)])
        self.ca_blocks.apply(init_mae_weights)  # a child's weights: through apply (see models/__init__)

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.vit.blocks, x, self.vit.grad_checkpointing)
        cls = self.vit.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        for blk in self.ca_blocks:
            cls = blk(x, cls)
        return self.vit.norm(torch.cat([cls, x], dim=1))

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        self.vit.check_images(imgs)
        return self._pool(self.vit.patch_embed(imgs) + self.vit.pos_embed[:, 1:].to(imgs.dtype))

    def forward_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        self.vit.check_images(imgs)
        return self._pool(self.vit.embed_visible(imgs, ids_keep))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_features(imgs)


__all__ = ["ClassAttention", "ClassAttentionBlock", "ClassAttentionViT"]
