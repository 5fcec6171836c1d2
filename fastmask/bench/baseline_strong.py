"""The strong baseline: what a competent engineer writes in an afternoon from the official MAE code.

The official model code (`fastmask.bench.baseline_official.OfficialMAE`: same structure, same
parameter names, same masking and loss), with:

- timm's current `Block` (`timm.models.vision_transformer.Block`) in encoder and decoder: its
  attention calls `F.scaled_dot_product_attention` (timm's `fused_attn`, on unless TIMM_FUSED_ATTN=0),
  so on a GPU it runs flash / memory-efficient / cuDNN kernels instead of the eager softmax;
- AMP autocast in the run's dtype (bf16 on a GPU by default; GradScaler only for fp16);
- torch's fused AdamW over the official weight-decay groups;
- no host syncs in the step (no `loss.item()`, no `synchronize()`, no per-step gradient norm);
- `torch.compile` of the model (mode "default", inductor; `compile=False` or another backend for
  tests where inductor's compile time does not fit, and the result says which ran).

timm is an optional extra (`pip install fastmask[timm]`); without it `why_not_strong()` says so
and the benchmarks report the strong row as skipped.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from .baseline_official import OfficialMAE, adamw, official_param_groups


def why_not_strong() -> str | None:
    """Why the strong baseline cannot run here (timm missing), else None."""
    try:
        import timm.models.vision_transformer  # noqa: F401
    except ImportError as e:
        return f"the strong baseline needs timm (pip install fastmask[timm]): {e}"
    return None


def timm_block(dim: int, num_heads: int, mlp_ratio: float = 4.0) -> nn.Module:
    """timm's ViT block as MAE configures it (qkv bias, LayerNorm eps 1e-6); same parameter names as
    the official block, so state dicts move between the two unchanged."""
    from timm.models.vision_transformer import Block

    return Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def build_strong_model(**dims) -> OfficialMAE:
    """dims: OfficialMAE's keyword arguments (img_size, patch_size, embed_dim, ...)."""
    reason = why_not_strong()
    if reason:
        raise RuntimeError(reason)
    return OfficialMAE(**dims, block=timm_block)


def uses_sdpa(model: OfficialMAE) -> bool:
    """Whether the model's timm blocks call SDPA (timm's fused_attn switch, read at construction)."""
    return all(getattr(b.attn, "fused_attn", False) for b in (*model.blocks, *model.decoder_blocks))


def make_strong_step(model: OfficialMAE, dtype: torch.dtype, mask_ratio: float = 0.75, lr: float = 1.5e-4,
                     weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95),
                     compile: bool = True, compile_backend: str = "inductor") -> Callable:
    """-> step(imgs [B, C, H, W], noise [B, L] | None = None) -> loss (detached tensor, no host sync).

    compile: torch.compile(model, backend=compile_backend) (the first call compiles)."""
    device = next(model.parameters()).device
    opt = adamw(official_param_groups(model, weight_decay), lr, betas, "fused")
    run = torch.compile(model, backend=compile_backend) if compile else model
    amp = dtype in (torch.bfloat16, torch.float16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(imgs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss, _, _ = run(imgs, mask_ratio, noise)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.optimizer = opt  # type: ignore[attr-defined]
    compiled = f"torch.compile(backend={compile_backend!r})" if compile else None
    step.compiled = compiled  # type: ignore[attr-defined]
    return step
