"""Augmented views made on the batch's device: colour, blur, solarization, and (optionally) the crop.

    aug = ViewAugment(crop_scale=(0.2, 1.0))
    v1, v2 = aug.two_views(imgs, draws=d)        # imgs [B, 3, H, W] normalized -> two [B, 3, H, W]
    aug = ViewAugment(crop_scale=None, blur_p=0.5)
    v = aug(view, draws=d)                       # a view the loader already cut: colour and blur only

The crop belongs in the loader where it can be: `fastmask.data.ViewSpec` lets a method ask the
loader for views cut from the decoded full-resolution image (MST's multi-crop). Cropping here, from
the loader's one already-resized batch, is the fallback for batches that come as one tensor
(synthetic data, direct calls) and ExtreMA's shared crop.

SimCLR/BYOL/DINO-style pipeline on tensors, batched, without host syncs (every random draw is one
tensor op on per-sample keyed `fastmask.draws.Draws`, or keys from an explicit `torch.Generator`,
so a sample's view depends on the sample alone, not on its batch or rank):
1. (crop_scale not None) random resized crop + horizontal flip as one per-sample affine
   `grid_sample` (bilinear, no antialiasing) to `out_size` (default: the input size): area fraction
   ~ U(crop_scale), aspect ratio log-uniform in crop_ratio (3/4, 4/3), crop side clamped to the image
   (torchvision retries out-of-range draws instead; clamping keeps it one kernel);
2. colour jitter with probability `jitter_p`, in [0, 1] pixel space (the normalization is undone
   first): brightness, contrast, saturation, hue, in that fixed order (torchvision shuffles the
   order per sample); hue is a rotation of the chroma plane in YIQ space, a linear 3x3 per sample
   close to torchvision's HSV shift for small angles;
3. grayscale with probability `gray_p`;
4. Gaussian blur with probability `blur_p`, sigma ~ U(blur_sigma) per sample (DINO/BYOL: PIL's
   GaussianBlur(radius=sigma), sigma in (0.1, 2.0)): a separable kernel of fixed length
   2 * ceil(3 * max sigma) + 1 per sample, as two grouped convolutions over the whole batch, edges
   replicated; samples drawn off get the identity kernel;
5. solarize (x >= 0.5 -> 1 - x) with probability `solarize_p`;
6. re-normalize with the same mean/std.
Defaults follow solo-learn's ImageNet-100 scripts (brightness 0.4, contrast 0.4, saturation 0.2,
hue 0.1, p 0.8, grayscale 0.2, no blur), which DINO's `flip_and_color_jitter` shares.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..draws import Draws, as_draws

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
# Inverted once on the CPU: linalg.inv on a GPU tensor would sync on its error check every call.
_YIQ2RGB = torch.linalg.inv(torch.tensor(_RGB2YIQ, dtype=torch.float64)).tolist()


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor, made once per (values, device, dtype): building it per step would copy
    host memory to the GPU every step."""
    return torch.tensor(values, device=device, dtype=dtype)


def _tup(v) -> tuple:
    return tuple(_tup(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclass
class ViewAugment:
    crop_scale: tuple[float, float] | None = (0.2, 1.0)   # None: no crop, no flip (the loader cut it)
    out_size: int | None = None                           # crop output side; None: the input's size
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2
    solarize_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        problems = []
        if self.crop_scale is not None and not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            problems.append(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.crop_scale is None and self.out_size is not None:
            problems.append("out_size needs a crop (crop_scale not None)")
        if self.out_size is not None and self.out_size < 1:
            problems.append(f"out_size must be >= 1, got {self.out_size}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            problems.append(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            problems.append(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        for name in ("jitter_p", "gray_p", "solarize_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            problems.append(f"hue must be in [0, 0.5], got {self.hue}")
        if problems:
            raise ValueError("ViewAugment: " + "; ".join(problems))

    def __call__(self, imgs: torch.Tensor, generator: torch.Generator | None = None,
                 draws: Draws | None = None) -> torch.Tensor:
        """imgs [B, 3, H, W] normalized, float -> one augmented view [B, 3, S, S] (S = out_size, else H x W),
        imgs' dtype."""
        if imgs.dim() != 4 or imgs.shape[1] != 3 or not imgs.is_floating_point():
            raise ValueError(f"ViewAugment expects float imgs [B, 3, H, W], got {imgs.dtype} "
                             f"{tuple(imgs.shape)}")
        B, dev = imgs.shape[0], imgs.device
        # Every per-sample draw at once; column j's value does not depend on how many are drawn.
        u = as_draws(B, draws, generator, dev, "ViewAugment").uniform(14).to(dev)
        x = imgs.float()
        if self.crop_scale is not None:
            x = _crop_flip(x, u[:, :5], self.crop_scale, self.crop_ratio, self.hflip, self.out_size)
        mean = _constant(_tup(self.mean), dev, torch.float32).view(1, 3, 1, 1)
        std = _constant(_tup(self.std), dev, torch.float32).view(1, 3, 1, 1)
        x = (x * std + mean).clamp(0, 1)
        on = (u[:, 5] < self.jitter_p).float()  # jitter factors fall back to identity where off

        def factor(v: torch.Tensor, s: float) -> torch.Tensor:
            return (1 + on * (2 * v - 1) * s).view(B, 1, 1, 1)

        x = (x * factor(u[:, 6], self.brightness)).clamp(0, 1)
        m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - m) * factor(u[:, 7], self.contrast) + m).clamp(0, 1)
        g = _gray(x)
        x = (g + (x - g) * factor(u[:, 8], self.saturation)).clamp(0, 1)
        x = _hue_rotate(x, on * (2 * u[:, 9] - 1) * self.hue).clamp(0, 1)
        gray_on = (u[:, 10] < self.gray_p).view(B, 1, 1, 1)
        x = torch.where(gray_on, _gray(x).expand_as(x), x)
        if self.blur_p > 0:  # a setting, not a tensor: views without blur skip the two convolutions
            lo, hi = self.blur_sigma
            x = gaussian_blur(x, lo + (hi - lo) * u[:, 13], u[:, 12] < self.blur_p, hi)
        sol_on = (u[:, 11] < self.solarize_p).view(B, 1, 1, 1)
        x = torch.where(sol_on & (x >= 0.5), 1 - x, x)
        return ((x - mean) / std).to(imgs.dtype)

    def two_views(self, imgs: torch.Tensor, generator: torch.Generator | None = None,
                  draws: Draws | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs [B, 3, H, W] -> (view1, view2), independent draws of the same pipeline (ADIOS: n_crops 2)."""
        return self(imgs, generator, draws), self(imgs, generator, draws)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = _constant(_tup(_GRAY), x.device, x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, on: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """x [B, C, H, W] float, sigma [B] (<= max_sigma), on [B] bool -> x blurred per sample where `on`.

    Separable Gaussian exp(-t^2 / (2 sigma^2)), t in [-r, r], r = ceil(3 max_sigma), normalized to
    sum 1; edges replicated (PIL extends the border too). Samples off get the kernel [.., 0, 1, 0, ..],
    which returns them unchanged. Two grouped convolutions (one per axis) over all B * C planes.
    """
    B, C, H, W = x.shape
    r = max(1, math.ceil(3 * max_sigma))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype).view(1, -1)
    k = torch.exp(-0.5 * (t / sigma.to(x.dtype).view(-1, 1)) ** 2)
    k = torch.where(on.view(-1, 1), k / k.sum(dim=1, keepdim=True), (t == 0).to(x.dtype))
    k = k.unsqueeze(1).expand(B, C, 2 * r + 1).reshape(B * C, 1, 1, 2 * r + 1)
    y = F.conv2d(F.pad(x.reshape(1, B * C, H, W), (r, r, 0, 0), mode="replicate"), k, groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.transpose(2, 3), groups=B * C)
    return y.view(B, C, H, W)


def _crop_flip(x: torch.Tensor, u: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
               hflip: bool, out_size: int | None = None) -> torch.Tensor:
    """x [B, C, H, W], u [B, 5] uniforms -> crops resized to out_size x out_size (default H x W)
    (affine grid, bilinear)."""
    B = x.shape[0]
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    ratio = logr.exp()
    # Crop width/height as fractions of the image side (normalized coords span 2 = the full side).
    w = (area * ratio).sqrt().clamp(max=1.0)
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - w)
    cy = (2 * u[:, 3] - 1) * (1 - h)
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if hflip else torch.ones_like(w)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    size = list(x.shape) if out_size is None else [B, x.shape[1], out_size, out_size]
    grid = F.affine_grid(theta, size, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _hue_rotate(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """x [B, 3, H, W] RGB in [0, 1], turns [B] (fraction of a full hue circle) -> hue-rotated x."""
    T = _constant(_tup(_RGB2YIQ), x.device, x.dtype)
    Tinv = _constant(_tup(_YIQ2RGB), x.device, x.dtype)
    a = 2 * math.pi * turns.to(x.dtype)
    c, s = a.cos(), a.sin()
    R = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    R[:, 0, 0] = 1
    R[:, 1, 1], R[:, 1, 2], R[:, 2, 1], R[:, 2, 2] = c, -s, s, c
    M = Tinv @ R @ T  # [B, 3, 3]: RGB -> YIQ, rotate chroma, back
    return torch.einsum("bij,bjhw->bihw", M, x)


__all__ = ["ViewAugment", "gaussian_blur", "IMAGENET_MEAN", "IMAGENET_STD"]
