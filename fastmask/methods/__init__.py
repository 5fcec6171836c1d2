"""Method registry: name -> Method class. Each method file registers itself with `@register_method`."""
from __future__ import annotations

import importlib

from .base import Method

METHODS: dict[str, type[Method]] = {}
_MODULES = ("mae", "extrema", "relaxmim", "adios", "mst")


def register_method(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"fastmask.methods.{mod}")


def get_method(name: str) -> type[Method]:
    _load_all()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def zero_stage_refusal(cfg) -> str | None:
    """The one-line reason the configured method cannot train at cfg.engine.zero_stage, or None: the
    method's own declaration (`Method.supported_zero_stages` / `Method.zero_stage_problem`), read from
    its class and options before anything is built."""
    from ..engine.config import from_dict

    cls = get_method(cfg.method)
    why = cls.zero_stage_problem(from_dict(cls.Args, dict(cfg.method_args), prefix="method_args."),
                                 cfg.engine.zero_stage)
    return f"method {cfg.method} cannot train at engine.zero_stage={cfg.engine.zero_stage}: {why}" if why \
        else None


def build_method(cfg) -> Method:
    """cfg: fastmask.engine.config.Config -> the Method, with cfg.method_args checked against its Args
    (and ConfigError when the method refuses the ZeRO stage)."""
    from ..engine.config import ConfigError, from_dict

    refusal = zero_stage_refusal(cfg)
    if refusal:
        raise ConfigError(refusal)
    cls = get_method(cfg.method)
    args = from_dict(cls.Args, dict(cfg.method_args), prefix="method_args.")
    return cls.from_config(cfg, args)


__all__ = ["Method", "METHODS", "register_method", "get_method", "build_method", "zero_stage_refusal"]
