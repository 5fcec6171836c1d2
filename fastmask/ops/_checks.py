"""Input validation shared by the ops: every problem found is reported in one error, before any work."""
from __future__ import annotations

import os

import torch

ALL_DEVICES = ("cpu", "cuda")
TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fail_if(op: str, problems: list[str]) -> None:
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"fastmask.ops.{op}: " + "; ".join(problems))


def check_images(imgs: torch.Tensor, patch_size: int) -> list[str]:
    if imgs.dim() != 4:
        return [f"imgs must be [B, C, H, W], got shape {tuple(imgs.shape)}"]
    if not isinstance(patch_size, int) or patch_size <= 0:
        return [f"patch_size must be a positive int, got {patch_size!r}"]
    H, W = imgs.shape[-2:]
    if H % patch_size or W % patch_size:
        return [f"image size {H}x{W} is not divisible by patch size {patch_size}"]
    if not imgs.is_floating_point():
        return [f"imgs must be floating point, got {imgs.dtype}"]
    return []


def check_index(name: str, ids: torch.Tensor, batch: int, ref: torch.Tensor) -> list[str]:
    out = []
    if ids.dim() != 2 or ids.shape[0] != batch:
        out.append(f"{name} must be [B={batch}, *], got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        out.append(f"{name} must be int64 or int32, got {ids.dtype}")
    if ids.device != ref.device:
        out.append(f"{name} is on {ids.device} but the data is on {ref.device}")
    return out


CHECK_ENV = "FASTMASK_CHECK"


def index_checks_enabled() -> bool:
    """FASTMASK_CHECK=1 turns on the value checks of index tensors (read per call, so tests can flip it)."""
    return os.environ.get(CHECK_ENV, "0") == "1"


def _is_fake(t: torch.Tensor) -> bool:
    """Fake or meta tensors (shape propagation, `fastmask plan`'s measurement) have no values to check."""
    from torch._subclasses.fake_tensor import FakeTensor

    return t.is_meta or isinstance(t, FakeTensor)


def check_index_values(op: str, name: str, ids: torch.Tensor, L: int, permutation: bool) -> None:
    """With FASTMASK_CHECK=1: every row of ids [B, K] holds distinct patch indices in [0, L), and is a
    permutation of 0..L-1 when `permutation` (then K == L). One ValueError names the first bad row.

    The fused backwards write each gradient row exactly once, without atomics, by trusting this
    contract (every mask generator keeps it): a repeated index would leave rows of a gradient
    unwritten. Reading the values syncs with the host, so the check is off by default (the training
    step stays sync-free) and skipped inside torch.compile regions.
    """
    if torch.compiler.is_compiling() or not index_checks_enabled() or ids.numel() == 0 or _is_fake(ids):
        return
    what = "a permutation of 0..L-1" if permutation else "distinct patch indices in [0, L)"
    problems = []
    if permutation and ids.shape[1] != L:
        problems.append(f"{name} rows have {ids.shape[1]} entries, a permutation of 0..{L - 1} needs {L}")
    ids = ids.long()
    bad = ((ids < 0) | (ids >= L)).nonzero()
    if len(bad):
        b, k = bad[0].tolist()
        problems.append(f"{name}[{b}, {k}] = {ids[b, k].item()} is outside [0, L={L}) (rows must hold "
                        f"{what})")
    srt = ids.sort(dim=1).values
    rep = (srt[:, 1:] == srt[:, :-1]).nonzero()
    if len(rep):
        b, k = rep[0].tolist()
        problems.append(f"{name} row {b} holds patch {srt[b, k].item()} more than once (rows must hold "
                        f"{what}; the fused backwards write each gradient row once and would leave others "
                        "unwritten)")
    fail_if(op, problems)
