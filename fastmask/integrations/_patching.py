"""What the integrations share: swapping one module's forward for a fused one, undoing it, reporting it.

A patch sets an instance attribute `forward` (`functools.partial(fused_forward, module)`: unlike a
bound method it pickles, and `inspect.signature` still shows the forward's own arguments, which
HF's Trainer reads) next to the module's op -> backend table; the class, the parameters and the
state_dict keys stay as they are (so `isinstance`, `copy.deepcopy`, `torch.save(model)`, optimizers
and checkpoints see the original model), and `revert` deletes the two attributes, which brings back
the class's own forward.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, Iterable

from torch import nn

from ..ops.backends import resolve_name, select

_BACKENDS = "_fastmask_backends"


@dataclasses.dataclass
class PatchReport:
    """What `apply_fastmask` did to a model.

    patched: (module name, what now runs through fastmask) per patched module.
    left_alone: (module name, why) per recognized module that keeps its original forward.
    fallbacks: conditions under which a patched module runs its original forward for one call
    (each also warns once when it happens).
    """

    library: str
    backend: str
    ops: tuple[str, ...]
    patched: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    left_alone: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    fallbacks: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastmask -> {self.library}: {len(self.patched)} modules patched "
                 f"(ops {', '.join(self.ops)}, backend {self.backend!r}), {len(self.left_alone)} left alone"]
        lines += [f"  patched     {what}: {names}" for what, names in _grouped(self.patched)]
        lines += [f"  left alone  {why}: {names}" for why, names in _grouped(self.left_alone)]
        lines += [f"  original forward when {cond}" for cond in self.fallbacks]
        return "\n".join(lines)


def _grouped(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """[(name, text)] -> [(text, "name, name, ...")], first-seen order; long lists shortened."""
    groups: dict[str, list[str]] = {}
    for name, text in entries:
        groups.setdefault(text, []).append(name or "(model)")
    return [(text, ", ".join(n) if len(n) <= 4 else f"{len(n)} modules ({n[0]}, {n[1]}, ..., {n[-1]})")
            for text, n in groups.items()]


def check_apply_args(model: nn.Module, ops: Iterable[str], all_ops: tuple[str, ...], backend: str,
                     integration: str) -> tuple[str, ...]:
    """Validate apply_fastmask's arguments; raise one ValueError naming every problem, before any work."""
    problems = []
    if not isinstance(model, nn.Module):
        problems.append(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ops = tuple(ops) if not isinstance(ops, str) else (ops,)
    unknown = [o for o in ops if o not in all_ops]
    if unknown:
        problems.append(f"unknown ops {unknown}; choose from {list(all_ops)}")
    try:
        resolve_name(backend)
    except ValueError as e:
        problems.append(str(e))
    if isinstance(model, nn.Module) and any(is_patched(m) for m in model.modules()):
        problems.append("the model is already patched; call revert_fastmask(model) first")
    if problems:
        raise ValueError(f"fastmask.integrations.{integration}.apply_fastmask: " + "; ".join(problems))
    return ops


def patch_forward(module: nn.Module, fn: Callable, backends: dict[str, str | None]) -> None:
    """Make `fn(module, ...)` the module's forward; `backends` maps each op name to the backend it uses."""
    module.forward = functools.partial(fn, module)
    setattr(module, _BACKENDS, dict(backends))


def backend_of(module: nn.Module, op: str) -> str | None:
    """The backend `op` runs on inside this patched module, None where the op was left out."""
    return getattr(module, _BACKENDS)[op]


def resolve(module: nn.Module, op: str, **inputs) -> str | None:
    """The backend `op` runs on for these inputs inside this patched module, or None where the library's
    own code should run instead: the op was left out, or `auto` lands on the plain-PyTorch reference
    (the library's eager code is the same math, without the reference's separate bias add). A backend
    named explicitly, "torch" included, is always used."""
    backend = backend_of(module, op)
    if backend is None or (resolve_name(backend) == "auto" and select(op, backend, **inputs).name == "torch"):
        return None
    return backend


def is_patched(module: nn.Module) -> bool:
    return _BACKENDS in module.__dict__


def revert(model: nn.Module) -> int:
    """Remove every fastmask patch in `model`; returns how many modules were restored."""
    n = 0
    for m in model.modules():
        if is_patched(m):
            del m.forward
            delattr(m, _BACKENDS)
            n += 1
    return n


def op_backends(ops: tuple[str, ...], all_ops: tuple[str, ...], backend: str) -> dict[str, str | None]:
    """op -> the chosen backend for the selected ops, None for those left out (the library's code runs)."""
    return {op: (backend if op in ops else None) for op in all_ops}


_warned: set[tuple[str, str]] = set()


def run_original(module: nn.Module, reason: str, *args, **kwargs):
    """Call the class's own forward for this call, warning once per (class, reason)."""
    key = (type(module).__qualname__, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastmask: {type(module).__name__} runs its original forward: {reason}", stacklevel=3)
    return type(module).forward(module, *args, **kwargs)


def warn_left_alone(report: PatchReport) -> None:
    if report.left_alone:
        reasons = sorted({why for _, why in report.left_alone})
        warnings.warn(f"fastmask: {len(report.left_alone)} {report.library} modules keep their original "
                      f"forward ({'; '.join(reasons)}); print the returned report for the list", stacklevel=3)
