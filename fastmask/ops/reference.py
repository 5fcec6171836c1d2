"""Plain-PyTorch versions of every fastmask op: the executable spec, the CPU path and the test oracle.

Nothing here is registered or fused; each function is short enough to check by eye against the
official formulation (facebookresearch/mae `models_mae.py`). Mask convention: 1 = hidden, 0 = visible.
Patch vectors are ordered (row-in-patch p, col-in-patch q, channel c), channel last, as MAE's patchify.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the arithmetic; fp32 and fp64 stay as they are (fp64 for gradcheck)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs [B, C, H, W] -> patches [B, L, p*p*C], L = (H/p)*(W/p), (p, q, c) order within a patch."""
    B, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """patches [B, L, p*p*C] -> imgs [B, C, h*p, w*p]; inverse of `patchify`."""
    B = patches.shape[0]
    p, (h, w) = patch_size, grid
    x = patches.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * p, w * p)


def patch_gather(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs [B, C, H, W], ids_keep [B, K] int64 -> visible patches [B, K, p*p*C], in ids_keep's order."""
    patches = patchify(imgs, patch_size)
    D = patches.shape[-1]
    return torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))


def patch_scatter(tokens: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """tokens [B, K, D] (visible, shuffled order), ids_restore [B, L], mask_token [D] -> [B, L, D].

    MAE's decoder unshuffle: append L-K mask tokens, then gather with ids_restore, so position i of
    the output holds the visible token that came from patch i, or the mask token where i is hidden.
    """
    B, K, D = tokens.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).to(tokens.dtype).expand(B, L - K, D)
    x = torch.cat([tokens, mask_tokens], dim=1)
    return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))


def unshuffle_dtype(x: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor) -> torch.dtype:
    """decoder_unshuffle's output dtype: what the official code's cat + add promote to (fp32 under AMP)."""
    return torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)


def decoder_unshuffle(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                      pos_embed: torch.Tensor) -> torch.Tensor:
    """x [B, 1+K, D] (cls, then the visible tokens in the encoder's order), ids_restore [B, L],
    mask_token [D], pos_embed [1+L, D] -> [B, 1+L, D] in `unshuffle_dtype`.

    MAE's forward_decoder up to its blocks, written as the official code writes it: mask tokens
    appended, unshuffled with ids_restore, the cls token put back in front, the position embedding
    added. torch.cat promotes dtypes, so under AMP (bf16 tokens, fp32 mask token and embedding) the
    decoder's residual stream starts in fp32.
    """
    B, K1, D = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).expand(B, L + 1 - K1, D)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    return torch.cat([x[:, :1], x_], dim=1) + pos_embed.reshape(1, L + 1, D)


def norm_pix_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                  norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """pred [B, L, p*p*C], imgs [B, C, H, W], mask [B, L] (1 = hidden) -> scalar fp32 loss.

    MAE's forward_loss: per-patch target normalized by its own mean and unbiased variance
    (t - mean) / sqrt(var + 1e-6), squared error averaged over the patch, then averaged over hidden
    patches only. Computed in fp32 for fp32/bf16/fp16 inputs (fp64 stays fp64).
    """
    target = _upcast(patchify(imgs, patch_size))
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
        target = (target - mean) / (var + eps) ** 0.5
    loss = (_upcast(pred) - target) ** 2
    loss = loss.mean(dim=-1)
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q, k, v [B, heads, N, head_dim] -> out [B, heads, N, head_dim]; non-causal softmax attention.

    Materializes the N x N matrix in fp32: the oracle, not a path for long sequences.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(_upcast(q), _upcast(k).transpose(-2, -1)) * scale
    p = F.softmax(s, dim=-1)
    return torch.matmul(p, _upcast(v)).to(q.dtype)


def patch_embed_visible(imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None,
                        pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """imgs [B, C, H, W], ids_keep [B, K], weight [D, C, p, p] (timm's patch_embed.proj.weight), bias [D]
    or None, pos_embed [L, D] or None -> visible patch embeddings [B, K, D].

    Equal to MAE's `patch_embed(imgs) + pos_embed` followed by keeping the ids_keep tokens, but the
    matrix product runs on the K visible patches only. The conv weight is permuted to [D, (p, q, c)]
    to match the (p, q, c) order of the gathered patch vectors.
    """
    D, p = weight.shape[0], weight.shape[-1]
    patches = patch_gather(imgs, ids_keep, p)
    out = F.linear(patches, weight.permute(0, 2, 3, 1).reshape(D, -1), bias)
    if pos_embed is not None:
        out = out + F.embedding(ids_keep, pos_embed)
    return out
