"""What the engine's own method costs, measured without allocating it: parameter counts, and the
bytes autograd saves and the FLOPs of a training micro-batch (`fastmask plan` builds on these).

    meta = build_on_meta(cfg)                       # every tensor on the meta device: no memory
    counts = count_params(meta)                     # trainable / frozen / EMA teacher / largest layer
    foot = measure_footprint(cfg, "bf16", checkpointing=False, meta_method=meta)
    foot.saved_bytes(64), foot.flops(64)            # bytes and FLOPs of a 64-image micro-batch

Parameter counts: trainable and frozen apart (a frozen EMA teacher has weights but no gradients or
Adam states); frozen parameters under a top-level `teacher` module are the EMA teachers, which
under bf16/fp16 also keep an fp32 shadow (`methods.momentum`). `largest_layer` is DeepSpeed's: the
most parameters any one module owns directly.

The measurement runs the method's own forward (and backward) on data-less CPU tensors (torch's
FakeTensorMode), the whole method cast to the run's precision as DeepSpeed's bf16/fp16 mode does,
so teachers, multiple views and ExtreMA's masked copies count as they run:
- saved bytes: the storages autograd saves for backward (a `saved_tensors_hooks` pack hook, each
  storage once, parameters, buffers and the input batch left out; with activation checkpointing
  this is what the checkpoints keep), at micro-batches 2, 4 and 8, fitted exactly as
  c0 + c1*B + c2*B^2 (c2 is zero unless something grows with the square of the batch, e.g. a
  batch-wide similarity matrix);
- FLOPs of forward + backward (torch's FlopCounterMode; with checkpointing the recomputed forward
  counts too), at micro-batches 2 and 8, a line through both (the counter is the slow part).
The ops measured are the CPU path's (the `torch`/`sdpa` backends); on CUDA `auto` may pick fused
kernels that save other tensors, which nothing here has measured.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from fractions import Fraction

import torch
from torch import nn

from .config import Config
from .step import DTYPES

# Saved bytes at three micro-batches (forward only), FLOPs at two of them (forward + backward).
MEASURE_BATCHES = (2, 4, 8)
FLOP_BATCHES = (2, 8)


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    trainable: int      # requires_grad parameters: weights, gradients and optimizer states
    frozen: int         # requires_grad=False parameters (fixed position embeddings, teachers): weights only
    ema_teacher: int    # the frozen ones under a top-level `teacher` module (fp32 shadow under bf16/fp16)
    largest_layer: int  # most parameters owned directly by one module (DeepSpeed's `largest_layer_params`)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclasses.dataclass(frozen=True)
class BatchFit:
    """c0 + c1*B + c2*B^2 through measured (B, value) points: exact through three, a line (c2 = 0)
    through two."""

    c0: float
    c1: float
    c2: float = 0.0

    def __call__(self, batch: int) -> float:
        return self.c0 + self.c1 * batch + self.c2 * batch * batch

    @classmethod
    def through(cls, points: list[tuple[int, int]]) -> "BatchFit":
        # Newton's divided differences, in exact rationals (integer bytes and FLOPs in, no rounding).
        (x0, y0), (x1, y1), *rest = [(Fraction(x), Fraction(y)) for x, y in points]
        d01 = (y1 - y0) / (x1 - x0)
        c2 = Fraction(0)
        if rest:
            x2, y2 = rest[0]
            c2 = ((y2 - y1) / (x2 - x1) - d01) / (x2 - x0)
        c1 = d01 - c2 * (x0 + x1)
        c0 = y0 - c1 * x0 - c2 * x0 * x0
        return cls(float(c0), float(c1), float(c2))


@dataclasses.dataclass(frozen=True)
class Footprint:
    """One measured forward + backward: saved-tensor bytes and FLOPs as functions of the micro-batch."""

    saved_bytes: BatchFit       # through MEASURE_BATCHES
    flops: BatchFit | None      # through FLOP_BATCHES (None: not measured)


def count_params(method: nn.Module) -> ParamCounts:
    """Parameter counts of `method` (any device, meta included; shared parameters once)."""
    trainable = frozen = teacher = 0
    for name, p in method.named_parameters():  # named_parameters() yields a shared tensor once
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
            teacher += p.numel() if name.split(".", 1)[0] == "teacher" else 0
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in method.modules()), default=0)
    return ParamCounts(trainable, frozen, teacher, largest)


def build_on_meta(cfg: Config) -> nn.Module:
    """The method of `cfg` with every parameter and buffer on the meta device (no memory)."""
    from fastmask.methods import build_method, get_method

    get_method(cfg.method)  # import the method modules first: their module-level tensors must be real
    with torch.device("meta"):
        return build_method(cfg)


def _fake_like(method: nn.Module, dtype: torch.dtype) -> None:
    """In place, inside a FakeTensorMode: every parameter and buffer becomes a data-less CPU tensor,
    floating ones in `dtype` (what DeepSpeed's bf16/fp16 mode does to the whole module)."""
    made: dict[int, torch.Tensor] = {}  # one replacement per original: shared tensors stay shared

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            new = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="cpu")
            is_param = isinstance(t, nn.Parameter)
            made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
        return made[id(t)]

    for module in method.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is not None:
                    tensors[name] = fake(t)


def _flop_formulas() -> dict:
    """FlopCounterMode knows SDPA's CUDA kernels; add the CPU flash kernel the CPU path runs."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def _forget_fake_constants() -> None:
    # views.py caches small constant tensors per (device, dtype); ones made under FakeTensorMode
    # must not outlive it (a later real forward in this process would compute on fake tensors).
    from fastmask.methods import views
    views._constant.cache_clear()


def _measure_at(method: nn.Module, batch: int, img_size: int, dtype: torch.dtype,
                flops: bool) -> tuple[int, int | None]:
    """-> (saved-tensor bytes of the forward, forward + backward FLOPs or None) of one micro-batch."""
    from torch.utils.flop_counter import FlopCounterMode

    imgs = torch.empty(batch, 3, img_size, img_size, dtype=dtype, device="cpu")
    skip = {t.untyped_storage()._cdata for t in [imgs, *method.parameters(), *method.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            saved[storage._cdata] = storage.nbytes()
        return t

    counter = (FlopCounterMode(display=False, custom_mapping=_flop_formulas()) if flops
               else contextlib.nullcontext())
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = method(imgs)["loss"]
        if flops:
            loss.backward()
            method.zero_grad(set_to_none=True)
    return sum(saved.values()), counter.get_total_flops() if flops else None


def measure_footprint(cfg: Config, precision: str, checkpointing: bool, meta_method: nn.Module | None = None,
                      flops: bool = True) -> Footprint:
    """Measure `cfg`'s method (a copy of `meta_method` when given, else built on the meta device) on
    fake tensors at `precision`: saved bytes at MEASURE_BATCHES, FLOPs at FLOP_BATCHES (the slow
    part; `flops=False` skips it and leaves `Footprint.flops` None).

    Raises ConfigError when the method cannot run with activation checkpointing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .trainer import _enable_activation_checkpointing

    dtype = DTYPES[precision]
    method = copy.deepcopy(meta_method) if meta_method is not None else build_on_meta(cfg)
    if checkpointing:
        _enable_activation_checkpointing(method)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            _fake_like(method, dtype)
            method.train()
            points = {b: _measure_at(method, b, cfg.data.img_size, dtype, flops and b in FLOP_BATCHES)
                      for b in MEASURE_BATCHES}
    finally:
        _forget_fake_constants()
    return Footprint(saved_bytes=BatchFit.through([(b, s) for b, (s, _) in points.items()]),
                     flops=BatchFit.through([(b, points[b][1]) for b in FLOP_BATCHES]) if flops else None)
