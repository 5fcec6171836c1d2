"""The model registry (timm's `@register_model` pattern): name -> constructor returning an nn.Module."""
from __future__ import annotations

from typing import Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register `fn(**kwargs) -> nn.Module` under `name` (default: the function's name)."""
    def deco(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in MODELS:
            raise ValueError(f"model {key!r} is already registered")
        MODELS[key] = f
        return f
    return deco(fn) if fn is not None else deco


def list_models() -> list[str]:
    return sorted(MODELS)


def check_model_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name` with its keyword arguments (for ViTs: img_size, in_chans,
    drop_path_rate, init_values, backend, ...). Unknown names raise ValueError listing the valid ones."""
    check_model_name(name)
    return MODELS[name](**kwargs)
