"""A tiny stand-in Method for the engine tests: seconds per run on CPU, deterministic.

TinyMethod hides the half of each image's 8x8 patches with the highest mean (a mask computed from
the image itself, so it is the same whatever rank or batch split sees the image), reconstructs all
patches from the visible ones with a small conv + MLP, and scores the hidden ones with MSE.
With `noise > 0` it also adds Gaussian noise drawn from torch's global RNG to its input, which
makes a resumed run depend on the RNG states being restored.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastmask.methods.base import Method


class TinyMethod(Method):
    name = "tiny"

    @dataclasses.dataclass
    class Args:
        dim: int = 24
        noise: float = 0.0

    def __init__(self, dim: int = 24, patch: int = 8, noise: float = 0.0):
        super().__init__()
        self.patch, self.noise = patch, noise
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3 * patch * patch)
        self.steps_seen = 0
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def flops_per_image(self) -> float:
        return 1e6

    def forward(self, imgs: torch.Tensor, keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        p = self.patch
        B, C, H, W = imgs.shape
        patches = imgs.unfold(2, p, p).unfold(3, p, p)                # [B, C, h, w, p, p]
        h, w = patches.shape[2], patches.shape[3]
        target = patches.permute(0, 2, 3, 4, 5, 1).reshape(B, h * w, p * p * C)
        score = target.float().mean(-1)                               # [B, L]
        mask = (score >= score.median(dim=1, keepdim=True).values).to(imgs.dtype)
        keep = (1 - mask).reshape(B, 1, h, w).repeat_interleave(p, 2).repeat_interleave(p, 3)
        x = imgs * keep
        if self.noise:
            x = x + self.noise * torch.randn(x.shape, dtype=x.dtype, device=x.device)
        z = self.embed(x).flatten(2).transpose(1, 2)                  # [B, L, dim]
        z = z + self.mlp(self.norm(z))
        pred = self.head(z)
        err = ((pred.float() - target.float()) ** 2).mean(-1)
        loss = (err * mask.float()).sum() / mask.float().sum()
        return {"loss": loss, "hidden": mask.float().mean()}

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.steps_seen = step

    def encoder(self) -> nn.Module:
        return self.embed


def tiny_factory(noise: float = 0.0, dim: int = 24):
    def make(cfg):
        return TinyMethod(dim=dim, noise=noise)
    return make


def tiny_config(*overrides: str, steps: int = 6):
    """A config for TinyMethod on the embedded set: 32 px, batch 8, fp32, no workers."""
    from fastmask.engine.config import load_config
    return load_config(None, ["data.img_size=32", "data.batch_size=8", "data.num_workers=0",
                              "data.loader=torch", f"engine.steps={steps}", "engine.log_every=1",
                              "engine.lr=0.003", "engine.warmup_steps=2", *overrides])
