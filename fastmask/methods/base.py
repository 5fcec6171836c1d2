"""The one interface the engine knows a method by.

A method is an `nn.Module` that, given a batch of images, returns `{"loss": scalar, **metrics}`
(metrics are tensors, never Python floats: the step has no host syncs). Everything the method
trains, teacher copies included, lives inside it, so DeepSpeed checkpoints it whole.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn


class Method(nn.Module):
    """Base class. Subclasses set `Args` (a dataclass of their options) and implement `forward`."""

    name: str = ""
    steps_per_epoch: int = 1  # set by the engine (`set_epoch_length`); until then one step counts as an epoch
    # True: under bf16/fp16 the engine hands over the loader's fp32 images and the method casts its
    # network input itself, so pixel targets come from fp32 pixels (the official MAE code's AMP does
    # the same: autocast lowers the encoder's matmuls, the normalized-pixel target stays fp32).
    keeps_fp32_images: bool = False

    @dataclasses.dataclass
    class Args:
        pass

    def forward(self, imgs: torch.Tensor, keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """imgs [B, C, H, W] normalized; keys [B] int64: each sample's global draw key (the engine passes
        `Loader.sample_keys`; masks and views drawn from `fastmask.draws.Draws` keyed by them do not
        depend on the world size, the batch split or a resume). None: the method's own counter.
        Methods that draw masks also take `masks=` (ready `fastmask.masking.Masks`) to fix them."""
        raise NotImplementedError

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called by the engine after every optimizer step (EMA/momentum teachers, schedules)."""

    def set_epoch_length(self, steps_per_epoch: int) -> None:
        """Called by the engine before training: optimizer steps per epoch, for options a paper counts
        in epochs (DINO's frozen last layer, teacher temperature warm-up)."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch = int(steps_per_epoch)

    def view_specs(self) -> list | None:
        """The views the loader should cut from every full-resolution image (`fastmask.data.ViewSpec`s);
        `forward` then gets a list of [B, 3, S_v, S_v] per batch. None (the default): one tensor
        [B, 3, S, S], the loader's single crop."""
        return None

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: no decay on 1-D parameters (norms, biases) and on `no_weight_decay()` names,
        as timm's `param_groups_weight_decay` (which the official MAE code uses). Frozen tensors
        (fixed position embeddings, teachers) are left out."""
        skip = set(self.no_weight_decay()) if hasattr(self, "no_weight_decay") else set()
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def encoder(self) -> nn.Module:
        """The backbone to evaluate or export (has `forward_features(imgs) -> [B, N, D]`)."""
        raise NotImplementedError
