"""Backend records and the dispatcher shared by every fused op.

A backend is a record (xformers' style): which devices and dtypes it serves, a `why_not(**inputs)`
that returns the reasons it declines a call, its tolerances per dtype (used by the tests), and the
function that runs it. `select(op, backend, **inputs)`:

- `backend="auto"` (or the FASTMASK_BACKEND environment variable) takes the first backend in the
  device's priority list that has no reasons to decline; `torch` (the reference) always qualifies.
  On CUDA the list comes from the committed table of measured results per GPU architecture
  (benchmarks/results/auto_backends.json, written by `benchmarks/bench_ops.py --update-auto-table`)
  when it has an entry for the op on this GPU's architecture, and from the documented rule (the
  priority lists below, each with the reason it holds) otherwise. `decided_by(op, **inputs)` says which
  figure or rule decided; `python -m fastmask.info` prints it for every op.
- a backend named explicitly that declines raises one `BackendUnavailable` listing the inputs and
  every reason, never a silent fallback.

Backends register themselves from their op modules (`fastmask/ops/<op>.py`); kernel packages
(`fastmask.kernels`, `fastmask._C`) are imported lazily so `import fastmask.ops` stays cheap.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

BACKEND_NAMES = ("auto", "torch", "sdpa", "triton", "cuda", "xformers")
ENV_VAR = "FASTMASK_BACKEND"

# Priority per device type for `auto` (the rule, used where the measured table has no entry). The
# first backend with no reasons wins; `torch` is last. Ops with another order call set_priority
# (patch_gather and norm_pix_loss below, attention in fastmask/ops/attention.py).
DEFAULT_PRIORITY = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("torch",),
}
DEFAULT_RULE = ("rule: triton before the CUDA extension (neither measured on a GPU yet; the Triton kernels "
                "are compile-checked for sm_80/sm_90 and interpreter-tested)")

AUTO_TABLE_ENV = "FASTMASK_AUTO_TABLE"
# In a source checkout (and an editable install) the committed table; set FASTMASK_AUTO_TABLE elsewhere.
DEFAULT_AUTO_TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "auto_backends.json"


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
_RULES: dict[str, str] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY.setdefault(backend.op, {})[backend.name] = backend
    return backend


def set_priority(op: str, priority: dict[str, tuple[str, ...]], rule: str) -> None:
    """Override the per-device `auto` order for one op; `rule` says why (shown by fastmask.info)."""
    _PRIORITY[op] = priority
    _RULES[op] = rule


# patch_gather and norm_pix_loss: their CUDA kernels move whole 16-byte vectors on both sides (a
# shared-memory transpose for the gather, a warp per patch staged in shared memory for the loss), where
# the Triton versions get vectors on the image side only, so they lead until GPU measurements say otherwise.
CUDA_FIRST = {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}
CUDA_FIRST_RULE = ("rule: the CUDA extension (16-byte loads and stores on both sides) before triton, "
                   "until GPU measurements say otherwise")


# ---------------------------------------------------------------- the measured table

_table_state: dict = {}  # "path", "archs" (dict) or "error" (str): loaded once


def auto_table_path() -> Path:
    return Path(os.environ.get(AUTO_TABLE_ENV) or DEFAULT_AUTO_TABLE)


def load_auto_table() -> tuple[dict, str | None]:
    """({arch: {op: entry}}, None), or ({}, why the table is not usable). Read once per process."""
    path = auto_table_path()
    if _table_state.get("path") != path:
        _table_state.clear()
        _table_state["path"] = path
        try:
            archs = json.loads(path.read_text())["archs"]
            if not isinstance(archs, dict):
                raise ValueError("'archs' is not an object")
            _table_state["archs"] = archs
        except FileNotFoundError:
            _table_state["error"] = f"no table at {path}"
        except (OSError, ValueError, KeyError, TypeError) as e:
            _table_state["error"] = f"unreadable table {path}: {e}"
    return _table_state.get("archs", {}), _table_state.get("error")


def cuda_arch(index: int | None = None) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


_choices: dict = {}


@torch.compiler.assume_constant_result
def _auto_choice(op: str, device: str, index: int) -> tuple[tuple[str, ...], str]:
    """(auto's order for `op` on this device, what decided it). Under torch.compile this runs eagerly
    once and its answer is a constant: no graph break, no guard on the file or the GPU query."""
    key = (op, device, index)
    if key not in _choices:
        rule_order = _PRIORITY.get(op, DEFAULT_PRIORITY).get(device, ("torch",))
        choice = (rule_order, f"rule: the {device} order {' > '.join(rule_order)}")
        if device == "cuda":
            rule = _RULES.get(op, DEFAULT_RULE)
            arch = cuda_arch(index if index >= 0 else None)
            archs, error = load_auto_table()
            entry = archs.get(arch, {}).get(op)
            if entry:
                measured = tuple(entry["order"])
                order = measured + tuple(n for n in rule_order if n not in measured)
                choice = (order, f"measured on {arch} ({entry.get('source', auto_table_path().name)}): "
                                 f"{entry.get('figure', 'order ' + ' > '.join(measured))}")
            else:
                why = error or f"no entry for {op} on {arch} in {auto_table_path()}"
                choice = (rule_order, f"{rule} ({why})")
        _choices[key] = choice
    return _choices[key]


def decided_by(op: str, **inputs) -> str:
    """Which measured figure, or which documented rule, sets auto's order for these inputs."""
    _load_optional_backends()
    return _auto_choice(op, *_device_key(inputs))[1]


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
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES} (from argument or "
                         f"${ENV_VAR})")
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
            raise BackendUnavailable(f"{op}: backend {name!r} cannot run ({_describe(inputs)}): "
                                     + "; ".join(reasons))
        return rec
    order = _auto_choice(op, *_device_key(inputs))[0]
    for cand in order:
        rec = table.get(cand)
        if rec is not None and not rec.why_not(**inputs):
            return rec
    return table["torch"]


def explain(op: str, **inputs) -> list[tuple[str, list[str]]]:
    """[(backend, reasons)] for every registered backend of `op`, in auto's order first."""
    _load_optional_backends()
    table = _REGISTRY.get(op, {})
    order = list(_auto_choice(op, *_device_key(inputs))[0])
    order += [n for n in table if n not in order]
    return [(n, table[n].why_not(**inputs)) for n in order if n in table]


def _device_key(inputs: dict) -> tuple[str, int]:
    """(device type, device index or -1) of the first tensor input: what auto's order depends on."""
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            return v.device.type, -1 if v.device.index is None else v.device.index
    return "cpu", -1


_loaded = False
# Modules that register the non-reference backends. Each registers its records even when its
# package (triton, fastmask._C, xformers) is missing; the record's `available()` then says why.
_BACKEND_MODULES = ("fastmask.ops.triton_backend", "fastmask.ops.cuda_backend",
                    "fastmask.ops.xformers_backend")


def _load_optional_backends() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for mod in _BACKEND_MODULES:
        importlib.import_module(mod)
