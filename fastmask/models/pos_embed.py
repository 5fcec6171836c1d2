"""Fixed 2-D sine-cosine position embeddings, MAE's formula (facebookresearch/mae util/pos_embed.py).

For a grid of h rows and w columns and width D (D % 4 == 0), the embedding of the patch at
(row i, col j), row-major index i*w + j, is

    [ sin(j * omega), cos(j * omega), sin(i * omega), cos(i * omega) ],  omega_k = 10000^(-k / (D/4)),
    k = 0 .. D/4 - 1.

The column index comes first: the official code builds `meshgrid(grid_w, grid_h)` and encodes
`grid[0]` (the column coordinate) in the first half. The computation runs in fp32 like the official
numpy code. With `cls_token=True` an all-zero row is prepended for the class token.
"""
from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos [M] -> [M, embed_dim]: [sin(pos * omega), cos(pos * omega)], embed_dim even."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float32, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1).float()[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False,
              device: torch.device | str | None = None) -> torch.Tensor:
    """-> [h*w (+1), embed_dim] fp32: MAE's `get_2d_sincos_pos_embed`, rows in row-major patch order,
    plus a leading zero row for the class token when `cls_token`. embed_dim must be a multiple of 4."""
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {embed_dim}")
    rows = torch.arange(h, dtype=torch.float32, device=device)
    cols = torch.arange(w, dtype=torch.float32, device=device)
    ii, jj = torch.meshgrid(rows, cols, indexing="ij")  # [h, w] each, row-major
    emb = torch.cat([sincos_1d(embed_dim // 2, jj), sincos_1d(embed_dim // 2, ii)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, device=emb.device), emb], dim=0)
    return emb
