"""The ADIOS occluder: a small U-Net (adapted by ADIOS from GENESIS) and its N-slot mask head.

    occ = Occluder(img_size=96, num_masks=6, fbase=32, norm="in")
    masks = occ(imgs)            # imgs [B, 3, 96, 96] -> masks [B, 6, 96, 96], sum over slots = 1

Layout (YugeTen/adios `src/utils/unet.py`, GENESIS):
- num_blocks = int(log2(img_size) - 1): 6 blocks at 224 px, 5 at 64-96 px, 4 at 32 px (the rule of
  the official SimCLR/BYOL code; its SimSiam code takes `--num_blocks`, default 4).
- Block: Conv3x3 stride 1 pad 1 -> norm -> ReLU. The conv has no bias when a norm follows it
  (`gn`: GroupNorm(8), `in`: InstanceNorm(affine)); with `none` it keeps its bias (nothing else
  would shift the pre-activation).
- Encoder channels [c]*(nb-3) + [2c]*3 (for 6 blocks [c, c, c, 2c, 2c, 2c]), nearest x0.5 after every
  block but the last, so the bottleneck is s = img / 2^(nb-1) pixels wide (7 at 224, 6 at 96).
- Bottleneck MLP: flatten 2c*s*s -> 128 -> 128 -> 2c*s*s, ReLU after each (the last ReLU too, as
  the official code does).
- Decoder: concat with the mirrored skip, a block, nearest x2 (not after the last); channels
  [2c, 2c] + [c]*(nb-2).
- Mask head: Conv1x1(c -> N), softmax over the N slots at every pixel, so the N soft masks
  partition the image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("gn", "in", "none")


def num_unet_blocks(img_size: int) -> int:
    """ADIOS's depth rule: int(log2(img_size) - 1) (6 at 224 px, 5 at 64 and 96 px, 4 at 32 px)."""
    return int(math.log2(img_size) - 1)


class ConvNormReLU(nn.Sequential):
    """x [B, cin, H, W] -> [B, cout, H, W]: Conv3x3 (bias only without norm) -> norm -> ReLU."""

    def __init__(self, cin: int, cout: int, norm: str = "in", groups: int = 8):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, 1, 1, bias=norm == "none")]
        if norm == "gn":
            layers.append(nn.GroupNorm(groups, cout))
        elif norm == "in":
            layers.append(nn.InstanceNorm2d(cout, affine=True))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    """imgs [B, in_chans, S, S] -> features [B, fbase, S, S] (S = img_size, fixed at construction).

    Raises ValueError for an image size the nearest down/up-sampling cannot invert exactly
    (img_size must be divisible by 2^(num_blocks-1)) or a norm outside gn | in | none.
    """

    def __init__(self, img_size: int, fbase: int = 32, in_chans: int = 3, norm: str = "in",
                 num_blocks: int | None = None):
        super().__init__()
        nb = num_unet_blocks(img_size) if num_blocks is None else num_blocks
        problems = []
        if norm not in NORMS:
            problems.append(f"norm must be one of {NORMS}, got {norm!r}")
        if nb < 3:
            problems.append(f"need >= 3 U-Net blocks, got {nb}" + (f" from img_size {img_size} (>= 16 needed)"
                                                                   if num_blocks is None else ""))
        elif img_size % 2 ** (nb - 1):
            problems.append(f"img_size {img_size} is not divisible by 2^(num_blocks-1) = {2 ** (nb - 1)}")
        if norm == "gn" and fbase % 8:
            problems.append(f"GroupNorm(8) needs fbase divisible by 8, got {fbase}")
        if problems:
            raise ValueError("UNet: " + "; ".join(problems))
        c = fbase
        enc_out = [c] * (nb - 3) + [2 * c] * 3
        enc_in = [in_chans] + enc_out[:-1]
        dec_out = [2 * c, 2 * c] + [c] * (nb - 2)
        # Each decoder block sees the previous decoder output (the MLP's 2c first) + the mirrored skip.
        dec_in = [prev + skip for prev, skip in zip([2 * c] + dec_out[:-1], enc_out[::-1])]
        self.img_size, self.num_blocks, self.out_chans = img_size, nb, c
        self.down = nn.ModuleList(ConvNormReLU(i, o, norm) for i, o in zip(enc_in, enc_out))
        self.up = nn.ModuleList(ConvNormReLU(i, o, norm) for i, o in zip(dec_in, dec_out))
        self.s = img_size // 2 ** (nb - 1)
        flat = 2 * c * self.s * self.s
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(),
                                 nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, flat), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"UNet built for [B, C, {self.img_size}, {self.img_size}] inputs, got "
                             f"{tuple(x.shape)}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            skips.append(x)
            if i < self.num_blocks - 1:
                x = F.interpolate(x, scale_factor=0.5, mode="nearest")
        x = self.mlp(x).view(x.shape[0], -1, self.s, self.s)
        for i, block in enumerate(self.up):
            x = block(torch.cat([x, skips[-1 - i]], dim=1))
            if i < self.num_blocks - 1:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x


class Occluder(nn.Module):
    """imgs [B, 3, S, S] (normalized) -> soft masks [B, N, S, S] fp32|input dtype, softmax over N.

    `UNet` followed by ADIOS's mask head (Conv1x1 fbase -> N, softmax over the slot dimension):
    every pixel's N values are >= 0 and sum to 1. num_blocks: the U-Net's depth (None: the
    `num_unet_blocks` rule; ADIOS's SimSiam scripts pass 4).
    """

    def __init__(self, img_size: int, num_masks: int = 4, fbase: int = 32, norm: str = "in",
                 in_chans: int = 3, num_blocks: int | None = None):
        super().__init__()
        if num_masks < 1:
            raise ValueError(f"Occluder: num_masks must be >= 1, got {num_masks}")
        self.num_masks = num_masks
        self.unet = UNet(img_size, fbase=fbase, in_chans=in_chans, norm=norm, num_blocks=num_blocks)
        self.head = nn.Conv2d(fbase, num_masks, 1)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.unet(imgs)).softmax(dim=1)


__all__ = ["UNet", "Occluder", "ConvNormReLU", "num_unet_blocks", "NORMS"]
