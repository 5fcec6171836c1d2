"""Timing and memory measurement shared by the benchmarks.

- GPU: each call timed with a pair of CUDA events (no host sync inside the timed region; one sync
  after all repeats), peak memory from `torch.cuda.max_memory_allocated` after a reset.
- CPU: `time.perf_counter` around each call (CPU ops are synchronous).
- Always: warm-up calls first (allocator, autotuning, lazy init, compilation), then the median of
  the timed calls; the inputs are rotated through a list so caches do not flatter a repeated batch.

Memory on the CPU has no allocator counter, so two proxies are reported (see `cpu_peak_rss_delta`
and `saved_activation_bytes`): the resident-set growth seen by a sampling thread during one call,
and the exact bytes autograd keeps for backward during one forward (the activation memory, which
is what masking and fusion change; weights and optimizer states are the same on both paths).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
from typing import Any, Callable, Sequence

import torch


@dataclasses.dataclass
class Timing:
    """Seconds per call: median and spread over `repeats` timed calls after `warmup` untimed ones."""

    median_s: float
    mean_s: float
    min_s: float
    max_s: float
    repeats: int
    warmup: int
    times_s: list[float]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[Any], Any], inputs: Sequence[Any], device: torch.device | str,
               warmup: int = 2, repeats: int = 5) -> Timing:
    """Time `fn(inputs[i % len(inputs)])` `repeats` times after `warmup` calls.

    fn: one whole unit of work (e.g. a training step); its result is ignored.
    inputs: at least one item; rotated so that consecutive calls see different data.
    """
    device = torch.device(device)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if not inputs:
        raise ValueError("inputs must hold at least one item")
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    _sync(device)
    times: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(inputs[(warmup + i) % len(inputs)])
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(inputs[(warmup + i) % len(inputs)])
            times.append(time.perf_counter() - t0)
    return Timing(median_s=statistics.median(times), mean_s=statistics.fmean(times), min_s=min(times),
                  max_s=max(times), repeats=repeats, warmup=warmup, times_s=times)


def time_interleaved(fns: dict[str, Callable[[Any], Any]], inputs: Sequence[Any], device: torch.device | str,
                     warmup: int = 2, repeats: int = 5) -> dict[str, Timing]:
    """Time several functions in rounds: warm each up, then call A, B, C, A, B, C, ... `repeats` times.

    Interleaving makes the ratios robust to load that drifts during the run (a shared CPU, GPU
    clocks): every path sees the same conditions. Each call is timed on its own, as `time_calls`.
    """
    device = torch.device(device)
    if repeats < 1 or warmup < 0 or not inputs:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and inputs, got {repeats}, {warmup}, {len(inputs)}")
    for fn in fns.values():
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        x = inputs[(warmup + r) % len(inputs)]
        for name, fn in fns.items():
            times[name].append(time_calls(fn, [x], device, warmup=0, repeats=1).times_s[0])
    return {name: Timing(median_s=statistics.median(t), mean_s=statistics.fmean(t), min_s=min(t),
                         max_s=max(t), repeats=repeats, warmup=warmup, times_s=t)
            for name, t in times.items()}


try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
    _HAVE_STATM = os.path.exists("/proc/self/statm")
except (OSError, ValueError, AttributeError):
    _PAGE, _HAVE_STATM = 4096, False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def cpu_peak_rss_delta(fn: Callable[[], Any], interval_s: float = 0.002) -> int | None:
    """Peak resident-set growth (bytes) during one `fn()`, sampled every `interval_s` by a thread.

    A proxy, not an allocator count: the C allocator may keep freed pages (so memory a previous
    call freed and this call reuses does not show) and short spikes between samples are missed.
    Good enough to compare two paths run the same way; None where /proc is missing.
    """
    if not _HAVE_STATM:
        fn()
        return None
    base = _rss_bytes()
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_bytes())
            stop.wait(interval_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    peak = max(peak, _rss_bytes())
    return peak - base


def saved_activation_bytes(forward: Callable[[], Any], module: torch.nn.Module | None = None) -> int:
    """Bytes of distinct tensor storages autograd saves for backward during `forward()`.

    Exact on any device: the activation memory a training step holds at the end of its forward.
    Views of one storage count once. Weights are not activations: storages of `module`'s
    parameters and buffers (ops often save a transposed view of a weight) are left out, as are
    leaf tensors that require grad.
    """
    own = set()
    if module is not None:
        own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad):
            st = t.untyped_storage()
            if st.data_ptr() not in own:
                seen[(t.device.type, st.data_ptr())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str) -> dict[str, Any]:
    """Peak memory of one `fn()` call -> {"peak_bytes": comparable figure, "kind": what it is, ...}.

    GPU: allocator peak during the call minus what was allocated before it (activations, gradients,
    temporaries; not the weights and optimizer states that already existed, which would otherwise
    include every other model alive in the process), plus the absolute peak. CPU: sampled RSS
    growth (see `cpu_peak_rss_delta`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": int(peak - before),
                "kind": "cuda allocator peak above the allocation before the step",
                "peak_allocated_bytes": int(peak), "allocated_before_bytes": int(before)}
    return {"peak_bytes": cpu_peak_rss_delta(fn), "kind": "sampled RSS growth during the step (proxy)"}
