"""The class token's attention over the patches in a ViT's last block, for attention-guided masking.

MST / AttMask mask the student by the teacher's last-layer cls attention. Only that one row is
needed, so the ViT runs its ordinary (fused, flash) forward and a forward hook on the last block's
`attn.qkv` Linear keeps that block's q and k; the cls row softmax(q_cls k^T / sqrt(d_h)) is then
one [B, heads, 1, N] product. No attention matrix is materialised and the Attention module is not
changed.
"""
from __future__ import annotations

import torch
from torch import nn


def cls_attention_from_qkv(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """qkv [B, N, 3*D] (the output of timm's `attn.qkv` Linear, cls at token 0) -> [B, heads, N-1] fp32:
    softmax over all N keys of the cls query's scores, then the patch columns (DINO's attention map)."""
    B, N, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv width {C3} is not 3 * heads({num_heads}) * head_dim")
    d = C3 // (3 * num_heads)
    qkv = qkv.reshape(B, N, 3, num_heads, d)
    q = qkv[:, 0, 0].float()              # [B, h, d]: cls query
    k = qkv[:, :, 1].float()              # [B, N, h, d]
    s = torch.einsum("bhd,bnhd->bhn", q, k) * (d ** -0.5 if scale is None else scale)
    return s.softmax(dim=-1)[:, :, 1:]


def forward_with_cls_attention(vit: nn.Module, imgs: torch.Tensor,
                               mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """vit: a fastmask VisionTransformer. imgs [B, C, H, W] -> (tokens [B, 1+L, D], attn [B, heads, L] fp32).

    tokens = vit.forward_features(imgs) (or forward_masked_tokens(imgs, mask, mask_token) when a
    mask is given); attn = the last block's cls-query attention over the L patches (rows sum to
    1 - attention on cls itself). Average over heads for one score per patch.
    """
    last = vit.blocks[-1].attn
    box: dict[str, torch.Tensor] = {}
    handle = last.qkv.register_forward_hook(lambda _m, _i, out: box.__setitem__("qkv", out))
    try:
        tokens = vit.forward_features(imgs) if mask is None \
            else vit.forward_masked_tokens(imgs, mask, mask_token)
    finally:
        handle.remove()
    return tokens, cls_attention_from_qkv(box["qkv"], last.num_heads, last.scale)


__all__ = ["cls_attention_from_qkv", "forward_with_cls_attention"]
