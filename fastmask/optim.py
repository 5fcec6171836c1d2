"""Optimizers by name, and the optimizer of a part of a method that trains outside the engine's.

    opt = build_optimizer("lars", groups, lr=0.1, OptimizerSettings(momentum=0.9, lars_eta=0.02))
    side = SideOptimizer(groups, "lars", settings)
    side.step(grads, lr)            # grads in group order; all-reduced over the ranks first

`build_optimizer` is the one place an optimizer is made from its name: the engine's (DeepSpeed is
handed it) and a method's own (`SideOptimizer`) come from here, so both follow one recipe.
- adamw: torch's AdamW (its fused kernel, on CUDA and CPU), eps 1e-8;
- apex_fused_adam: NVIDIA apex's FusedAdam in AdamW mode (CUDA only; apex is not on PyPI);
- sgd: torch's SGD with momentum (solo-learn's `--optimizer sgd`: momentum 0.9, no dampening);
- lars: SGD with LARS layer-wise trust ratios, timm's `timm.optim.Lars` (timm is an optional extra).
  `trust_coeff = lars_eta`, `trust_clip = lars_clip`: the ratio eta * |w| / (|g| + wd * |w|) is
  divided by the group's lr and clipped at 1, the update is (g + wd * w) * ratio; groups with weight
  decay 0 are neither decayed nor adapted. Given the 1-D parameters (biases, norms) in a group of
  their own with weight decay 0, this is solo-learn's `LARSWrapper(SGD, eta, clip=True,
  exclude_bias_n_norm=True)`, which ADIOS trains with by default (`--lars` defaults to true there).

`SideOptimizer` exists for ADIOS's alternating scheme (see fastmask.methods.adios): the occluder is
stepped by its own optimizer after the engine's step. It averages the gradients over the data-parallel
ranks itself (one all-reduce of the flattened gradients), keeps fp32 master weights when the engine
has cast the parameters to bf16/fp16 (DeepSpeed casts the whole module, and only its own optimizer
keeps fp32 copies), and saves its state (optimizer state and masters) as the module's extra state, so
a DeepSpeed checkpoint carries it and a resume continues exactly. The state is the same on every rank
(the gradients are averaged first), so it does not depend on the world size.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

OPTIMIZERS = ("adamw", "apex_fused_adam", "sgd", "lars")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Per-kind hyper-parameters (the engine config's betas / momentum / lars_eta / lars_clip)."""
    betas: tuple[float, float] = (0.9, 0.95)   # adamw, apex_fused_adam
    momentum: float = 0.9                       # sgd, lars
    lars_eta: float = 0.02                      # lars trust coefficient (ADIOS/solo-learn: 0.02)
    lars_clip: bool = True                      # lars: clip ratio / lr at 1 (LARC)

    @classmethod
    def of(cls, engine) -> "OptimizerSettings":
        """From an engine config (`fastmask.engine.config.EngineConfig`, or anything with its fields)."""
        return cls(tuple(engine.betas), engine.momentum, engine.lars_eta, engine.lars_clip)


def build_optimizer(name: str, groups: list[dict], lr: float,
                    settings: OptimizerSettings = OptimizerSettings(),
                    device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """groups: torch param groups (their own `weight_decay`) -> the optimizer `name` (see `OPTIMIZERS`).

    Raises ValueError with one line (unknown name, apex/timm missing, apex without CUDA)."""
    device = torch.device(device)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(settings.betas), eps=1e-8,
                                 fused=device.type in ("cuda", "cpu"))
    if name == "apex_fused_adam":
        if device.type != "cuda":
            raise ValueError("optimizer=apex_fused_adam needs a CUDA device; use adamw")
        try:
            from apex.optimizers import FusedAdam
        except ImportError as err:
            raise ValueError(f"optimizer=apex_fused_adam but NVIDIA apex is not importable ({err}); it is "
                             "not on PyPI: build it from NVIDIA's repository, or use adamw") from err
        return FusedAdam(groups, lr=lr, betas=tuple(settings.betas), eps=1e-8, adam_w_mode=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=settings.momentum)
    if name == "lars":
        try:
            from timm.optim import Lars
        except ImportError as err:
            raise ValueError(f"optimizer=lars uses timm's Lars, and timm is not importable ({err}); "
                             "install the extra: pip install 'fastmask[timm]'") from err
        return Lars(groups, lr=lr, momentum=settings.momentum, trust_coeff=settings.lars_eta,
                    trust_clip=settings.lars_clip)
    raise ValueError(f"optimizer must be one of {'|'.join(OPTIMIZERS)}, got {name!r}")


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SideOptimizer(nn.Module):
    """Steps a set of parameters with its own optimizer, outside the engine's (DeepSpeed) optimizer.

    groups: [{"params": [...], "weight_decay": wd, "lr_scale": s}, ...] (lr_scale defaults to 1);
    name, settings: the optimizer kind (`build_optimizer`). `step(grads, lr)` sets each group's lr to
    lr * lr_scale. The parameters are held by reference, not registered (they stay where they live in
    the module tree); the optimizer is made at the first step or state load, when the engine has given
    the parameters their final dtype and device.
    """

    def __init__(self, groups: list[dict[str, Any]], name: str,
                 settings: OptimizerSettings = OptimizerSettings()):
        super().__init__()
        if name not in OPTIMIZERS:
            raise ValueError(f"SideOptimizer: optimizer must be one of {'|'.join(OPTIMIZERS)}, got {name!r}")
        self.name, self.settings = name, settings
        self._opt: torch.optim.Optimizer | None = None
        self._masters: list[torch.Tensor | None] = []
        self.set_groups(groups)

    def set_groups(self, groups: list[dict[str, Any]]) -> None:
        """Replace the groups (their hyper-parameters, e.g. the engine's weight decay) before the first
        step."""
        if self._opt is not None:
            raise RuntimeError("SideOptimizer.set_groups after its optimizer was made (a step or a state "
                               "load)")
        self._groups = [{**g, "params": list(g["params"])} for g in groups]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for g in self._groups for p in g["params"]]

    def _build(self) -> torch.optim.Optimizer:
        if self._opt is None:
            # fp32 parameters are stepped in place; reduced-precision ones through fp32 masters.
            self._masters = [p.detach().float().clone() if p.dtype != torch.float32 else None
                             for p in self.params]
            targets = iter([p if m is None else m for p, m in zip(self.params, self._masters)])
            device = self.params[0].device if self.params else "cpu"
            self._opt = build_optimizer(self.name, [{**g, "params": [next(targets) for _ in g["params"]]}
                                                    for g in self._groups], 0.0, self.settings, device)
        return self._opt

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        """grads: one per parameter (group order), this rank's; averaged over the ranks, then one step."""
        params = self.params
        if len(grads) != len(params):
            raise ValueError(f"SideOptimizer.step: {len(grads)} gradients for {len(params)} parameters")
        opt = self._build()
        world = _world()
        if world > 1:
            flat = torch.cat([g.float().reshape(-1) for g in grads])
            dist.all_reduce(flat)
            grads = list((flat / world).split([g.numel() for g in grads]))
        for p, m, g in zip(params, self._masters, grads):
            target = p if m is None else m
            if m is not None:
                # Adopt values written into the parameter from outside (a weights load) without a host
                # sync: keep the master wherever it still rounds to the parameter.
                m.copy_(torch.where(m.to(p.dtype) == p, m, p.float()))
            target.grad = g.reshape(p.shape).to(target.dtype)
        for group, spec in zip(opt.param_groups, self._groups):
            group["lr"] = lr * spec.get("lr_scale", 1.0)
        opt.step()
        for p, m in zip(params, self._masters):
            if m is not None:
                p.copy_(m)
                m.grad = None
            p.grad = None  # never left for the engine's clipping or its next step to see

    def get_extra_state(self) -> dict:
        """A snapshot (copies, not the live buffers the next step would change)."""
        if self._opt is None:
            return {"optimizer": None, "masters": None}
        return {"optimizer": copy.deepcopy(self._opt.state_dict()),
                "masters": [None if m is None else m.clone() for m in self._masters]}

    def set_extra_state(self, state: dict) -> None:
        if state.get("optimizer") is None:
            self._opt = None
            return
        self._opt = None
        opt = self._build()
        saved = state.get("masters") or [None] * len(self.params)
        with torch.no_grad():
            for i, (p, m, s) in enumerate(zip(self.params, self._masters, saved)):
                if s is None:
                    continue
                if m is None:
                    p.copy_(s)  # saved from a reduced-precision run, resumed in fp32: the masters are exact
                else:
                    m.copy_(s)
                    p.copy_(m)
        opt.load_state_dict(state["optimizer"])


__all__ = ["OPTIMIZERS", "OptimizerSettings", "build_optimizer", "SideOptimizer"]
