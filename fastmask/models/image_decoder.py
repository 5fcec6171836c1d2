"""MST's global image decoder: every patch token back to the whole image.

MST (Li et al. 2021) restores the full image from the student's masked and unmasked tokens with a
light convolutional decoder; the paper gives no layer list, so this one is ours [unverified]:

    tokens [B, L, D] -> [B, D, h, w] -> 1x1 conv to `width` channels
      -> per upsampling stage: ConvTranspose2d(k=s, stride=s) + GroupNorm(1) + GELU, halving channels
         (stages: one x2 per factor 2 of the patch size, then one x(rest) for an odd remainder,
         e.g. 7 for p = 14)
      -> 3x3 conv to `out_chans` -> image [B, out_chans, h*p, w*p]

For p = 16 that is four x2 stages (14 -> 224 px). The output is in the input's normalised space.
"""
from __future__ import annotations

import torch
from torch import nn


def _stages(patch_size: int) -> list[int]:
    out, p = [], patch_size
    while p % 2 == 0 and p > 1:
        out.append(2)
        p //= 2
    if p > 1:
        out.append(p)
    return out


class ImageDecoder(nn.Module):
    """tokens [B, L, D] (patch tokens only, row-major) -> image [B, out_chans, h*p, w*p]."""

    def __init__(self, embed_dim: int, patch_size: int, grid_size: tuple[int, int], out_chans: int = 3,
                 width: int = 256, min_width: int = 32):
        super().__init__()
        if patch_size < 1 or embed_dim < 1 or width < 1:
            raise ValueError(f"patch_size, embed_dim, width must be >= 1, got {patch_size}, {embed_dim}, "
                             f"{width}")
        self.embed_dim, self.patch_size, self.grid_size = embed_dim, patch_size, tuple(grid_size)
        layers: list[nn.Module] = [nn.Conv2d(embed_dim, width, kernel_size=1)]
        c = width
        for s in _stages(patch_size):
            c_out = max(c // 2, min_width)
            layers += [nn.ConvTranspose2d(c, c_out, kernel_size=s, stride=s), nn.GroupNorm(1, c_out),
                       nn.GELU()]
            c = c_out
        layers.append(nn.Conv2d(c, out_chans, kernel_size=3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, L, D = tokens.shape
        h, w = self.grid_size
        if L != h * w or D != self.embed_dim:
            raise ValueError(f"ImageDecoder expects [B, {h * w}, {self.embed_dim}] patch tokens, got "
                             f"{tuple(tokens.shape)}")
        x = tokens.transpose(1, 2).reshape(B, D, h, w)
        return self.net(x)


__all__ = ["ImageDecoder"]
