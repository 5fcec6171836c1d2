"""Backend records and the dispatcher shared by every fused op.

A backend is a record (xformers' style): which devices and dtypes it serves, a `why_not(**inputs)`
that returns the reasons it declines a call, its tolerances per dtype (used by the tests), and the
function that runs it. `select(op, backend, **inputs)`:

- `backend="auto"` (or the FASTMASK_BACKEND environment variable) takes the first backend in the
  device's priority list that has no reasons to decline; `torch` (the reference) always qualifies.
- a backend named explicitly that declines raises one `BackendUnavailable` listing the inputs and
  every reason, never a silent fallback.

Backends register themselves from their op modules (`fastmask/ops/<op>.py`); kernel packages
(`fastmask.kernels`, `fastmask._C`) are imported lazily so `import fastmask.ops` stays cheap.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

BACKEND_NAMES = ("auto", "torch", "sdpa", "triton", "cuda", "xformers")
ENV_VAR = "FASTMASK_BACKEND"

# Priority per device type for `auto`. The first backend with no reasons wins; `torch` is last.
# Attention has its own list (fastmask/ops/attention.py).
# Triton leads the CUDA extension until GPU results of both are committed (benchmarks/results/):
# the Triton kernels are compile-checked for sm_80/sm_90 and interpreter-tested; the CUDA kernels
# have not yet run on a GPU either, so neither order is measured yet.
DEFAULT_PRIORITY = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("torch",),
}


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run these inputs; the message says why."""


@dataclass(frozen=True)
class Backend:
    """What one implementation of one op supports.

    `available()` returns a reason string when the backend cannot run at all on this machine (the
    package is missing, the extension was not built), else None. `why_not(**inputs)` returns the
    reasons it declines these particular inputs (device, dtype, shape limits).
    """

    op: str
    name: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    available: Callable[[], str | None] = lambda: None
    why_not_extra: Callable[..., list[str]] = lambda **_: []
    # (atol, rtol) per dtype against the fp32 reference; tests read these, not literals.
    tolerances: dict = field(default_factory=lambda: {
        torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2),
    })
    deterministic: bool = True
    # Which input tensor decides device and dtype.
    key_input: str = ""

    def why_not(self, **inputs) -> list[str]:
        reason = self.available()
        if reason:
            return [reason]
        reasons: list[str] = []
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        key = tensors.get(self.key_input) if self.key_input else next(iter(tensors.values()), None)
        if key is not None:
            if key.device.type not in self.devices:
                reasons.append(f"device {key.device.type} not in {self.devices}")
            if key.dtype not in self.dtypes:
                reasons.append(f"dtype {key.dtype} not in {[str(d) for d in self.dtypes]}")
        if not reasons:
            reasons.extend(self.why_not_extra(**inputs))
        return reasons


_REGISTRY: dict[str, dict[str, Backend]] = {}
_PRIORITY: dict[str, dict[str, tuple[str, ...]]] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY.setdefault(backend.op, {})[backend.name] = backend
    return backend


def set_priority(op: str, priority: dict[str, tuple[str, ...]]) -> None:
    """Override the per-device `auto` order for one op (attention uses this)."""
    _PRIORITY[op] = priority


def backends_for(op: str) -> dict[str, Backend]:
    _load_optional_backends()
    return dict(_REGISTRY.get(op, {}))


def _describe(inputs: dict) -> str:
    parts = []
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            parts.append(f"{k}={tuple(v.shape)} {str(v.dtype).replace('torch.', '')} {v.device.type}")
        else:
            parts.append(f"{k}={v!r}")
    return ", ".join(parts)


def resolve_name(backend: str | None) -> str:
    name = backend or "auto"
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES} (from argument or ${ENV_VAR})")
    return name


def select(op: str, backend: str | None = "auto", **inputs) -> Backend:
    """Pick the backend that runs `op` on `inputs`; see the module docstring for the rules."""
    _load_optional_backends()
    name = resolve_name(backend)
    table = _REGISTRY.get(op)
    if not table:
        raise KeyError(f"no backends registered for op {op!r}")
    if name != "auto":
        rec = table.get(name)
        if rec is None:
            raise BackendUnavailable(
                f"{op}: backend {name!r} is not implemented for this op (implemented: {sorted(table)})")
        reasons = rec.why_not(**inputs)
        if reasons:
            raise BackendUnavailable(f"{op}: backend {name!r} cannot run ({_describe(inputs)}): " + "; ".join(reasons))
        return rec
    device = _device_of(inputs)
    order = _PRIORITY.get(op, DEFAULT_PRIORITY).get(device, ("torch",))
    for cand in order:
        rec = table.get(cand)
        if rec is not None and not rec.why_not(**inputs):
            return rec
    return table["torch"]


def explain(op: str, **inputs) -> list[tuple[str, list[str]]]:
    """[(backend, reasons)] for every registered backend of `op`, in auto's order first."""
    _load_optional_backends()
    table = _REGISTRY.get(op, {})
    device = _device_of(inputs)
    order = list(_PRIORITY.get(op, DEFAULT_PRIORITY).get(device, ("torch",)))
    order += [n for n in table if n not in order]
    return [(n, table[n].why_not(**inputs)) for n in order if n in table]


def _device_of(inputs: dict) -> str:
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            return v.device.type
    return "cpu"


_loaded = False
# Modules that register the non-reference backends. Each registers its records even when its
# package (triton, fastmask._C, xformers) is missing; the record's `available()` then says why.
_BACKEND_MODULES = ("fastmask.ops.triton_backend", "fastmask.ops.cuda_backend", "fastmask.ops.xformers_backend")


def _load_optional_backends() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for mod in _BACKEND_MODULES:
        importlib.import_module(mod)
