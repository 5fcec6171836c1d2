"""Input validation shared by the ops: every problem found is reported in one error, before any work."""
from __future__ import annotations

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
