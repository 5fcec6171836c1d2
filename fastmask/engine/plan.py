"""Memory and throughput per GPU before a run, per ZeRO stage: `fastmask plan` (CLI: `plan_cli`).

    plan = make_plan(load_config("mae_vit_huge_patch14"), Hardware(gpus=64, gpu_memory_gib=80), 4096)

Parameter counts and the activation bytes and FLOPs of a micro-batch come from the method itself,
measured without allocating it (`footprint`). On top of them, per stage and per GPU, for N
data-parallel GPUs, T trainable, F frozen and E EMA-teacher parameters, L = largest layer,
lp = 2 (bf16/fp16) or 4 (fp32) bytes:

    params     lp*(T+F)  (stage 3: lp*(T+F)/N + lp*L gathered)  + 4*E fp32 teacher shadow if lp = 2
    gradients  lp*T      (stages 2-3: lp*T/N; stage 3: + lp*L)  + 4*T fp32 gradients of the master
                                                                  copy (stages 1-3: /N; fp32 stage 0: none)
    optimizer  8*T Adam moments + 4*T fp32 master weights (stages 1-3: /N; fp32 stage 0: no master)

These are DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`: 2T + 18T/N;
`estimate_zero3_model_states_mem_needs`: 4L + 18T/N) except at stage 3, where DeepSpeed 0.19 also
keeps a 16-bit gradient partition on the GPU (`grad_partitions_flat_buffer`, lp*T/N) that its
estimator leaves out: the plan counts it. Offload (`offload_optimizer=cpu|nvme`, stages 1-3) moves
the master weights, fp32 gradients and Adam moments off the GPU (at stages 2-3 the 16-bit gradient
partition too); `offload_params` (stage 3) moves the parameter partitions and the teacher shadow.
Stage 3 partitions the EMA teacher's shadow like its weights.

Communication per optimizer step, bytes each GPU sends (a ring all-gather or reduce-scatter sends
(N-1)/N of the buffer, an all-reduce twice that; g = gradient-accumulation steps): stage 0 one
all-reduce of lp*T; stage 1 a reduce-scatter and an all-gather of lp*T; stage 2 a reduce-scatter
of lp*T every micro-batch and an all-gather per step; stage 3 every micro-batch an all-gather of
lp*(T+F) for the forward and of lp*T for the backward and a reduce-scatter of lp*T.

Step time = FLOPs per GPU per step / (peak * MFU) + (1 - overlap) * bytes sent / link bandwidth
(intra-node when all GPUs share a node, else inter-node); images/s = global batch / step time.
Offload's host transfers and CPU optimizer step are not in it. The micro-batch is the largest
divisor of the per-GPU batch whose states + activations fit in (1 - headroom) of the GPU memory;
the headroom stands for the CUDA context, communication buckets, allocator fragmentation and
backward's temporaries, none of which is measured here.
"""
from __future__ import annotations

import dataclasses

from .config import Config, ConfigError
from .footprint import (FLOP_BATCHES, MEASURE_BATCHES, BatchFit, Footprint, ParamCounts, build_on_meta,
                        count_params, measure_footprint)

LOW_PRECISION = ("bf16", "fp16")
SEARCH_TO = 64  # the largest micro-batch that fits is searched up to this multiple of the per-GPU batch


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The machine planned for. Defaults: H100 SXM 80 GB, nodes of 8 with NVLink 4 inside a node and
    one 400 Gb/s InfiniBand NDR port per GPU between nodes."""

    gpus: int = 8
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    peak_tflops: float | None = None     # None: the H100 datasheet dense figure for the precision
    mfu: float = 0.40                    # fraction of peak the counted FLOPs achieve
    intra_node_gbps: float = 450.0       # GB/s each GPU sends over NVLink 4 (900 GB/s both directions)
    inter_node_gbps: float = 50.0        # GB/s each GPU sends over InfiniBand NDR (400 Gb/s)
    headroom: float = 0.10               # fraction of GPU memory left for what is not modeled
    overlap: float = 0.0                 # fraction of communication hidden behind compute

    def problems(self) -> list[str]:
        out = []
        if self.gpus < 1 or self.gpus_per_node < 1:
            out.append(f"--gpus and --gpus-per-node must be >= 1, got {self.gpus} and {self.gpus_per_node}")
        if self.gpu_memory_gib <= 0:
            out.append(f"--gpu-memory must be > 0 GiB, got {self.gpu_memory_gib}")
        if not 0.0 < self.mfu <= 1.0:
            out.append(f"--mfu must be in (0, 1], got {self.mfu}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            out.append(f"--peak-tflops must be > 0, got {self.peak_tflops}")
        if self.intra_node_gbps <= 0 or self.inter_node_gbps <= 0:
            out.append("link bandwidths must be > 0 GB/s")
        if not 0.0 <= self.headroom < 1.0:
            out.append(f"--headroom must be in [0, 1), got {self.headroom}")
        if not 0.0 <= self.overlap <= 1.0:
            out.append(f"--overlap must be in [0, 1], got {self.overlap}")
        return out

    @property
    def budget(self) -> float:
        """Bytes per GPU the states and activations may take."""
        return (1.0 - self.headroom) * self.gpu_memory_gib * 2**30

    def peak(self, precision: str) -> float:
        """TFLOP/s: --peak-tflops, else the H100 SXM dense datasheet figure (fp32 without TF32, torch's
        default for matrix products)."""
        from fastmask.bench.flops import PEAK_TFLOPS
        return self.peak_tflops or PEAK_TFLOPS["H100"][precision]


def model_states(counts: ParamCounts, stage: int, world: int, precision: str, offload_optimizer: str = "none",
                 offload_params: str = "none") -> dict[str, float]:
    """Bytes per GPU of parameters, gradients and optimizer states (the formulas in the module
    docstring), the teacher shadow's share of `params`, and `offloaded`: bytes per GPU moved to
    host memory or NVMe."""
    lp = 2 if precision in LOW_PRECISION else 4
    T, F, E, L, N = counts.trainable, counts.frozen, counts.ema_teacher, counts.largest_layer, world

    def part(nbytes: float, from_stage: int) -> float:
        return nbytes / N if stage >= from_stage else nbytes

    master = lp == 2 or stage >= 1  # DeepSpeed keeps an fp32 copy except for fp32 at stage 0
    weights = part(lp * (T + F), 3)
    shadow = part(4 * E, 3) if lp == 2 else 0.0
    gathered = lp * L if stage == 3 else 0.0
    grads_lp = part(lp * T, 2)
    grads32 = part(4 * T, 1) if master else 0.0
    optim = part(8 * T, 1) + (part(4 * T, 1) if master else 0.0)
    offloaded = 0.0
    if offload_optimizer != "none":
        offloaded += grads32 + optim + (grads_lp if stage >= 2 else 0.0)
        grads_lp, grads32, optim = (0.0 if stage >= 2 else grads_lp), 0.0, 0.0
    if offload_params != "none":
        offloaded += weights + shadow
        weights = shadow = 0.0
    return {"params": weights + shadow + gathered, "grads": grads_lp + grads32 + gathered, "optimizer": optim,
            "teacher_fp32_shadow": shadow, "offloaded": offloaded}


def _state_bytes(states: dict[str, float]) -> float:
    return states["params"] + states["grads"] + states["optimizer"]


def comm_bytes(counts: ParamCounts, stage: int, world: int, precision: str, accum: int) -> float:
    """Bytes each GPU sends per optimizer step (the schedule in the module docstring)."""
    lp = 2 if precision in LOW_PRECISION else 4
    T, F = lp * counts.trainable, lp * counts.frozen
    per_stage = {0: 2 * T, 1: 2 * T, 2: accum * T + T, 3: accum * ((T + F) + T + T)}
    return (world - 1) / world * per_stage[stage]


@dataclasses.dataclass
class Row:
    """One (stage, checkpointing) line of the plan; bytes are per GPU."""

    stage: int
    checkpointing: bool
    params: float
    grads: float
    optimizer: float
    offloaded: float
    activation_bytes_per_image: float | None = None   # at the chosen micro-batch
    activations: float | None = None                  # at the chosen micro-batch
    total: float | None = None
    max_micro_batch: int = 0                          # the largest that fits, up to SEARCH_TO x per GPU
    micro_batch: int | None = None                    # the largest divisor of the per-GPU batch that fits
    grad_accum: int | None = None
    comm_bytes: float | None = None
    compute_s: float | None = None
    comm_s: float | None = None
    step_s: float | None = None
    images_per_s: float | None = None
    note: str = ""                                    # why a row does not fit or does not apply

    @property
    def fits(self) -> bool:
        return self.micro_batch is not None


def _largest_fitting(budget: float, fixed: float, act: BatchFit, cap: int) -> int:
    """The largest micro-batch B <= cap with fixed + act(B) <= budget (0 when B = 1 does not fit)."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fixed + act(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _new_row(stage: int, checkpointing: bool, states: dict[str, float], note: str = "") -> Row:
    return Row(stage, checkpointing, states["params"], states["grads"], states["optimizer"],
               states["offloaded"], note=note)


def plan_row(counts: ParamCounts, foot: Footprint, hw: Hardware, stage: int, checkpointing: bool,
             precision: str, global_batch: int, states: dict[str, float]) -> Row:
    """The row of `stage` given its `model_states`: micro-batch, accumulation, communication, time."""
    row = _new_row(stage, checkpointing, states)
    per_gpu = global_batch // hw.gpus
    fixed = _state_bytes(states)
    # Search past the per-GPU batch so the table says how much room is left.
    row.max_micro_batch = _largest_fitting(hw.budget, fixed, foot.saved_bytes, cap=per_gpu * SEARCH_TO)
    divisors = [d for d in range(1, per_gpu + 1) if per_gpu % d == 0]
    micro = max((d for d in divisors if d <= row.max_micro_batch), default=None)
    if micro is None:
        row.note = (f"does not fit: {(fixed + foot.saved_bytes(1)) / 2**30:.3g} GiB at micro-batch 1 > "
                    f"{hw.budget / 2**30:.3g} GiB usable")
        return row
    bandwidth = hw.intra_node_gbps if hw.gpus <= hw.gpus_per_node else hw.inter_node_gbps
    row.micro_batch, row.grad_accum = micro, per_gpu // micro
    row.activations = foot.saved_bytes(micro)
    row.activation_bytes_per_image = row.activations / micro
    row.total = fixed + row.activations
    row.comm_bytes = comm_bytes(counts, stage, hw.gpus, precision, row.grad_accum)
    row.compute_s = foot.flops(micro) * row.grad_accum / (hw.peak(precision) * 1e12 * hw.mfu)
    row.comm_s = row.comm_bytes / (bandwidth * 1e9)
    row.step_s = row.compute_s + (1.0 - hw.overlap) * row.comm_s
    row.images_per_s = global_batch / row.step_s
    return row


def check_inputs(hw: Hardware, global_batch: int, stages: list[int], offload_params: str) -> None:
    """One ConfigError naming every problem with the numbers given, before anything is built."""
    problems = hw.problems()
    if global_batch < 1 or (hw.gpus >= 1 and global_batch % hw.gpus):
        problems.append(f"--global-batch {global_batch} is not a positive multiple of --gpus {hw.gpus} "
                        f"(every GPU takes the same number of images per step)")
    if not stages or any(s not in (0, 1, 2, 3) for s in stages):
        problems.append(f"--stage must be 0, 1, 2 or 3, got {stages}")
    if offload_params != "none" and 3 not in stages:
        problems.append("--offload-params needs ZeRO stage 3 (DeepSpeed partitions parameters only there)")
    if problems:
        raise ConfigError("; ".join(problems))


def _no_fit(cfg: Config, hw: Hardware, why: str) -> ConfigError:
    return ConfigError(f"{cfg.model} ({cfg.method}) does not fit on {hw.gpu_memory_gib:g} GiB GPUs even at "
                       f"micro-batch 1 ({why}); use more GPUs, ZeRO-3, offload or a smaller model")


def make_plan(cfg: Config, hw: Hardware, global_batch: int, stages: list[int] = (0, 1, 2, 3),
              checkpointing: tuple[bool, ...] = (False, True), offload_optimizer: str = "none",
              offload_params: str = "none") -> dict:
    """Every (stage, checkpointing) row, plus what they rest on, as one JSON-ready dict.

    Raises ConfigError for bad input, and when no row fits even at micro-batch 1 (before measuring
    anything when the model states alone are too big)."""
    stages = list(stages)
    check_inputs(hw, global_batch, stages, offload_params)
    precision = "bf16" if cfg.engine.precision == "auto" else cfg.engine.precision  # `auto` on a GPU
    meta_method = build_on_meta(cfg)
    counts = count_params(meta_method)
    states = {s: model_states(counts, s, hw.gpus, precision, offload_optimizer if s >= 1 else "none",
                              offload_params if s == 3 else "none") for s in stages}
    least = min(_state_bytes(v) for v in states.values())
    if least > hw.budget:
        raise _no_fit(cfg, hw, f"the smallest model states take {least / 2**30:.3g} GiB of "
                               f"{hw.budget / 2**30:.3g} GiB usable")
    feet: dict[bool, Footprint | str] = {}
    for ck in checkpointing:
        try:
            feet[ck] = measure_footprint(cfg, precision, ck, meta_method)
        except ConfigError as err:  # the method has no activation checkpointing
            feet[ck] = str(err)
    if all(isinstance(f, str) for f in feet.values()):
        raise ConfigError(next(iter(feet.values())))
    rows = [_new_row(stage, ck, states[stage], note=f"n/a: {feet[ck]}") if isinstance(feet[ck], str) else
            plan_row(counts, feet[ck], hw, stage, ck, precision, global_batch, states[stage])
            for stage in stages for ck in checkpointing]
    if not any(r.fits for r in rows):
        best = min((r for r in rows if r.note.startswith("does not fit")),
                   key=lambda r: r.params + r.grads + r.optimizer)
        raise _no_fit(cfg, hw, f"best ZeRO-{best.stage}{' + checkpointing' if best.checkpointing else ''}: "
                               f"{best.note.split(': ', 1)[1]}")
    how = (f"the method's forward + backward on data-less CPU tensors (FakeTensorMode) in {precision}: "
           f"saved-tensor bytes via saved_tensors_hooks (each storage once, no parameters or inputs) at "
           f"micro-batches {list(MEASURE_BATCHES)}, fitted exactly as c0 + c1*B + c2*B^2; forward + backward "
           f"FLOPs via FlopCounterMode at {list(FLOP_BATCHES)}, a line through both")
    return {
        "config": {"method": cfg.method, "model": cfg.model, "img_size": cfg.data.img_size,
                   "mask_ratio": cfg.mask_ratio, "masking": cfg.masking, "precision": precision},
        "hardware": {**dataclasses.asdict(hw), "peak_tflops": hw.peak(precision)},
        "global_batch": global_batch, "per_gpu_batch": global_batch // hw.gpus,
        "offload_optimizer": offload_optimizer, "offload_params": offload_params,
        "params": dataclasses.asdict(counts),
        "measured": {("checkpointing" if ck else "plain"): foot if isinstance(foot, str) else
                     {"saved_bytes": dataclasses.asdict(foot.saved_bytes),
                      "flops": dataclasses.asdict(foot.flops), "how": how}
                     for ck, foot in feet.items()},
        "formulas": FORMULAS,
        "rows": [{**dataclasses.asdict(r), "fits": r.fits} for r in rows],
    }


FORMULAS = {
    "symbols": "T trainable params, F frozen, E EMA-teacher (frozen, under `teacher`), L largest layer, "
               "N gpus, lp 2 (bf16/fp16) or 4 (fp32) bytes, B micro-batch",
    "params": "lp*(T+F) [stage 3: /N + lp*L] + 4*E fp32 teacher shadow when lp=2 [stage 3: /N]",
    "grads": "lp*T [stages 2-3: /N; stage 3: + lp*L] + 4*T fp32 master gradients "
             "[stages 1-3: /N; fp32 stage 0: none]",
    "optimizer": "8*T Adam moments + 4*T fp32 master weights [stages 1-3: /N; fp32 stage 0: no master]",
    "offload": "optimizer (stages 1-3): master weights, fp32 gradients, Adam moments (stages 2-3: also the "
               "lp gradient partition) leave the GPU; params (stage 3): the parameter partitions",
    "activations": "saved_bytes(B) = c0 + c1*B + c2*B^2, measured (see `measured`)",
    "fit": "micro-batch = the largest divisor B of the per-GPU batch with "
           "params + grads + optimizer + activations(B) <= (1 - headroom) * gpu_memory",
    "comm_bytes": "bytes each GPU sends per step, ring factor (N-1)/N: stage 0 all-reduce 2*lp*T; stage 1 "
                  "reduce-scatter + all-gather 2*lp*T; stage 2 accum*lp*T + lp*T; stage 3 accum*lp*(3T+F)",
    "step_s": "flops(B)*accum / (peak_tflops*1e12*mfu) + (1-overlap) * comm_bytes / (link GB/s*1e9); link = "
              "intra-node when gpus <= gpus_per_node, else inter-node; offload transfers not included",
    "images_per_s": "global_batch / step_s",
}
