"""Run logging: DIR/metrics.jsonl always (rank 0), TensorBoard when importable, tqdm on a terminal,
else (a batch job's log file, a pipe) one plain line per logged step on stderr with the bar's
fields: step/total, loss, lr, images/s, s/step, time elapsed and left.

One JSON object per logged step: step, epoch, loss, lr, imgs_per_s (whole job, all ranks),
step_s, mem_gb (peak device memory on CUDA, else this process's peak RSS), skipped (steps the
fp16 loss scaler or the bf16 overflow check skipped so far), the method's extra metrics (mean over
the interval and the ranks) and, where the method exposes `flops_per_image()`, tflops (achieved,
per device) and mfu (against the device's datasheet peak, when known).
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """Datasheet dense peak of this device for the run's precision (None when unknown, e.g. CPU)."""
    if device.type != "cuda":
        return None
    from fastmask.bench.flops import peak_tflops

    dtype = {"bf16": "bf16", "fp16": "fp16",
             "fp32": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"}
    return peak_tflops(torch.cuda.get_device_name(device), dtype[precision])


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    """Writes on rank 0 only; every call on other ranks is a no-op."""

    def __init__(self, out_dir: str | Path | None, is_main: bool, total_steps: int, start_step: int,
                 progress: bool | None = None):
        self.is_main = is_main
        self.total_steps, self.start_step, self.t0 = total_steps, start_step, time.perf_counter()
        self.file = None
        self.tb = None
        self.bar = None
        if not is_main:
            return
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.file = open(out / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard not installed (or broken): JSON lines only
                self.tb = None
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) and k != "loss" else v)
                  for k, v in record.items()}
        if self.file is not None:
            self.file.write(json.dumps(record, allow_nan=True) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 ips=f"{record['imgs_per_s']:.1f}", refresh=False)
        else:
            print(self._line(record), file=sys.stderr, flush=True)

    def _line(self, r: dict) -> str:
        elapsed = time.perf_counter() - self.t0
        done = r["step"] - self.start_step
        left = elapsed / done * (self.total_steps - r["step"]) if done > 0 else float("nan")
        ips, step_s = r.get("imgs_per_s") or float("nan"), r.get("step_s") or float("nan")
        return (f"step {r['step']}/{self.total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | {ips:.1f} "
                f"img/s | {step_s:.3f} s/step | {_clock(elapsed)} elapsed, {_clock(left)} left")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
