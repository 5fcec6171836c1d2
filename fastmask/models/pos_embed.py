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


def resize_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int], new_grid: tuple[int, int],
                     num_prefix_tokens: int = 1) -> torch.Tensor:
    """pos_embed [1, prefix + h*w, D] (row-major patches after the prefix rows) -> [1, prefix + h'*w', D].

    The patch rows, as a [D, h, w] image, are resized bicubically to `new_grid` (align_corners False,
    no antialias), prefix rows kept: DINO's `interpolate_pos_encoding`, which lets a ViT built for
    224 px take its 96 px local crops (a 6x6 grid covering the same extent as the 14x14 one). DINO
    passes a scale factor nudged by 0.1; giving the output size maps every output patch centre onto
    the same extent exactly. The same grid returns `pos_embed` itself.
    """
    h, w = grid_size
    if tuple(new_grid) == (h, w):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = patches.shape[-1]
    grid = patches.reshape(1, h, w, D).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
