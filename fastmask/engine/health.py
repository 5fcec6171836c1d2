"""Which checkpoints are good: the verdict saved with each one, so that resume and the non-finite
loss error only ever point at weights worth training from.

A checkpoint of step s is *good* when
1. its weights are finite;
2. its weights did not explode: their RMS is at most WEIGHT_GROWTH (100) x their RMS at the start
   of the run (the first invocation of the run, carried through resumes);
3. the loss logged at step s is finite and not a blow-up: at most LOSS_BLOWUP (10) x the reference,
   the larger of the median of the last RECENT logged losses that were not blow-ups themselves (so a
   blow-up does not raise the bar for the next one) and the run's first logged loss (an untrained
   model's loss: it keeps losses that legitimately fall towards 0, such as BYOL's, from making a
   later ordinary rise look like a blow-up). Not judged while the reference is <= 0 (a
   negative-cosine loss, say): there the weights' checks stand alone;
4. the first loss computed from its weights, that of step s + 1, passes the same test. That loss
   is known one step later: until then the verdict is provisional, and a failing one is rewritten
   into the checkpoint as not good.
Why those numbers: in the issue's repro (`engine.lr=1000000.0`, MAE ViT-Tiny), one step at lr 2e5
took the weights' RMS from 0.06 to 1.7e5 (2.9e6 x), and the next loss was non-finite; with TinyMethod
at lr=1 the loss went from 2.2 to 1.6e6 (7e5 x) in one step. Ordinary runs stay far inside both
limits: the default `fastmask pretrain` (MAE ViT-Tiny, 40 steps) logged losses within 1.39 x of
their median (its first loss is the largest) and ended with weights at 1.002 x their start RMS.

The step itself stays free of host syncs: the loss of step s + 1 is kept on the device and judged at
the next log or checkpoint, where the engine syncs anyway.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from .control import sum_over_ranks

LOSS_BLOWUP = 10.0
WEIGHT_GROWTH = 100.0
RECENT = 50


def weight_sq_sum(module: torch.nn.Module) -> tuple[float, int]:
    """-> (sum of squares, number of elements) of the module's parameters, in fp64 (no overflow),
    with one host sync. Under ZeRO-3 each rank holds partitions (`ds_tensor`, padded at the end):
    summed over the ranks (collective)."""
    parts, n, partitioned = [], 0, False
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            partitioned = True
            rank = dist.get_rank(group=getattr(p, "ds_process_group", None))
            size = p.ds_tensor.ds_numel
            t = p.ds_tensor.narrow(0, 0, max(0, min(size, p.ds_numel - rank * size)))
            n += p.ds_numel if rank == 0 else 0
        else:
            t = p.detach()
            n += t.numel()
        parts.append(torch.linalg.vector_norm(t.reshape(-1), dtype=torch.float64).square())
    if not parts:
        return 0.0, 0
    device = parts[0].device
    sq = torch.stack([x.to(device) for x in parts]).sum().item()
    if partitioned:
        sq, n = sum_over_ranks([sq, float(n)])
    return sq, int(n)


class CheckpointHealth:
    """The run's loss history and weight scale, and the checkpoints known good (newest last).

    saved: the `health` record of the checkpoint this run resumed from (None: a new run)."""

    def __init__(self, saved: dict | None, good: list[Path]):
        saved = saved or {}
        self.first_loss: float | None = saved.get("first_loss")
        self.recent: list[float] = list(saved.get("recent_losses", []))
        self.rms_init: float | None = saved.get("param_rms_init")
        self.good = list(good)
        self.last: tuple[int, str | None] | None = None  # (step, problem) of the newest logged loss
        self._watch: tuple[int, Path] | None = None   # (step whose next loss is wanted, checkpoint folder)
        self._probe: list[torch.Tensor] = []

    def start(self, module: torch.nn.Module) -> None:
        """Record the weights' scale at the start of the run (kept from the first invocation)."""
        if self.rms_init is None:
            sq, n = weight_sq_sum(module)
            self.rms_init = math.sqrt(sq / max(n, 1))

    def _reference(self) -> float | None:
        if not self.recent:
            return None
        first = self.first_loss if self.first_loss is not None else 0.0
        ref = max(statistics.median(self.recent[-RECENT:]), first)
        return ref if ref > 0 else None

    def _loss_problem(self, loss: float, what: str) -> str | None:
        if not math.isfinite(loss):
            return f"{what} is {loss}"
        ref = self._reference()
        if ref is not None and loss > LOSS_BLOWUP * ref:
            return (f"{what} {loss:.4g} is above {LOSS_BLOWUP:g} x the run's reference loss {ref:.4g} (a "
                    "blow-up)")
        return None

    def observe(self, step: int, loss: float) -> None:
        """The loss logged at `step` (mean over the interval ending there)."""
        problem = self._loss_problem(loss, f"the loss logged at step {step}")
        self.last = (step, problem)
        if problem is None:
            self.recent = (self.recent + [loss])[-RECENT:]
            if self.first_loss is None:
                self.first_loss = loss

    def judge(self, step: int, module: torch.nn.Module) -> dict:
        """The verdict on the checkpoint of `step` (call right after `observe` of its loss). Collective
        under ZeRO-3. -> the JSON-able `health` record saved with it."""
        sq, n = weight_sq_sum(module)
        rms = math.sqrt(sq / max(n, 1))
        why = []
        if not math.isfinite(rms):
            why.append("its weights are not finite")
        elif self.rms_init and rms > WEIGHT_GROWTH * self.rms_init:
            why.append(f"its weights grew {rms / self.rms_init:.3g} x (RMS {rms:.4g}, {self.rms_init:.4g} at "
                       f"the start of the run; the limit is {WEIGHT_GROWTH:g} x)")
        if self.last is not None and self.last[0] == step and self.last[1]:
            why.append(self.last[1])
        return {"good": not why, "why": why, "param_rms": rms, "param_rms_init": self.rms_init,
                "first_loss": self.first_loss, "recent_losses": self.recent}

    def saved(self, step: int, folder: Path, verdict: dict) -> None:
        if verdict["good"]:
            self.good.append(folder)
        self._watch, self._probe = (step, folder), []

    def capture(self, step: int, loss: torch.Tensor) -> None:
        """In the loop, for every micro-batch: keeps the losses of the first step after a checkpoint
        (`step` counts the optimizer steps done, so it equals the checkpoint's step during that one)."""
        if self._watch is not None and step == self._watch[0]:
            self._probe.append(loss.detach().float().reshape(()))

    def settle(self, reduce_mean) -> tuple[Path, str] | None:
        """At a log/checkpoint boundary: judge the first loss from the last checkpoint's weights.
        -> (that checkpoint, why it is not good) when it fails, else None."""
        if self._watch is None or not self._probe:
            return None
        (step, folder), probe = self._watch, torch.stack(self._probe).mean()
        self._watch, self._probe = None, []
        loss = float(reduce_mean(probe.reshape(1))[0].item())
        problem = self._loss_problem(loss, f"the first loss from its weights (step {step + 1})")
        if problem is None:
            return None
        if folder in self.good:
            self.good.remove(folder)
        return folder, problem

    def newest_good(self, checked: bool = False) -> Path | None:
        """checked: only one whose first loss was judged (what pruning must keep while the newest
        checkpoint's verdict is still provisional)."""
        pending = self._watch[1] if checked and self._watch is not None else None
        alive = [p for p in self.good if p.is_dir() and p != pending]
        return alive[-1] if alive else None
