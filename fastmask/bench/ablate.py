"""`fastmask bench --ablate`: from the official MAE step to fastmask's, one change per row, side by side.

    python -m fastmask.bench.ablate --model vit_tiny_patch16 --img-size 64 --batch-size 4 --threads 1
    python -m fastmask.bench.ablate --model vit_large_patch16 --batch-size 256 --dtype bf16 \
        --out benchmarks/results/x.json

Every row is timed in interleaved rounds in one process (`fastmask.bench.timing.time_interleaved`), so
drifting load hits every row alike. Each row names the row it starts from (`base`) and the one thing
it changes (`changed`); `speedup_vs_base` is what that one change bought (median of per-round
ratios; where the base was skipped, against the nearest measured row it builds on, `measured_base`),
`speedup_vs_official` the running total.

  official        the official MAE step (`fastmask.bench.baseline_official`): all-patch conv embedding,
                  torch.gather masking, eager attention, loss on all patches then masked, AMP autocast,
                  torch's default AdamW for the device, the loss scaler's per-step gradient norm,
                  `loss.item()` + `torch.cuda.synchronize()` every step
  no_host_sync    - the per-step `loss.item()`, finite check and `synchronize()`
  no_grad_norm    - the per-step gradient norm (one norm per parameter; never used in pretraining)
  fused_adamw     torch's fused AdamW instead of the default implementation (the optimizer row)
  fastmask_model  fastmask's MAE model, every op on the `torch` (reference) backend: only the visible
                  patches are embedded (gather + matmul), the loss is computed on hidden patches only;
                  same step (fused AdamW, no sync, no gradient norm), same weight-decay groups
  fused_ops       + fused patch embedding (gather + matmul + pos), scatter and norm-pix loss
                  (per op: `cuda` where the extension is built and implements it, else `triton`)
  attn_<backend>  + one attention backend each, from fused_ops: sdpa, triton, xformers
  fused_ln_gelu   + the fused residual-add + LayerNorm / bias + GELU chain (`run_blocks`), with the
                  attention backend `auto` picks for the encoder's shape (or --attention)
  compile         + torch.compile of the whole method (mode="default")
  cuda_graphs     compile's mode="reduce-overhead" instead (CUDA graphs: MAE's shapes are static),
                  which is how `engine.cuda_graphs=true` maps onto torch
  fastmask        what `fastmask pretrain` runs with this config (`fastmask.bench.engine_step`): the
                  DeepSpeed engine step, backends as `engine.backend` (auto), `engine.compile` as set
  strong          the strong baseline (`fastmask.bench.baseline_strong`): the official model code with
                  timm's SDPA blocks, fused AdamW, no syncs, torch.compile (--compile-backend)

The table ends with fastmask vs strong and fastmask vs official. A row that cannot run here is
reported as skipped with the reason (the backend records' own messages, `fastmask.ops.backends`);
later rows then keep the previous choice for those ops and say so in their `note`. Triton on the CPU
exists only through the interpreter (TRITON_INTERPRET=1): such rows are skipped, interpreter timings
are not performance.

Backends per op: the model's `backend=` argument (cfg.engine.backend) is one name for every op, and
`cuda` implements only the memory-bound ops, so one name cannot say "sdpa attention, cuda loss,
torch LayerNorm". `OpBackends` below does that for the duration of a call by routing each op's
`select` to a per-op name; see its docstring.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import importlib
import os
import statistics
import sys
from typing import Any, Callable

import torch
from torch import nn

from . import flops as F
from .baseline_official import make_official_step
from .step import (DTYPE_NAMES, DTYPES, StepBenchArgs, build_fastmask_method, build_official, device_info,
                   fastmask_config, find_mae_model, mae_shape, make_fastmask_step, official_dims,
                   resolve_device_dtype, save_json, versions)
from .timing import measure_peak_memory, time_interleaved

# The ops of the MAE step, in the order they run; every per-op choice names all of them.
# (The decoder's unshuffle runs `decoder_unshuffle`, which fuses patch_scatter's gather with the position
# add.)
OPS = ("patch_embed_visible", "attention", "add_layer_norm", "bias_gelu", "decoder_unshuffle",
       "norm_pix_loss")
FUSED_MEMORY_OPS = ("patch_embed_visible", "decoder_unshuffle", "norm_pix_loss")
CHAIN_OPS = ("add_layer_norm", "bias_gelu")
ATTENTION_BACKENDS = ("sdpa", "triton", "xformers")
ROW_KINDS = ("official", "no_host_sync", "no_grad_norm", "fused_adamw", "fastmask_model", "fused_ops",
             "attention", "fused_ln_gelu", "compile", "cuda_graphs", "fastmask", "strong")
INTERPRETER_REASON = ("Triton on the CPU runs only through its interpreter (TRITON_INTERPRET=1): "
                      "interpreter timings are not performance")


# ---------------------------------------------------------------------------------------- per-op backends
# Modules whose public function resolves its backend through `select` (imported by name) and the
# package namespace, which `fastmask.models.blocks.fused_chain_backend` reads as `ops.select`.
_SELECT_HOLDERS = ("fastmask.ops.attention", "fastmask.ops.layer_norm", "fastmask.ops.bias_gelu",
                   "fastmask.ops.patch_embed", "fastmask.ops.patch_gather", "fastmask.ops.patch_scatter",
                   "fastmask.ops.decoder_unshuffle",
                   "fastmask.ops.norm_pix_loss", "fastmask.ops")
_WRAPPERS: dict[tuple, Callable] = {}


class OpBackends(contextlib.ContextDecorator):
    """with OpBackends({"attention": "sdpa", "norm_pix_loss": "triton", ...}): ... -> each op named in the
    mapping runs on its backend, whatever backend its caller passed; other ops are untouched.

    The plumbing has one backend name per model (cfg.engine.backend -> every module's `backend`), so a
    per-op choice is made where the name is resolved: each op module's `select` is swapped, for the
    duration of the block, for one that substitutes the mapped name (and still raises
    BackendUnavailable when that backend declines). One wrapper object per mapping, reused on every
    entry, so torch.compile's guard on the global sees the same function each step and does not
    recompile. Not thread-safe (module globals); the forward must run inside the block (the backward
    needs nothing: each op's autograd node was fixed in the forward).
    """

    def __init__(self, mapping: dict[str, str]):
        from fastmask.ops import backends

        unknown = [op for op in mapping if op not in backends._REGISTRY and op not in OPS]
        bad = [n for n in mapping.values() if n not in backends.BACKEND_NAMES]
        if unknown or bad:
            raise ValueError(f"OpBackends: unknown ops {unknown} or backend names {bad} "
                             f"(ops: {OPS}; backends: {backends.BACKEND_NAMES})")
        self.mapping = dict(mapping)
        key = tuple(sorted(self.mapping.items()))
        if key not in _WRAPPERS:
            original, table = backends.select, dict(self.mapping)

            def select(op: str, backend: str | None = "auto", **inputs):
                return original(op, table.get(op, backend), **inputs)

            _WRAPPERS[key] = select
        self._select = _WRAPPERS[key]
        self._saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> "OpBackends":
        from fastmask.ops import backends

        for name in _SELECT_HOLDERS:
            mod = importlib.import_module(name)
            if getattr(mod, "select", None) is backends.select:
                self._saved.append((mod, mod.select))
                mod.select = self._select
        return self

    def __exit__(self, *exc) -> None:
        while self._saved:
            mod, fn = self._saved.pop()
            mod.select = fn


def _fused_choice(op: str, device: torch.device) -> tuple[str | None, str]:
    """-> (the fused backend for `op` on `device`: cuda first, then triton; None if neither), the reasons."""
    from fastmask.ops.backends import backends_for

    table = backends_for(op)
    reasons = []
    for name in ("cuda", "triton"):
        rec = table.get(name)
        if rec is None:
            continue  # e.g. cuda implements only the memory-bound ops
        why = _why_not(rec, device)
        if not why:
            return name, ""
        reasons.append(f"{name}: {why}")
    return None, f"{op}: " + "; ".join(reasons or ["no fused backend registered"])


def _why_not(rec, device: torch.device) -> str:
    """A backend record's reason to decline this device, before any tensor exists ('' = it qualifies)."""
    reason = rec.available()
    if reason:
        return reason
    if device.type not in rec.devices:
        return f"device {device.type} not in {rec.devices}"
    if rec.name == "triton" and device.type == "cpu":
        return INTERPRETER_REASON
    return ""


# ---------------------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Row:
    """One configuration: what it runs (`kind`), the row it starts from and the one thing it changes."""

    name: str
    changed: str                        # what this row changes from `base` (or, without base, what it is)
    base: str | None = None             # the row this one differs from by `changed`
    kind: str = "direct"                # official | direct (fastmask method, no DeepSpeed) | engine | strong
    official: dict = dataclasses.field(default_factory=dict)  # make_official_step knobs (kind official)
    ops: dict[str, str] | None = None   # per-op backends (kind direct)
    compile_mode: str | None = None     # None | "default" | "reduce-overhead" (kind direct)
    skip: str = ""                      # non-empty: not run, and why
    note: str = ""                      # what this row runs that differs from `changed` (a fallback)


def _official_rows() -> list[Row]:
    knobs = dict(host_sync=True, grad_norm=True, optimizer="default")
    rows = [Row("official", "the official MAE step (module docstring)", kind="official",
                official=dict(knobs))]
    for name, change, knob in (
            ("no_host_sync", "drops loss.item(), the finite check and cuda.synchronize() per step",
             ("host_sync", False)),
            ("no_grad_norm", "drops the loss scaler's per-step gradient norm (unused in pretraining)",
             ("grad_norm", False)),
            ("fused_adamw", "torch's fused AdamW instead of its default implementation for the device",
             ("optimizer", "fused"))):
        knobs[knob[0]] = knob[1]
        rows.append(Row(name, change, rows[-1].name, kind="official", official=dict(knobs)))
    return rows


def plan_rows(device: torch.device, attention: str = "auto", attention_probe: dict | None = None,
              kinds: tuple[str, ...] = ROW_KINDS) -> list[Row]:
    """The rows for `device`. attention: the backend rows (e) onwards use ("auto": what `select` picks
    for `attention_probe`, the encoder's q/k/v). kinds: which rows to run; the others are listed as
    skipped ("not requested")."""
    from fastmask.ops import backends

    rows = _official_rows()
    ops = {op: "torch" for op in OPS}
    rows.append(Row("fastmask_model", "fastmask's MAE model, every op on the torch backend: only visible "
                    "patches embedded, loss on hidden patches only", "fused_adamw", ops=dict(ops)))

    # fused memory-bound ops
    fused, missing = {}, []
    for op in FUSED_MEMORY_OPS:
        name, why = _fused_choice(op, device)
        if name:
            fused[op] = name
        else:
            missing.append(why)
    rows.append(Row("fused_ops", "fused patch embed / scatter / norm-pix loss", "fastmask_model",
                    ops={**ops, **fused}, skip="; ".join(missing)))
    ops.update(fused if not missing else {})
    carried = [] if not missing else ["fused patch embed/scatter/loss unavailable here (torch)"]

    # each attention backend on top of fused_ops
    attn_table = backends.backends_for("attention")
    for name in ATTENTION_BACKENDS:
        rec = attn_table.get(name)
        rows.append(Row(f"attn_{name}", f"attention backend {name}", "fused_ops",
                        ops={**ops, "attention": name}, note="; ".join(carried),
                        skip=(f"attention: backend {name!r} is not registered" if rec is None
                              else _why_not(rec, device))))

    # the fused LayerNorm / GELU chain, with one attention backend
    if attention == "auto":
        attention = ("sdpa" if attention_probe is None
                     else backends.select("attention", "auto", **attention_probe).name)
    ops["attention"] = attention
    attn_row = next((r for r in rows if r.name == f"attn_{attention}"), None)
    if attn_row is not None and attn_row.skip:
        carried.append(f"attention {attention} unavailable: {attn_row.skip}")
    chain, chain_missing = {}, []
    for op in CHAIN_OPS:
        rec = backends.backends_for(op).get("triton")
        why = "no triton backend registered" if rec is None else _why_not(rec, device)
        if why:
            chain_missing.append(f"{op}: triton: {why}")
        else:
            chain[op] = "triton"
    rows.append(Row("fused_ln_gelu", "fused add+LayerNorm / bias+GELU chain",
                    f"attn_{attention}" if attn_row is not None else "fused_ops", ops={**ops, **chain},
                    skip="; ".join(chain_missing), note="; ".join(carried)))
    if not chain_missing:
        ops.update(chain)
    else:
        carried.append("fused LayerNorm/GELU unavailable here (torch)")

    rows.append(Row("compile", "torch.compile of the method", "fused_ln_gelu", ops=dict(ops),
                    compile_mode="default", note="; ".join(carried)))
    rows.append(Row("cuda_graphs", "torch.compile mode='reduce-overhead' (CUDA graphs) instead of 'default'",
                    "compile", ops=dict(ops), compile_mode="reduce-overhead", note="; ".join(carried),
                    skip="" if device.type == "cuda" else
                    f"CUDA graphs need a CUDA device (this run is on {device.type})"))
    from .baseline_strong import why_not_strong
    from .engine_step import why_not_engine

    rows.append(Row("fastmask", "what fastmask pretrain runs with this config: the DeepSpeed engine step",
                    kind="engine", skip=why_not_engine() or ""))
    rows.append(Row("strong", "the strong baseline: official model code, timm SDPA blocks, fused AdamW, "
                    "no syncs, torch.compile", kind="strong", skip=why_not_strong() or ""))
    for row in rows:
        kind = "attention" if row.name.startswith("attn_") else row.name
        if kind not in kinds and not row.skip:
            row.skip = "not requested (--rows)"
    return rows


# ---------------------------------------------------------------------------------------- args
@dataclasses.dataclass
class AblateArgs:
    model: str = "vit_base_patch16"
    img_size: int = 224
    batch_size: int = 8
    mask_ratio: float = 0.75
    dtype: str = "auto"                 # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"
    warmup: int = 2
    repeats: int = 5
    threads: int | None = None
    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    attention: str = "auto"             # attention backend of the fused_ln_gelu, compile and cuda_graphs rows
    rows: tuple[str, ...] = ROW_KINDS
    compile_backend: str = "inductor"   # torch.compile backend of the compile and strong rows
    peak_tflops: float | None = None
    num_inputs: int = 3
    memory: bool = True
    seed: int = 0


def _step_args(a: AblateArgs, backend: str = "torch", overrides: tuple[str, ...] = ()) -> StepBenchArgs:
    return StepBenchArgs(method="mae", model=a.model, img_size=a.img_size, batch_size=a.batch_size,
                         mask_ratio=a.mask_ratio, dtype=a.dtype, device=a.device, warmup=a.warmup,
                         repeats=a.repeats, threads=a.threads, backend=backend, recipe=a.recipe,
                         overrides=(*overrides, *a.overrides), peak_tflops=a.peak_tflops,
                         num_inputs=a.num_inputs, memory=a.memory, seed=a.seed)


def validate(a: AblateArgs) -> None:
    problems = []
    bad = [r for r in a.rows if r not in ROW_KINDS]
    if bad or not a.rows:
        problems.append(f"rows must be a non-empty subset of {ROW_KINDS}, got {a.rows}")
    if a.batch_size < 1 or a.repeats < 1 or a.warmup < 0 or a.num_inputs < 1:
        problems.append("batch_size, repeats and num_inputs must be >= 1 and warmup >= 0")
    if not 0.0 < a.mask_ratio < 1.0:
        problems.append(f"mask_ratio must be in (0, 1), got {a.mask_ratio}")
    if a.attention != "auto" and a.attention not in ("torch", *ATTENTION_BACKENDS):
        problems.append(f"attention must be auto|torch|{'|'.join(ATTENTION_BACKENDS)}, got {a.attention!r}")
    if a.peak_tflops is not None and a.peak_tflops <= 0:
        problems.append(f"peak_tflops must be > 0, got {a.peak_tflops}")
    if problems:
        raise ValueError("ablation: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------- the run
def _with_ops(step: Callable, ctx: OpBackends) -> Callable:
    def run(imgs: torch.Tensor):
        with ctx:
            return step(imgs)
    return run


def _build_row(row: Row, a: AblateArgs, shape: F.MAEShape, device: torch.device,
               dtype: torch.dtype) -> Callable:
    torch.manual_seed(a.seed)  # every row starts from the same weights
    if row.kind == "official":
        return make_official_step(build_official(shape, device), dtype, a.mask_ratio, **row.official)
    if row.kind == "strong":
        from .baseline_strong import build_strong_model, make_strong_step

        model = build_strong_model(**official_dims(shape)).to(device)
        return make_strong_step(model, dtype, a.mask_ratio, compile_backend=a.compile_backend)
    if row.kind == "engine":
        from fastmask.methods import build_method

        from .engine_step import make_engine_step

        cfg = fastmask_config(_step_args(a, backend="auto"), dtype)
        return make_engine_step(cfg, build_method(cfg))
    # The official recipe's weight-decay groups (cls and mask tokens decayed), so that the only change
    # from fused_adamw is the model.
    method = build_fastmask_method(_step_args(a, overrides=("method_args.decay_tokens=true",)), device)
    module = method
    if row.compile_mode:
        # CUDA graphs exist only in inductor's reduce-overhead mode; --compile-backend is the compile row's.
        backend = "inductor" if row.compile_mode == "reduce-overhead" else a.compile_backend
        module = torch.compile(method, mode=row.compile_mode, backend=backend)
    return _with_ops(make_fastmask_step(module, dtype, device), OpBackends(row.ops))


def run_ablation(args: AblateArgs | argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Plan, build, time and measure every row; -> the JSON-ready result (see the module docstring)."""
    a = args if isinstance(args, AblateArgs) else args_from_namespace(args)
    validate(a)
    code = versions()  # at the start: the git sha of the code that runs, not of a later checkout
    sa = _step_args(a)
    device, dtype = resolve_device_dtype(sa)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    probe_method = build_fastmask_method(sa, device)
    shape = mae_shape(find_mae_model(probe_method), sa)
    heads = probe_method.blocks[0].attn.num_heads
    q = torch.randn(a.batch_size, heads, 1 + shape.len_keep, shape.embed_dim // heads, device=device,
                    dtype=dtype)
    del probe_method
    rows = plan_rows(device, a.attention, dict(q=q, k=q, v=q, scale=None), tuple(a.rows))

    g = torch.Generator(device="cpu").manual_seed(a.seed + 1)
    inputs = [torch.randn(a.batch_size, 3, a.img_size, a.img_size, generator=g).to(device)
              for _ in range(a.num_inputs)]

    # Build every runnable row and run its first step alone (lazy init, compilation); a row that
    # fails there (a backend declining these exact shapes) is skipped with the error.
    steps: dict[str, Callable] = {}
    first: dict[str, float] = {}
    for row in rows:
        if row.skip:
            log(f"[ablate] {row.name}: skipped: {row.skip}")
            continue
        try:
            step = _build_row(row, a, shape, device, dtype)
            first[row.name] = time_interleaved({row.name: step}, inputs[:1], device, warmup=0, repeats=1)[
                row.name].median_s
        except Exception as e:  # noqa: BLE001 - any failure of one row is that row's result
            from fastmask.ops import BackendUnavailable

            kind = "backend unavailable" if isinstance(e, BackendUnavailable) else type(e).__name__
            row.skip = f"{kind}: {e}"
            log(f"[ablate] {row.name}: skipped: {row.skip}")
            continue
        steps[row.name] = step
        log(f"[ablate] {row.name}: first step {first[row.name]:.3f} s")

    timings = time_interleaved(steps, inputs, device, warmup=max(a.warmup - 1, 0), repeats=a.repeats) \
        if steps else {}

    peak = a.peak_tflops
    if peak is None and device.type == "cuda":
        peak = F.peak_tflops(torch.cuda.get_device_name(device), DTYPE_NAMES[dtype])
    flops_step = F.mae_train_flops(shape, a.batch_size)

    def speedup(slow: str | None, fast: str) -> dict[str, float] | None:
        """time(slow) / time(fast): the ratio of medians, and the median of per-round ratios (rows are
        timed in interleaved rounds, so the latter cancels load that drifts between rounds)."""
        if slow not in timings or fast not in timings:
            return None
        s_, f_ = timings[slow], timings[fast]
        return {"median_ratio": s_.median_s / f_.median_s,
                "per_round_median": statistics.median(x / y for x, y in zip(s_.times_s, f_.times_s))}

    by_name = {row.name: row for row in rows}

    def measured_base(row: Row) -> str | None:
        """The row's base, or where that was skipped, the nearest measured row it builds on."""
        base = row.base
        while base is not None and base not in timings:
            base = by_name[base].base
        return base

    out_rows = []
    for row in rows:
        r: dict[str, Any] = {"name": row.name, "changed": row.changed, "base": row.base,
                             "measured_base": measured_base(row), "kind": row.kind,
                             "official_knobs": row.official or None, "ops": row.ops,
                             "compile_mode": row.compile_mode, "note": row.note,
                             "status": "skipped" if row.skip else "measured", "reason": row.skip or None}
        if row.compile_mode == "default" or row.kind == "strong":
            r["compile_backend"] = a.compile_backend
        if not row.skip:
            t = timings[row.name]
            mem = (measure_peak_memory(lambda n=row.name: steps[n](inputs[0]), device) if a.memory
                   else {"peak_bytes": None, "kind": "not measured"})
            r.update(step_s_median=t.median_s, step_s_min=t.min_s, step_s_times=t.times_s,
                     first_step_s=first[row.name], images_per_s=a.batch_size / t.median_s,
                     tflops=flops_step / t.median_s / 1e12, mfu=F.mfu(flops_step, t.median_s, peak),
                     peak_memory_bytes=mem["peak_bytes"], memory=mem,
                     speedup_vs_official=speedup("official", row.name),
                     speedup_vs_base=speedup(r["measured_base"], row.name))
        out_rows.append(r)

    result = {
        "benchmark": "ablation",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": code,
        "env": {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
                "FASTMASK_BACKEND": os.environ.get("FASTMASK_BACKEND")},
        "args": {**dataclasses.asdict(a), "dtype": DTYPE_NAMES[dtype], "device": str(device)},
        "shapes": {"images": [a.batch_size, shape.in_chans, a.img_size, a.img_size],
                   "patches": shape.num_patches, "visible": shape.len_keep, **dataclasses.asdict(shape)},
        "flops_per_step": flops_step,
        "flops_counted": "matrix products incl. the all-patch embedding (fastmask.bench.flops), "
                         "training = 3x forward; the same count for every row, so TFLOP/s compare "
                         "like images/s",
        "peak_tflops": peak,
        "rows": out_rows,
        # Time of the baseline over fastmask's (> 1: fastmask is faster); None where a row did not run.
        "fastmask_vs_strong": speedup("strong", "fastmask"),
        "fastmask_vs_official": speedup("official", "fastmask"),
    }
    log(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width text table of the rows (skipped rows with their reason), then fastmask vs strong."""
    def x(v: dict | None) -> str:
        return "" if v is None else f"{v['per_round_median']:.2f}x"

    head = (f"{'row':<15} {'ms/step':>9} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>9} "
            f"{'vs base':>8} {'vs official':>11}  changed (from base)")
    a = result["args"]
    lines = [f"ablation: {a['model']} {a['img_size']}px, batch {a['batch_size']}, {a['dtype']}, "
             f"{result['device']['name']}; speed-ups are medians of per-round ratios", head, "-" * len(head)]
    for r in result["rows"]:
        what = r["changed"] + (f" (from {r['base']})" if r["base"] else "")
        if r["measured_base"] != r["base"]:
            what += f" (measured from {r['measured_base']}: {r['base']} was skipped)"
        if r["status"] != "measured":
            lines.append(f"{r['name']:<15} skipped: {r['reason']}")
            continue
        mem, mfu = r["peak_memory_bytes"], r["mfu"]
        mfu_s = "" if mfu is None else f"{100 * mfu:.1f}%"
        mem_s = "" if mem is None else f"{mem / 2**20:.1f}"
        lines.append(f"{r['name']:<15} {r['step_s_median'] * 1e3:>9.1f} {r['images_per_s']:>8.2f} "
                     f"{r['tflops']:>8.4f} {mfu_s:>6} {mem_s:>9} {x(r['speedup_vs_base']):>8} "
                     f"{x(r['speedup_vs_official']):>11}  {what}" + (f"  [{r['note']}]" if r["note"] else ""))
    for other in ("strong", "official"):
        v = result[f"fastmask_vs_{other}"]
        lines.append(f"fastmask vs {other}: " + ("not measured" if v is None else
                                                  f"{v['per_round_median']:.2f}x (per-round median; ratio of "
                                                  f"medians {v['median_ratio']:.2f}x)"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- CLI
_D = AblateArgs()


def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    """The ablation's options (for `fastmask bench --ablate` and `python -m fastmask.bench.ablate`)."""
    parser.add_argument("--model", default=_D.model, help="registered ViT, e.g. vit_tiny_patch16")
    parser.add_argument("--img-size", type=int, default=_D.img_size)
    parser.add_argument("--batch-size", type=int, default=_D.batch_size)
    parser.add_argument("--mask-ratio", type=float, default=_D.mask_ratio)
    parser.add_argument("--dtype", default=_D.dtype, choices=("auto", *DTYPES))
    parser.add_argument("--device", default=_D.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--warmup", type=int, default=_D.warmup)
    parser.add_argument("--repeats", type=int, default=_D.repeats)
    parser.add_argument("--threads", type=int, default=_D.threads, help="torch CPU threads")
    parser.add_argument("--config", dest="recipe", default=_D.recipe, help="config recipe (e.g. mae_tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable")
    parser.add_argument("--attention", default=_D.attention,
                        help="attention backend of the fused_ln_gelu, compile and cuda_graphs rows "
                             "(default: auto's pick)")
    parser.add_argument("--rows", default=",".join(_D.rows),
                        help=f"comma-separated subset of {','.join(ROW_KINDS)}")
    parser.add_argument("--compile-backend", default=_D.compile_backend,
                        help="torch.compile backend of the compile and strong rows "
                             "(inductor; aot_eager to check tracing only)")
    parser.add_argument("--peak-tflops", type=float, default=_D.peak_tflops)
    parser.add_argument("--num-inputs", type=int, default=_D.num_inputs)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--seed", type=int, default=_D.seed)
    parser.add_argument("--out", default=None, help="write the result JSON here")


def args_from_namespace(ns: argparse.Namespace) -> AblateArgs:
    names = {f.name for f in dataclasses.fields(AblateArgs)}
    kw = {k: v for k, v in vars(ns).items() if k in names}
    if isinstance(kw.get("rows"), str):
        kw["rows"] = tuple(r.strip() for r in kw["rows"].split(",") if r.strip())
    kw["overrides"] = tuple(kw.get("overrides") or ())
    return AblateArgs(**kw)


def main(argv: list[str] | None = None, prog: str = "python -m fastmask.bench.ablate") -> int:
    """Parse `argv` (the ablation's options), run, print the table, write --out. `fastmask bench --ablate`
    calls this with the rest of its command line."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    add_ablate_arguments(parser)
    ns = parser.parse_args(argv)
    result = run_ablation(ns)
    if ns.out:
        print(f"[ablate] wrote {save_json(result, ns.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
