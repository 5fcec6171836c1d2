"""Op benchmarks: the fused backends beside plain PyTorch, torch.compile of it, and every SDPA backend.

    python benchmarks/bench_ops.py                     # CUDA: ViT-B/L/H MAE shapes, batch 256, bf16
    python benchmarks/bench_ops.py --batch 64 --models vit_l --ops attention
    python benchmarks/bench_ops.py --out results.json  # CPU: tiny shapes, torch rows only
    python benchmarks/bench_ops.py --models vit_l --update-auto-table benchmarks/results/auto_backends.json

Every row: op, model shapes, implementation, pass (fwd or fwd+bwd), median ms, peak memory above the
inputs, and either TFLOP/s (attention, patch embedding) or, for the memory-bound ops, achieved GB/s and
its share of the copy ceiling measured at the start of the run (a device-to-device copy of 1 GiB on a GPU,
64 MiB on a CPU; bytes read + written per second). Bytes are the minimum each op must move, the same count
for every implementation (each necessary input read once, each output written once, in the dtypes the
model uses: bf16 activations, an fp32 residual stream, fp32 parameters); each case states its rule
(`min_bytes_rule`). (On a CPU at small batches the data fits in cache, so shares above 100% happen.)
Ratios against the plain PyTorch row come at the end. On a CPU the Triton/CUDA rows are
recorded as skipped ("no GPU"): interpreter timings mean nothing. GPU runs write JSON to
benchmarks/results/ by default (`<date>_<device>_ops.json`); pass --out to choose.

Attention is fed q, k, v as the model makes them (strided views of one [B, N, 3, H, Dh] qkv projection,
differentiated through it) and runs once per SDPA backend (cuDNN, flash, efficient, math: a backend that
cannot take the inputs is recorded with its error) beside fastmask's own kernels.

Timing: CUDA events around each call after warm-up, median over `--reps`, inputs rotated over three sets
so no run finds its inputs in L2 from the previous one. torch.compile rows report compile time (first
call) separately. Shapes: MAE at 224 px, mask ratio 0.75, decoder 512 wide with 16 heads.
--update-auto-table writes, for this GPU's architecture, the measured fwd+bwd order of each op's
backends at the largest model run into the table `backend="auto"` reads (fastmask/ops/backends.py).
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
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastmask.ops import backends

# name: (patch, encoder dim, encoder heads); the decoder is 512 wide, 16 heads (head dim 32) for all.
MODELS = {
    "vit_b": (16, 768, 12),
    "vit_l": (16, 1024, 16),
    "vit_h": (14, 1280, 16),
}
DECODER_DIM, DECODER_HEADS, MASK_RATIO, IMG = 512, 16, 0.75, 224
OPS = ("patch_gather", "patch_scatter", "decoder_unshuffle", "norm_pix_loss", "attention",
       "patch_embed_visible", "add_layer_norm", "bias_gelu")
SDPA_BACKENDS = {"sdpa:cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa:flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa:efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa:math": SDPBackend.MATH}
F32 = torch.float32


@dataclass
class Case:
    """One op at one model's shapes. make(seed) -> (args, grad_args): fn(*args) is the forward (a tensor
    or a tuple of tensors); grad_args are the tensors the backward differentiates (empty: forward only).
    Memory-bound ops carry their minimum bytes per pass and the rule that counts them."""

    op: str
    model: str
    shapes: dict
    make: Callable
    bytes_fwd: float = 0.0
    bytes_bwd: float = 0.0
    min_bytes_rule: str = ""
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    impls: dict = field(default_factory=dict)


def _masking(B, L, K, device):
    ids_shuffle = torch.rand(B, L, device=device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(B, L, device=device)
    mask[:, :K] = 0
    return ids_shuffle[:, :K].contiguous(), ids_restore, torch.gather(mask, 1, ids_restore)


def _sdpa_with(backend: SDPBackend):
    def run(q, k, v, scale=None):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return run


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
        out["sdpa"] = (recs["sdpa"].fn, None)  # auto's SDPA: cuDNN first, SDPA's own fallbacks after
        out.update({name: (_sdpa_with(b), None) for name, b in SDPA_BACKENDS.items()})
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
        D = DECODER_DIM

        def gather(seed, B=B, L=L, K=K, p=p):
            torch.manual_seed(seed)
            imgs = torch.randn(B, 3, IMG, IMG, device=device, dtype=dtype, requires_grad=True)
            ids_keep, _, _ = _masking(B, L, K, device)
            return (imgs, ids_keep, p), (imgs,)

        def scatter(seed, B=B, L=L, K=K):
            torch.manual_seed(seed)
            tokens = torch.randn(B, K, D, device=device, dtype=dtype, requires_grad=True)
            mtok = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
            _, ids_restore, _ = _masking(B, L, K, device)
            return (tokens, ids_restore, mtok), (tokens, mtok)

        def unshuffle(seed, B=B, L=L, K=K):  # as the MAE decoder: dtype tokens, fp32 parameters
            torch.manual_seed(seed)
            x = torch.randn(B, 1 + K, D, device=device, dtype=dtype, requires_grad=True)
            mtok = torch.randn(D, device=device, requires_grad=True)
            pos = torch.randn(1 + L, D, device=device)
            _, ids_restore, _ = _masking(B, L, K, device)
            return (x, ids_restore, mtok, pos), (x, mtok)

        def loss(seed, B=B, L=L, K=K, p=p):
            torch.manual_seed(seed)
            pred = torch.randn(B, L, P, device=device, dtype=dtype, requires_grad=True)
            imgs = torch.randn(B, 3, IMG, IMG, device=device, dtype=dtype)
            _, _, mask = _masking(B, L, K, device)
            return (pred, imgs, mask, p, True), (pred,)

        def attn(seed, N, H, Dh, B=B):
            # q, k, v as the model makes them: strided views of one [B, N, 3, H, Dh] qkv projection
            torch.manual_seed(seed)
            qkv = torch.randn(B, N, 3, H, Dh, device=device, dtype=dtype, requires_grad=True)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            return (q, k, v, None), (qkv,)

        def embed(seed, B=B, L=L, K=K, p=p, dim=dim):
            torch.manual_seed(seed)
            imgs = torch.randn(B, 3, IMG, IMG, device=device, dtype=dtype)
            w = (torch.randn(dim, 3, p, p, device=device, dtype=dtype) * 0.02).requires_grad_()
            b = torch.zeros(dim, device=device, dtype=dtype, requires_grad=True)
            pos = (torch.randn(L, dim, device=device, dtype=dtype) * 0.02).requires_grad_()
            ids_keep, _, _ = _masking(B, L, K, device)
            return (imgs, ids_keep, w, b, pos), (w, b, pos)

        def layer_norm(seed, M, N):  # a block's add + norm: branch output in dtype, fp32 stream
            torch.manual_seed(seed)
            x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
            res = torch.randn(M, N, device=device, requires_grad=True)
            w = torch.ones(N, device=device, requires_grad=True)
            b = torch.zeros(N, device=device, requires_grad=True)
            return (x, res, w, b, 1e-6, F32), (x, res, w, b)

        def gelu(seed, M, N):
            torch.manual_seed(seed)
            x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(N, device=device, requires_grad=True)
            return (x, b), (x, b)

        if "patch_gather" in ops:
            cases.append(Case("patch_gather", name, dict(B=B, img=IMG, p=p, K=K), gather,
                              bytes_fwd=2 * B * K * P * e + B * K * 8,
                              bytes_bwd=B * K * P * e + B * 3 * IMG * IMG * e,
                              min_bytes_rule="fwd: read the K kept patches + ids_keep, write [B, K, P]; "
                                             "bwd: read [B, K, P], write the whole image gradient"))
        if "patch_scatter" in ops:
            cases.append(Case("patch_scatter", name, dict(B=B, L=L, K=K, D=D), scatter,
                              bytes_fwd=B * (K + L) * D * e + B * L * 8,
                              bytes_bwd=B * (K + L) * D * e + B * L * 8,
                              min_bytes_rule="fwd: read [B, K, D] + ids_restore, write [B, L, D]; "
                                             "bwd: read [B, L, D] + ids_restore, write [B, K, D]"))
        if "decoder_unshuffle" in ops:
            cases.append(Case("decoder_unshuffle", name, dict(B=B, L=L, K=K, D=D), unshuffle,
                              bytes_fwd=B * (1 + K) * D * e + B * L * 8 + B * (1 + L) * D * 4,
                              bytes_bwd=B * (1 + L) * D * 4 + B * L * 8 + B * (1 + K) * D * e,
                              min_bytes_rule="fwd: read [B, 1+K, D] (dtype) + ids_restore, write [B, 1+L, D] "
                                             "fp32 (pos rows stay in cache); bwd: read the fp32 gradient + "
                                             "ids_restore, write [B, 1+K, D]"))
        if "norm_pix_loss" in ops:
            hidden = B * (L - K) * P * e
            cases.append(Case("norm_pix_loss", name, dict(B=B, L=L, P=P), loss,
                              bytes_fwd=2 * hidden + B * L * 4,
                              bytes_bwd=2 * hidden + B * L * P * e + B * L * 4,
                              min_bytes_rule="fwd: read pred and image at hidden patches + mask; bwd: the "
                                             "same reads, write the whole [B, L, P] gradient"))
        if "attention" in ops:
            for part, N, H, Dh in (("encoder", K + 1, heads, dim // heads),
                                   ("decoder", L + 1, DECODER_HEADS, D // DECODER_HEADS)):
                f = 4.0 * B * H * N * N * Dh
                cases.append(Case("attention", f"{name}.{part}",
                                  dict(B=B, H=H, N=N, Dh=Dh, qkv="strided views"),
                                  lambda s, N=N, H=H, Dh=Dh: attn(s, N, H, Dh),
                                  flops_fwd=f, flops_bwd=2.5 * f))  # FlashAttention's count: bwd = 2.5 fwd
        if "patch_embed_visible" in ops:
            f = 2.0 * B * K * P * dim
            cases.append(Case("patch_embed_visible", name, dict(B=B, K=K, P=P, D=dim), embed,
                              flops_fwd=f, flops_bwd=f))  # backward: weight gradient only (images need none)
        for part, M, N in (("encoder", B * (K + 1), dim), ("decoder", B * (L + 1), D)):
            if "add_layer_norm" in ops:
                cases.append(Case("add_layer_norm", f"{name}.{part}", dict(M=M, N=N, stream="fp32"),
                                  lambda s, M=M, N=N: layer_norm(s, M, N),
                                  bytes_fwd=M * N * (2 * e + 8), bytes_bwd=M * N * (2 * e + 12),
                                  min_bytes_rule="fwd: read x (dtype) + residual (fp32), write y (dtype) + h "
                                                 "(fp32); bwd: read dy, h, dh_out, write dx (dtype) + "
                                                 "dresidual (fp32)"))
            if "bias_gelu" in ops:
                cases.append(Case("bias_gelu", f"{name}.{part}", dict(M=M, N=4 * N),
                                  lambda s, M=M, N=4 * N: gelu(s, M, N),
                                  bytes_fwd=2 * M * 4 * N * e, bytes_bwd=3 * M * 4 * N * e,
                                  min_bytes_rule="fwd: read x, write y; bwd: read dy and x, write dx"))
    return cases


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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


def copy_ceiling(device: str, nbytes: int | None = None, reps: int = 10) -> dict:
    """The device's achievable memory bandwidth: a device-to-device copy, bytes read + written per second."""
    nbytes = nbytes or (1 << 30 if device == "cuda" else 64 << 20)
    src = torch.empty(nbytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    ms = _timer(device)(lambda i: dst.copy_(src), reps)
    return {"bytes_copied": nbytes, "ms": round(ms, 4), "GB/s": round(2 * nbytes / ms / 1e6, 1)}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def measure(case: Case, impl: str, fn, device: str, reps: int, warmup: int, ceiling_gbps: float | None = None
            ) -> list[dict]:
    """Rows for the forward and forward+backward passes of one implementation."""
    inputs = [case.make(seed) for seed in range(3)]
    grads = []
    with torch.no_grad():
        for args, _ in inputs:
            grads.append([torch.randn(o.shape, device=o.device).to(o.dtype) for o in _as_tuple(fn(*args))])
    timer = _timer(device)
    rows = []
    compile_s = None

    def fwd_bwd(i):
        args, wrt = inputs[i % 3]
        torch.autograd.grad(_as_tuple(fn(*args)), wrt, grads[i % 3])

    if impl == "torch.compile":
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(*inputs[0][0])
        fwd_bwd(0)
        _sync(device)
        compile_s = time.perf_counter() - t0

    def fwd(i):
        args, _ = inputs[i % 3]
        with torch.no_grad():
            fn(*args)

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
            gbps = nbytes / ms / 1e6
            row.update({"min_bytes": int(nbytes), "GB/s": round(gbps, 2)})
            if ceiling_gbps:
                row["pct_of_copy"] = round(100 * gbps / ceiling_gbps, 1)
        if flops:
            row["TFLOP/s"] = round(flops / ms / 1e9, 2)
        if compile_s is not None:
            row["compile_s"] = round(compile_s, 1)
        rows.append(row)
    return rows


def _format(r: dict) -> str:
    head = f"{r['op']:20s} {r['model']:14s} {r['impl']:14s} {r.get('pass_', ''):8s} "
    if "ms" not in r:
        return head + (f"skipped: {r['skipped']}" if "skipped" in r else r.get("error", ""))
    return head + (f"{r['ms']:9.3f} ms  " + (f"{r['GB/s']:8.1f} GB/s  " if "GB/s" in r else "")
                   + (f"{r['pct_of_copy']:5.1f}% of copy  " if "pct_of_copy" in r else "")
                   + (f"{r['TFLOP/s']:7.2f} TFLOP/s  " if "TFLOP/s" in r else "")
                   + (f"peak {r['peak_mb']} MiB" if r.get("peak_mb") is not None else ""))


def run(device: str, batch: int, dtype: torch.dtype, models, ops, reps: int, warmup: int, compile_: bool,
        log=print) -> dict:
    ceiling = copy_ceiling(device)
    log(f"copy ceiling: {ceiling['GB/s']} GB/s ({ceiling['bytes_copied'] >> 20} MiB device-to-device copy)")
    rows, rules = [], {}
    for case in build_cases(device, batch, dtype, models, ops):
        if case.min_bytes_rule:
            rules[case.op] = case.min_bytes_rule
        for impl, (fn, skip) in _impls(case.op, device).items():
            if impl == "torch.compile" and not compile_:
                fn, skip = None, "--no-compile"
            if fn is None:
                rows.append(dict(op=case.op, model=case.model, shapes=case.shapes, impl=impl, skipped=skip))
                log(_format(rows[-1]))
                continue
            try:
                new = measure(case, impl, fn, device, reps, warmup, ceiling["GB/s"])
            except Exception as ex:  # one failing implementation must not hide the others' numbers
                new = [dict(op=case.op, model=case.model, shapes=case.shapes, impl=impl,
                            error=f"{type(ex).__name__}: {ex}"[:500])]
            for r in new:
                log(_format(r))
            rows.extend(new)
            if device == "cuda":
                torch.cuda.empty_cache()
    return dict(meta=_meta(device, batch, dtype), copy_ceiling=ceiling, min_bytes_rules=rules, rows=rows,
                ratios=_ratios(rows))


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


def auto_table_entries(result: dict, source: str) -> dict:
    """{op: {"order", "figure", "source"}}: each op's registered backends by fwd+bwd time at the largest
    model the run measured (its first row for the op), fastest first. Backends the run did not time
    (skipped, failed) are left out: auto appends them in the rule's order."""
    entries = {}
    by_op: dict = {}
    for r in result["rows"]:
        if r.get("pass_") == "fwd+bwd" and "ms" in r:
            by_op.setdefault(r["op"], {}).setdefault(r["model"], {})[r["impl"]] = r
    order_of_models = list(MODELS)
    for op, per_model in by_op.items():
        model = max(per_model, key=lambda m: order_of_models.index(m.split(".")[0]))
        names = set(backends.backends_for(op))
        timed = sorted(((r["ms"], impl) for impl, r in per_model[model].items() if impl in names))
        if len(timed) < 2:
            continue
        figure = ", ".join(f"{impl} {ms:.3f} ms" for ms, impl in timed)
        entries[op] = {"order": [impl for _, impl in timed],
                       "figure": f"{model} {result['meta']['dtype']} batch {result['meta']['batch']} "
                                 f"fwd+bwd: {figure}",
                       "source": source}
    return entries


def update_auto_table(path: str, arch: str, entries: dict) -> dict:
    """Merge this run's entries for `arch` into the table at `path` (atomic write); returns the table."""
    table = {"archs": {}}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    table.setdefault("archs", {}).setdefault(arch, {}).update(entries)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)
    return table


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
        arch=backends.cuda_arch() if device == "cuda" else None,
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
    ap.add_argument("--update-auto-table", default=None, metavar="PATH",
                    help="merge the measured backend order per op for this GPU's architecture into PATH "
                         "(the committed table is benchmarks/results/auto_backends.json)")
    a = ap.parse_args(argv)
    on_gpu = a.device == "cuda"
    if a.update_auto_table and not on_gpu:
        ap.error("--update-auto-table needs a GPU run (the table is per GPU architecture)")
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
    if a.update_auto_table:
        entries = auto_table_entries(result, os.path.basename(out))
        update_auto_table(a.update_auto_table, result["meta"]["arch"], entries)
        print(f"updated {a.update_auto_table} for {result['meta']['arch']}: "
              + "; ".join(f"{op}: {' > '.join(e['order'])}" for op, e in entries.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
