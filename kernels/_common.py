"""Helpers shared by the Triton launchers: output allocation (poisonable for tests) and block choices.

Nothing here launches a kernel. `TRITON_INTERPRET=1` must be in the environment before any module of
`fastmask.kernels` is imported: `triton.jit` decides at decoration time whether a kernel runs
compiled or in the interpreter.
"""
from __future__ import annotations

import os

import torch

POISON_ENV = "FASTMASK_POISON_OUTPUTS"


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (tests): launchers then pick tiny blocks."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or NaN-filled when FASTMASK_POISON_OUTPUTS=1 so a test catches unwritten elements.

    The variable is read per call (an environment lookup, cheap next to a launch) so tests can flip it
    with monkeypatch; kernels must write every element of what this returns.
    """
    if os.environ.get(POISON_ENV, "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def as_loadable(t: torch.Tensor) -> torch.Tensor:
    """Bool tensors go to kernels as uint8 (a free view): Triton's i1 pointers are awkward to load."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t
