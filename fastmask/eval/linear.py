"""Linear probe on frozen features, as MAE's `main_linprobe.py`: BatchNorm1d(affine=False) + Linear.

The encoder is frozen, so its features are computed once and the probe trains on them directly
(MAE's probe recomputes them every epoch because it augments; on small eval sets that only adds
cost). MAE trains with LARS at batch 16384 for 90 epochs; for the small sets this runs on, AdamW
with a cosine schedule reaches the same optimum in a few hundred steps, so that is the default.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn


class LinearProbe(nn.Module):
    """feats [B, D] -> logits [B, classes]: parameter-free BatchNorm (MAE: eps 1e-6) then a Linear
    initialized as MAE's head (trunc-normal std 0.01, zero bias)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(feats))


@dataclasses.dataclass
class ProbeArgs:
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


def train_linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                       args: ProbeArgs = ProbeArgs()) -> LinearProbe:
    """train_feats float32 [N, D], train_labels int64 [N] -> trained probe (in eval mode).

    Cross-entropy, AdamW, cosine learning-rate decay over all steps; deterministic given args.seed.
    """
    if train_feats.dim() != 2 or train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"need feats [N, D] and labels [N], got {tuple(train_feats.shape)}, "
                         f"{tuple(train_labels.shape)}")
    if args.epochs < 1 or args.batch_size < 2:
        raise ValueError(f"epochs must be >= 1 and batch_size >= 2 (BatchNorm), got {args}")
    g = torch.Generator().manual_seed(args.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        probe = LinearProbe(train_feats.shape[1], num_classes).to(train_feats.device)
    opt = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n = train_feats.shape[0]
    steps_per_epoch = max(1, n // args.batch_size)  # drop the last partial batch (BatchNorm)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    loss_fn = nn.CrossEntropyLoss()
    probe.train()
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=g).to(train_feats.device)
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size] if n >= args.batch_size else perm
            loss = loss_fn(probe(train_feats[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


@torch.no_grad()
def linear_probe_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                          test_labels: torch.Tensor, num_classes: int,
                          args: ProbeArgs = ProbeArgs()) -> float:
    """Train a probe on the train features and return its top-1 accuracy in [0, 1] on the test set."""
    with torch.enable_grad():
        probe = train_linear_probe(train_feats, train_labels, num_classes, args)
    return (probe(test_feats).argmax(dim=1) == test_labels).float().mean().item()
