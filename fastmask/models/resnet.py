"""ResNet-18 backbone for the CNN path (ADIOS), torchvision's layout and parameter names.

    net = resnet18(small_stem=True)         # 3x3 stride-1 stem, no max-pool: for 32-64 px images
    feats = net(imgs)                       # imgs [B, 3, H, W] -> pooled features [B, 512]
    tokens = net.forward_features(imgs)     # -> [B, 1 + h*w, 512]: pooled "cls" slot + spatial map

Parameter names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, ..., `downsample.0/1`) so a
torchvision state dict loads with `strict=False` (only `fc.*` is absent: the backbone has no
classifier). Written here so the package does not depend on torchvision.

The small-image stem is solo-learn's CIFAR variant as ADIOS builds it (`src/methods/base.py`:
Conv3x3 stride 1 *padding 2*, no max-pool, so a 32 px image gives 34 px maps): the standard stem
(Conv7x7 stride 2 + max-pool) would shrink a 32 px image to 8 px before the first stage.
Init as torchvision: kaiming-normal (fan_out) convs, BN weight 1 / bias 0. The BatchNorm layers compute
in fp32 under the engine's bf16/fp16 cast (`batchnorm.py`).
"""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register_model
from .batchnorm import BatchNorm2d


class BasicBlock(nn.Module):
    """x [B, cin, H, W] -> [B, cout, H/stride, W/stride]: two Conv3x3-BN with a residual, ReLU after the
    sum."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _init_resnet(m: nn.Module) -> None:
    """torchvision's ResNet init for one module (for `apply`): kaiming-normal convs (fan_out), BatchNorm
    1/0."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """A BasicBlock ResNet without classifier. `num_features` = `embed_dim` = 512 for ResNet-18."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), in_chans: int = 3, small_stem: bool = False,
                 widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        self.small_stem = small_stem
        w0 = widths[0]
        if small_stem:
            self.conv1 = nn.Conv2d(in_chans, w0, 3, 1, 2, bias=False)  # padding 2, as ADIOS's CIFAR stem
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, w0, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        cin = w0
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.num_layers = len(layers)
        self.num_features = self.embed_dim = cin
        self.patch_size = None  # pixel masks only: no patch grid for token-level masking
        self.apply(_init_resnet)  # children's weights: through apply (see models/__init__)

    def feature_map(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> last-stage map [B, 512, h, w] (h = ceil(H/32), or ceil((H+2)/8) with the
        small stem)."""
        if imgs.dim() != 4:
            raise ValueError(f"ResNet expects imgs [B, C, H, W], got {tuple(imgs.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(imgs))))
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> tokens [B, 1 + h*w, 512]: slot 0 is the global average pool (the
        ViT's cls position, so evaluators taking `[:, 0]` work for both backbones), then the map."""
        fmap = self.feature_map(imgs).flatten(2).transpose(1, 2)
        return torch.cat([fmap.mean(dim=1, keepdim=True), fmap], dim=1)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> globally pooled features [B, 512]."""
        return self.feature_map(imgs).mean(dim=(2, 3))

    def no_weight_decay(self) -> set[str]:
        return set()


SMALL_STEM_MAX_SIZE = 64


@register_model
def resnet18(small_stem: bool | None = None, img_size: int | None = None, in_chans: int = 3,
             width: int = 64) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2], 11.2M parameters without fc at width 64).

    width: channels of the first stage (stages use width x (1, 2, 4, 8)); below 64 it is a narrow
    ResNet-18 for CPU tests and smoke runs (features width * 8).
    small_stem None = automatic: the small stem for img_size <= 64 (CIFAR-like inputs, as
    solo-learn's `cifar` switch), the ImageNet stem otherwise (solo-learn keeps it at 96 px for
    STL-10 / ImageNet-100-S). img_size only drives that choice: the network takes any size.
    """
    if small_stem is None:
        small_stem = img_size is not None and img_size <= SMALL_STEM_MAX_SIZE
    if width < 1:
        raise ValueError(f"resnet18: width must be >= 1, got {width}")
    return ResNet((2, 2, 2, 2), in_chans=in_chans, small_stem=small_stem,
                  widths=tuple(width * m for m in (1, 2, 4, 8)))


__all__ = ["ResNet", "BasicBlock", "resnet18"]
