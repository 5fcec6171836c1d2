"""Op benchmarks: the Triton kernels beside plain PyTorch, torch.compile of it, and SDPA for attention.

    python benchmarks/bench_ops.py                     # CUDA: ViT-B/L/H MAE shapes, batch 256, bf16
    python benchmarks/bench_ops.py --batch 64 --models vit_l --ops attention
    python benchmarks/bench_ops.py --out results.json  # CPU: tiny shapes, torch rows only

Every row: op, model shapes, implementation, pass (fwd or fwd+bwd), median ms, achieved GB/s (memory-bound
ops, bytes counted analytically as each necessary input read once and each output written once, the same
count for every implementation) or TFLOP/s (attention, patch embedding), peak memory above the inputs.
Ratios against the plain PyTorch row come at the end. On a CPU the Triton rows are recorded as skipped
("no GPU"): interpreter timings mean nothing. GPU runs write JSON to benchmarks/results/ by default
(`<date>_<device>.json`); pass --out to choose.

Timing: CUDA events around each call after warm-up, median over `--reps`, inputs rotated over three
sets so no run finds its inputs in L2 from the previous one. torch.compile rows report compile time
(first call) separately. Shapes: MAE at 224 px, mask ratio 0.75, decoder 512 wide with 16 heads.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastmask.ops import backends, reference

# name: (patch, encoder dim, encoder heads); the decoder is 512 wide, 16 heads (head dim 32) for all.
MODELS = {
    "vit_b": (16, 768, 12),
    "vit_l": (16, 1024, 16),
    "vit_h": (14, 1280, 16),
}
DECODER_DIM, DECODER_HEADS, MASK_RATIO, IMG = 512, 16, 0.75, 224
OPS = ("patch_gather", "patch_scatter", "norm_pix_loss", "attention", "patch_embed_visible")


@dataclass
class Case:
    """One op at one model's shapes. make(seed) -> (fn, args, grad_args): fn(*args) is the forward;
    grad_args are the tensors the backward differentiates (empty: forward only)."""

    op: str
    model: str
    shapes: dict
    make: Callable
    bytes_fwd: float = 0.0
    bytes_bwd: float = 0.0
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    impls: dict = field(default_factory=dict)


def _masking(B, L, K, device):
    ids_shuffle = torch.rand(B, L, device=device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(B, L, device=device)
    mask[:, :K] = 0
    return ids_shuffle[:, :K].contiguous(), ids_restore, torch.gather(mask, 1, ids_restore)


def _impls(op: str, device: str) -> dict:
    """impl name -> (callable or None, skip reason)."""
    recs = backends.backends_for(op)
    out = {"torch": (recs["torch"].fn, None)}
    for name in ("triton", "cuda"):  # the fused backends, side by side
        rec = recs.get(name)
        if device != "cuda":
            out[name] = (None, "no GPU")
        elif rec is None or rec.available():
            out[name] = (None, f"no {name} backend for this op" if rec is None else rec.available())
        else:
            out[name] = (rec.fn, None)
    out["torch.compile"] = (torch.compile(recs["torch"].fn, dynamic=False), None)
    if op == "attention":
        out["sdpa"] = (recs["sdpa"].fn, None)
    return out


def build_cases(device: str, batch: int, dtype: torch.dtype, models=tuple(MODELS), ops=OPS) -> list[Case]:
    e = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for name in models:
        p, dim, heads = MODELS[name]
        L = (IMG // p) ** 2
        K = int(L * (1 - MASK_RATIO))
        P = p * p * 3
        B = batch
        img_bytes = B * 3 * IMG * IMG * e

        def gather(seed, B=B, L=L, K=K, p=p):
            torch.manual_seed(seed)
            imgs = torch.randn(B, 3, IMG, IMG, device=device, dtype=dtype, requires_grad=True)
            ids_keep, _, _ = _masking(B, L, K, device)
            return (imgs, ids_keep, p), (imgs,)

        def scatter(seed, B=B, L=L, K=K):
            torch.manual_seed(seed)
            tokens = torch.randn(B, K, DECODER_DIM, device=device, dtype=dtype, requires_grad=True)
            mtok = torch.randn(DECODER_DIM, device=device, dtype=dtype, requires_grad=True)
            _, ids_restore, _ = _masking(B, L, K, device)
            return (tokens, ids_restore, mtok), (tokens, mtok)

        def loss(seed, B=B, L=L, K=K, p=p):
            torch.manual_seed(seed)
            pred = torch.randn(B, L, P, device=device, dtype=dtype, requires_grad=True)
            imgs = torch.randn(B, 3, IMG, IMG, device=device, dtype=dtype)
            _, _, mask = _masking(B, L, K, device)
            return (pred, imgs, mask, p, True), (pred,)

        def attn(seed, N, H, Dh, B=B):
            torch.manual_seed(seed)
            q, k, v = (torch.randn(B, H, N, Dh, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            return (q, k, v, None), (q, k, v)

        def embed(seed, B=B, L=L, K=K, p=p, dim=dim):
            torch.manual_seed(seed)
            imgs = torch.randn(B, 3, IMG, IMG, device=device, dtype=dtype)
            w = (torch.randn(dim, 3, p, p, device=device, dtype=dtype) * 0.02).requires_grad_()
            b = torch.zeros(dim, device=device, dtype=dtype, requires_grad=True)
            pos = (torch.randn(L, dim, device=device, dtype=dtype) * 0.02).requires_grad_()
            ids_keep, _, _ = _masking(B, L, K, device)
            return (imgs, ids_keep, w, b, pos), (w, b, pos)

        if "patch_gather" in ops:
            cases.append(Case("patch_gather", name, dict(B=B, img=IMG, p=p, K=K), gather,
                              bytes_fwd=2 * B * K * P * e + B * K * 8, bytes_bwd=B * K * P * e + img_bytes))
        if "patch_scatter" in ops:
            cases.append(Case("patch_scatter", name, dict(B=B, L=L, K=K, D=DECODER_DIM), scatter,
                              bytes_fwd=B * (K + L) * DECODER_DIM * e + B * L * 8,
                              bytes_bwd=B * (K + L) * DECODER_DIM * e + B * L * 8))
        if "norm_pix_loss" in ops:
            hidden = B * (L - K) * P * e
            cases.append(Case("norm_pix_loss", name, dict(B=B, L=L, P=P), loss,
                              bytes_fwd=2 * hidden + B * L * 4,
                              bytes_bwd=2 * hidden + B * L * P * e + B * L * 4))
        if "attention" in ops:
            for part, N, H, Dh in (("encoder", K + 1, heads, dim // heads),
                                   ("decoder", L + 1, DECODER_HEADS, DECODER_DIM // DECODER_HEADS)):
                f = 4.0 * B * H * N * N * Dh
                cases.append(Case("attention", f"{name}.{part}", dict(B=B, H=H, N=N, Dh=Dh),
                                  lambda s, N=N, H=H, Dh=Dh: attn(s, N, H, Dh),
                                  flops_fwd=f, flops_bwd=2.5 * f))  # FlashAttention's count: bwd = 2.5 fwd
        if "patch_embed_visible" in ops:
            f = 2.0 * B * K * P * dim
            cases.append(Case("patch_embed_visible", name, dict(B=B, K=K, P=P, D=dim), embed,
                              flops_fwd=f, flops_bwd=f))  # backward: weight gradient only (images need none)
    return cases


def _timer(device: str):
    if device == "cuda":
        def run(fn, reps):
            times = []
            for i in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(i)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
    else:
        def run(fn, reps):
            times = []
            for i in range(reps):
                t0 = time.perf_counter()
                fn(i)
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
    return run


def measure(case: Case, impl: str, fn, device: str, reps: int, warmup: int) -> list[dict]:
    """Rows for the forward and forward+backward passes of one implementation."""
    inputs = [case.make(seed) for seed in range(3)]
    grads = []
    with torch.no_grad():
        for args, _ in inputs:
            out = fn(*args)
            grads.append(torch.randn(out.shape, device=out.device).to(out.dtype))
    timer = _timer(device)
    rows = []
    compile_s = None
    if impl == "torch.compile":
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(*inputs[0][0])
        out = fn(*inputs[0][0])
        torch.autograd.grad(out, inputs[0][1], grads[0])
        if device == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0

    def fwd(i):
        args, _ = inputs[i % 3]
        with torch.no_grad():
            fn(*args)

    def fwd_bwd(i):
        args, wrt = inputs[i % 3]
        torch.autograd.grad(fn(*args), wrt, grads[i % 3])

    for name, step, nbytes, flops in (("fwd", fwd, case.bytes_fwd, case.flops_fwd),
                                      ("fwd+bwd", fwd_bwd, case.bytes_fwd + case.bytes_bwd,
                                       case.flops_fwd + case.flops_bwd)):
        for i in range(warmup):
            step(i)
        peak = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(0)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        ms = timer(step, reps)
        row = dict(op=case.op, model=case.model, shapes=case.shapes, impl=impl, pass_=name, ms=round(ms, 4),
                   peak_mb=None if peak is None else round(peak, 1))
        if nbytes:
            row["GB/s"] = round(nbytes / ms / 1e6, 2)
        if flops:
            row["TFLOP/s"] = round(flops / ms / 1e9, 2)
        if compile_s is not None:
            row["compile_s"] = round(compile_s, 1)
        rows.append(row)
    return rows


def run(device: str, batch: int, dtype: torch.dtype, models, ops, reps: int, warmup: int, compile_: bool,
        log=print) -> dict:
    rows = []
    for case in build_cases(device, batch, dtype, models, ops):
        for impl, (fn, skip) in _impls(case.op, device).items():
            if impl == "torch.compile" and not compile_:
                fn, skip = None, "--no-compile"
            if fn is None:
                rows.append(dict(op=case.op, model=case.model, shapes=case.shapes, impl=impl, skipped=skip))
                log(f"{case.op:20s} {case.model:14s} {impl:14s} skipped: {skip}")
                continue
            try:
                new = measure(case, impl, fn, device, reps, warmup)
            except Exception as ex:  # one failing implementation must not hide the others' numbers
                new = [dict(op=case.op, model=case.model, shapes=case.shapes, impl=impl,
                            error=f"{type(ex).__name__}: {ex}"[:500])]
            for r in new:
                log(f"{r['op']:20s} {r['model']:14s} {r['impl']:14s} {r.get('pass_', ''):8s} "
                    + (f"{r['ms']:9.3f} ms  " + (f"{r['GB/s']:8.1f} GB/s  " if 'GB/s' in r else "")
                       + (f"{r['TFLOP/s']:7.2f} TFLOP/s  " if 'TFLOP/s' in r else "")
                       + (f"peak {r['peak_mb']} MiB" if r.get('peak_mb') is not None else "")
                       if 'ms' in r else r.get('error', '')))
            rows.extend(new)
            if device == "cuda":
                torch.cuda.empty_cache()
    return dict(meta=_meta(device, batch, dtype), rows=rows, ratios=_ratios(rows))


def _ratios(rows: list[dict]) -> list[dict]:
    """time(torch) / time(impl) per (op, model, pass): > 1 means faster than plain PyTorch."""
    base = {(r["op"], r["model"], r["pass_"]): r["ms"] for r in rows
            if r.get("impl") == "torch" and "ms" in r}
    out = []
    for r in rows:
        key = (r["op"], r["model"], r.get("pass_"))
        if "ms" in r and r["impl"] != "torch" and key in base:
            out.append(dict(op=r["op"], model=r["model"], pass_=r["pass_"], impl=r["impl"],
                            speedup_vs_torch=round(base[key] / r["ms"], 2)))
    return out


def _meta(device: str, batch: int, dtype: torch.dtype) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if device == "cuda"
        else f"cpu ({platform.processor() or 'unknown'}, {torch.get_num_threads()} threads)",
        torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
        python=platform.python_version(),
        batch=batch, dtype=str(dtype).replace("torch.", ""), image=IMG, mask_ratio=MASK_RATIO,
        decoder=dict(dim=DECODER_DIM, heads=DECODER_HEADS), models={k: MODELS[k] for k in MODELS},
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 2 on CPU")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--models", nargs="+", default=None, choices=list(MODELS),
                    help="default all on CUDA, vit_b on CPU")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--reps", type=int, default=None, help="timed runs per row (default 50 CUDA, 7 CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/<date>_<device>_ops.json on CUDA)")
    a = ap.parse_args(argv)
    on_gpu = a.device == "cuda"
    batch = a.batch or (256 if on_gpu else 2)
    dtype = getattr(torch, a.dtype or ("bfloat16" if on_gpu else "float32"))
    models = a.models or (list(MODELS) if on_gpu else ["vit_b"])
    reps = a.reps or (50 if on_gpu else 7)
    warmup = a.warmup if a.warmup is not None else (10 if on_gpu else 2)
    result = run(a.device, batch, dtype, models, a.ops, reps, warmup, not a.no_compile)
    out = a.out
    if out is None and on_gpu:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        dev = torch.cuda.get_device_name().replace(" ", "-").lower()
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{stamp}_{dev}_ops.json")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
    for r in result["ratios"]:
        print(f"{r['op']:20s} {r['model']:14s} {r['pass_']:8s} {r['impl']:14s} "
              f"{r['speedup_vs_torch']:.2f}x vs torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
