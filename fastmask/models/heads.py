"""Projection/prediction heads of the siamese methods and DINO's head.

- `MLPHead`: Linear -> norm -> act blocks, then a last Linear. ExtreMA's projector (D -> 4096 ->
  4096 -> 256) and predictor (256 -> 4096 -> 256) use LayerNorm + GELU and xavier init; BYOL/ADIOS
  heads use BatchNorm + ReLU. `norm="bn"` uses BatchNorm1d (fp32 compute under the engine's bf16/fp16
  cast, `batchnorm.py`).
- `DINOHead`: DINO's MLP (GELU, optional BN) to a bottleneck, l2-normalisation, and a weight-normed
  last layer without bias whose gain is frozen at 1 (`norm_last_layer=True`, DINO's default).

All take x [B, in_dim] (or [..., in_dim] for the LayerNorm/no-norm heads) and return [B, out_dim].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import BatchNorm1d
from .blocks import init_mae_weights

_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}
_NORMS = ("ln", "bn", "none")


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "ln":
        return nn.LayerNorm(dim)
    if kind == "bn":
        return BatchNorm1d(dim)
    return nn.Identity()


def _check(in_dim, hidden_dim, out_dim, num_layers, norm, act) -> None:
    problems = []
    if min(in_dim, hidden_dim, out_dim) < 1:
        problems.append(f"dims must be >= 1, got in={in_dim}, hidden={hidden_dim}, out={out_dim}")
    if num_layers < 1:
        problems.append(f"num_layers must be >= 1, got {num_layers}")
    if norm not in _NORMS:
        problems.append(f"norm must be one of {_NORMS}, got {norm!r}")
    if act not in _ACTS:
        problems.append(f"act must be one of {tuple(_ACTS)}, got {act!r}")
    if problems:
        raise ValueError("; ".join(problems))


# Children's weights are initialised through `Module.apply`, one module at a time (see models/__init__).
def _init_trunc_normal_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


class MLPHead(nn.Module):
    """x [B, in_dim] -> [B, out_dim]: (num_layers - 1) x [Linear, norm, act], then Linear
    (then `norm` without affine when `last_norm`, MoCo-v3's projector ending).

    norm: "ln" | "bn" | "none"; act: "gelu" | "relu". Linear weights xavier-uniform, biases zero
    (ExtreMA's init).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, norm: str = "ln",
                 act: str = "gelu", last_norm: bool = False):
        super().__init__()
        _check(in_dim, hidden_dim, out_dim, num_layers, norm, act)
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim), _norm(norm, hidden_dim), _ACTS[act]()]
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim))
        if last_norm and norm == "bn":
            layers.append(BatchNorm1d(out_dim, affine=False))
        elif last_norm and norm == "ln":
            layers.append(nn.LayerNorm(out_dim, elementwise_affine=False))
        self.mlp = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
        self.mlp.apply(init_mae_weights)  # xavier Linears, zero biases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.mlp[0].in_features:
            raise ValueError(f"MLPHead expects [..., {self.mlp[0].in_features}], got {tuple(x.shape)}")
        if any(isinstance(m, nn.BatchNorm1d) for m in self.mlp) and x.dim() > 2:
            return self.mlp(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        return self.mlp(x)


class WeightNormLinear(nn.Module):
    """x [..., in] -> [..., out]: x @ (g * v / ||v||_row)^T, no bias (DINO's weight-normed last layer).

    Parameters `weight_v` [out, in] and `weight_g` [out, 1] (the names torch's weight_norm used);
    `freeze_g` keeps g = 1 (DINO's norm_last_layer), so only directions are learned. Setting
    `frozen = True` detaches the weights (DINO's cancel_gradients_last_layer in the first epoch):
    they get no gradient and the optimizer leaves them alone.
    """

    def __init__(self, in_features: int, out_features: int, freeze_g: bool = True):
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.trunc_normal_(v, std=0.02)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not freeze_g)
        self.frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, v = (self.weight_g.detach(), self.weight_v.detach()) if self.frozen \
            else (self.weight_g, self.weight_v)
        w = g * F.normalize(v, dim=1)
        return F.linear(x, w.to(x.dtype))


class DINOHead(nn.Module):
    """x [B, in_dim] -> logits [B, out_dim] (DINO, MST).

    MLP of `num_layers` Linears (GELU, BatchNorm if `use_bn`) from in_dim through hidden_dim to
    bottleneck_dim, l2-normalise, then `WeightNormLinear(bottleneck_dim, out_dim)`. Linears
    trunc-normal(0.02) with zero bias, as DINO.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        _check(in_dim, hidden_dim, out_dim, num_layers, "bn" if use_bn else "none", "gelu")
        if bottleneck_dim < 1:
            raise ValueError(f"bottleneck_dim must be >= 1, got {bottleneck_dim}")
        if num_layers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(num_layers - 2):
                layers += ([BatchNorm1d(hidden_dim)] if use_bn else []) \
                    + [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
            layers += ([BatchNorm1d(hidden_dim)] if use_bn else []) \
                + [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_trunc_normal_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_g=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.mlp[0].in_features:
            raise ValueError(f"DINOHead expects [B, {self.mlp[0].in_features}], got {tuple(x.shape)}")
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype != torch.float32 else 1e-12)
        return self.last_layer(x)


__all__ = ["MLPHead", "DINOHead", "WeightNormLinear"]
