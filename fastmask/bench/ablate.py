"""`fastmask bench --ablate`: the MAE training step with each optimization added in turn, side by side.

    python -m fastmask.bench.ablate --model vit_tiny_patch16 --img-size 64 --batch-size 4 --threads 1
    python -m fastmask.bench.ablate --model vit_large_patch16 --batch-size 256 --dtype bf16 \
        --out benchmarks/results/x.json

Rows (cumulative: each adds one optimization to the row before it; all timed in interleaved rounds in
one process, `fastmask.bench.timing.time_interleaved`, so drifting load hits every row alike):

  baseline          (a) the official-style plain PyTorch MAE (`fastmask.bench.baseline`): all-patch conv
                        embedding + torch.gather masking, eager attention, loss on all patches then
                        masked, `loss.item()` per step, AdamW foreach=False
  visible_only      (b) fastmask's MAE with every op on the `torch` (reference) backend: only the visible
                        patches are embedded and encoded. Its step is
                        `fastmask.bench.step.make_fastmask_step`, so this row also switches to torch's
                        fused AdamW and drops the per-step host sync
  fused_ops         (c) + fused patch embedding (gather + matmul + pos), scatter and norm-pix loss
                        (per op: `cuda` where the extension is built and implements it, else `triton`)
  attn_<backend>    (d) + one attention backend each: sdpa, triton, xformers
  fused_ln_gelu     (e) + the fused residual-add + LayerNorm / bias + GELU chain (`run_blocks`), with the
                        attention backend `auto` picks for the encoder's shape (or --attention)
  compile           (f) + torch.compile of the whole method (mode="default")
  cuda_graphs       (g) + CUDA graphs: torch.compile(mode="reduce-overhead"), which captures the compiled
                        step's kernels in CUDA graphs (MAE's shapes are static). This is how
                        `engine.cuda_graphs=true` maps onto torch.

A row whose optimization cannot run here is reported as skipped with the reason (the backend
records' own messages, `fastmask.ops.backends`); later rows then keep the previous choice for
those ops and say so in their `note`. Triton on the CPU exists only through the interpreter
(TRITON_INTERPRET=1): such rows are skipped, interpreter timings are not performance.

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
from .step import (DTYPES, StepBenchArgs, build_baseline, build_fastmask_method, device_info, find_mae_model,
                   mae_shape, make_fastmask_step, resolve_device_dtype, save_json, versions)
from .baseline import make_train_step
from .timing import measure_peak_memory, time_interleaved

# The ops of the MAE step, in the order they run; every per-op choice names all of them.
OPS = ("patch_embed_visible", "attention", "add_layer_norm", "bias_gelu", "patch_scatter", "norm_pix_loss")
FUSED_MEMORY_OPS = ("patch_embed_visible", "patch_scatter", "norm_pix_loss")
CHAIN_OPS = ("add_layer_norm", "bias_gelu")
ATTENTION_BACKENDS = ("sdpa", "triton", "xformers")
ROW_KINDS = ("baseline", "visible_only", "fused_ops", "attention", "fused_ln_gelu", "compile", "cuda_graphs")
INTERPRETER_REASON = ("Triton on the CPU runs only through its interpreter (TRITON_INTERPRET=1): "
                      "interpreter timings are not performance")


# ---------------------------------------------------------------------------------------- per-op backends
# Modules whose public function resolves its backend through `select` (imported by name) and the
# package namespace, which `fastmask.models.blocks.fused_chain_backend` reads as `ops.select`.
_SELECT_HOLDERS = ("fastmask.ops.attention", "fastmask.ops.layer_norm", "fastmask.ops.bias_gelu",
                   "fastmask.ops.patch_embed", "fastmask.ops.patch_gather", "fastmask.ops.patch_scatter",
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
    """One configuration: per-op backends (None for the baseline), how it is compiled, why it is skipped."""

    name: str
    label: str
    ops: dict[str, str] | None = None
    compile_mode: str | None = None     # None | "default" | "reduce-overhead"
    skip: str = ""                      # non-empty: not run, and why
    note: str = ""                      # what this row runs that differs from its label


def plan_rows(device: torch.device, attention: str = "auto", attention_probe: dict | None = None,
              kinds: tuple[str, ...] = ROW_KINDS) -> list[Row]:
    """The cumulative rows for `device`. attention: the backend rows (e) onwards use ("auto": what
    `select` picks for `attention_probe`, the encoder's q/k/v). kinds: which rows to run; the others
    are listed as skipped ("not requested")."""
    from fastmask.ops import backends

    rows: list[Row] = [Row("baseline", "(a) baseline: official-style plain PyTorch")]
    ops = {op: "torch" for op in OPS}
    rows.append(Row("visible_only", "(b) + visible-only encoder and patch embedding (all ops torch)",
                    dict(ops)))

    # (c) fused memory-bound ops
    fused, missing = {}, []
    for op in FUSED_MEMORY_OPS:
        name, why = _fused_choice(op, device)
        if name:
            fused[op] = name
        else:
            missing.append(why)
    row_c = Row("fused_ops", "(c) + fused patch embed / scatter / norm-pix loss", {**ops, **fused})
    if missing:
        row_c.skip = "; ".join(missing)
    rows.append(row_c)
    ops.update(fused if not missing else {})
    carried = [] if not missing else ["fused patch embed/scatter/loss unavailable here (torch)"]

    # (d) each attention backend on top of (c)
    attn_table = backends.backends_for("attention")
    for name in ATTENTION_BACKENDS:
        row = Row(f"attn_{name}", f"(d) + attention backend {name}", {**ops, "attention": name},
                  note="; ".join(carried))
        rec = attn_table.get(name)
        row.skip = (f"attention: backend {name!r} is not registered" if rec is None
                    else _why_not(rec, device))
        rows.append(row)

    # (e) fused LayerNorm / GELU chain, with one attention backend
    if attention == "auto":
        if attention_probe is not None:
            attention = backends.select("attention", "auto", **attention_probe).name
        else:
            attention = "sdpa"
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
    row_e = Row("fused_ln_gelu", f"(e) + fused add+LayerNorm / bias+GELU chain (attention {attention})",
                {**ops, **chain}, skip="; ".join(chain_missing), note="; ".join(carried))
    rows.append(row_e)
    if not chain_missing:
        ops.update(chain)
    else:
        carried.append("fused LayerNorm/GELU unavailable here (torch)")

    rows.append(Row("compile", "(f) + torch.compile", dict(ops), compile_mode="default",
                    note="; ".join(carried)))
    rows.append(Row("cuda_graphs", "(g) + CUDA graphs (torch.compile mode='reduce-overhead')", dict(ops),
                    compile_mode="reduce-overhead", note="; ".join(carried),
                    skip="" if device.type == "cuda" else
                    f"CUDA graphs need a CUDA device (this run is on {device.type})"))
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
    attention: str = "auto"             # attention backend of rows (e)-(g)
    rows: tuple[str, ...] = ROW_KINDS
    compile_backend: str = "inductor"   # torch.compile backend of the compile row (inductor: the real one)
    peak_tflops: float | None = None
    num_inputs: int = 3
    memory: bool = True
    seed: int = 0


def _step_args(a: AblateArgs) -> StepBenchArgs:
    return StepBenchArgs(method="mae", model=a.model, img_size=a.img_size, batch_size=a.batch_size,
                         mask_ratio=a.mask_ratio, dtype=a.dtype, device=a.device, warmup=a.warmup,
                         repeats=a.repeats, threads=a.threads, backend="torch", recipe=a.recipe,
                         overrides=tuple(a.overrides), peak_tflops=a.peak_tflops, num_inputs=a.num_inputs,
                         memory=a.memory, seed=a.seed)


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


def _build_row(row: Row, a: AblateArgs, sa: StepBenchArgs, shape: F.MAEShape, device: torch.device,
               dtype: torch.dtype) -> tuple[Callable, nn.Module]:
    torch.manual_seed(a.seed)  # every row starts from the same weights
    if row.ops is None:
        model = build_baseline(shape, False, device)
        return make_train_step(model, dtype, a.mask_ratio), model
    method = build_fastmask_method(sa, device)
    module = method
    if row.compile_mode:
        # CUDA graphs exist only in inductor's reduce-overhead mode; --compile-backend is the compile row's.
        backend = "inductor" if row.compile_mode == "reduce-overhead" else a.compile_backend
        module = torch.compile(method, mode=row.compile_mode, backend=backend)
    return _with_ops(make_fastmask_step(module, dtype, device), OpBackends(row.ops)), method


def run_ablation(args: AblateArgs | argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Plan, build, time and measure every row; -> the JSON-ready result (see the module docstring)."""
    a = args if isinstance(args, AblateArgs) else args_from_namespace(args)
    validate(a)
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
            step, _ = _build_row(row, a, sa, shape, device, dtype)
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
        peak = F.peak_tflops(torch.cuda.get_device_name(device),
                             {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])
    flops_step = F.mae_train_flops(shape, a.batch_size)
    base_s = timings["baseline"].median_s if "baseline" in timings else None
    out_rows = []
    for row in rows:
        r: dict[str, Any] = {"name": row.name, "label": row.label, "ops": row.ops,
                             "compile_mode": row.compile_mode, "note": row.note,
                             "status": "skipped" if row.skip else "measured", "reason": row.skip or None}
        if row.compile_mode == "default":
            r["compile_backend"] = a.compile_backend
        if not row.skip:
            t = timings[row.name]
            mem = (measure_peak_memory(lambda n=row.name: steps[n](inputs[0]), device) if a.memory
                   else {"peak_bytes": None, "kind": "not measured"})
            r.update(step_s_median=t.median_s, step_s_min=t.min_s, step_s_times=t.times_s,
                     first_step_s=first[row.name], images_per_s=a.batch_size / t.median_s,
                     tflops=flops_step / t.median_s / 1e12, mfu=F.mfu(flops_step, t.median_s, peak),
                     peak_memory_bytes=mem["peak_bytes"], memory=mem,
                     speedup_vs_baseline=base_s / t.median_s if base_s else None,
                     # Rows are timed in interleaved rounds: the median of per-round ratios cancels load
                     # that drifts between rounds (a shared CPU) better than the ratio of the medians.
                     speedup_vs_baseline_per_round_median=statistics.median(
                         b / x for b, x in zip(timings["baseline"].times_s, t.times_s)) if base_s else None)
        out_rows.append(r)

    result = {
        "benchmark": "ablation",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": versions(),
        "env": {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
                "FASTMASK_BACKEND": os.environ.get("FASTMASK_BACKEND")},
        "args": {**dataclasses.asdict(a), "dtype": {v: k for k, v in DTYPES.items()}[dtype],
                 "device": str(device)},
        "shapes": {"images": [a.batch_size, shape.in_chans, a.img_size, a.img_size],
                   "patches": shape.num_patches, "visible": shape.len_keep, **dataclasses.asdict(shape)},
        "flops_per_step": flops_step,
        "flops_counted": "matrix products incl. the all-patch embedding (fastmask.bench.flops), "
                         "training = 3x forward; the same count for every row, so TFLOP/s compare "
                         "like images/s",
        "peak_tflops": peak,
        "rows": out_rows,
    }
    log(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width text table of the rows (skipped rows with their reason)."""
    head = (f"{'row':<16} {'ms/step':>9} {'img/s':>9} {'TFLOP/s':>9} {'MFU':>6} {'peak MiB':>9} "
            f"{'speed-up':>8} {'per-round':>9}")
    a = result["args"]
    lines = [f"ablation: {a['model']} {a['img_size']}px, batch {a['batch_size']}, {a['dtype']}, "
             f"{result['device']['name']}", head, "-" * len(head)]
    for r in result["rows"]:
        if r["status"] != "measured":
            lines.append(f"{r['name']:<16} skipped: {r['reason']}")
            continue
        mem, mfu, up = r["peak_memory_bytes"], r["mfu"], r["speedup_vs_baseline"]
        mfu_s = "" if mfu is None else f"{100 * mfu:.1f}%"
        mem_s = "" if mem is None else f"{mem / 2**20:.1f}"
        up_s = "" if up is None else f"{up:.2f}x"
        pr = r["speedup_vs_baseline_per_round_median"]
        pr_s = "" if pr is None else f"{pr:.2f}x"
        lines.append(f"{r['name']:<16} {r['step_s_median'] * 1e3:>9.1f} {r['images_per_s']:>9.2f} "
                     f"{r['tflops']:>9.4f} {mfu_s:>6} {mem_s:>9} {up_s:>8} {pr_s:>9}"
                     + (f"  [{r['note']}]" if r["note"] else ""))
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
                        help="attention backend of the fused-LN, compile and CUDA-graph rows "
                             "(default: auto's pick)")
    parser.add_argument("--rows", default=",".join(_D.rows),
                        help=f"comma-separated subset of {','.join(ROW_KINDS)}")
    parser.add_argument("--compile-backend", default=_D.compile_backend,
                        help="torch.compile backend of the compile row "
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
