"""One-shot GPU suite: everything a lent GPU should measure, in one run of under 10 minutes.

    python benchmarks/gpu_suite.py --out DIR                  # on the GPU (H100/H200), from the checkout
                                                                alone
    python benchmarks/gpu_suite.py --out DIR --build-csrc     # first build fastmask._C for sm_90 (a few
                                                                minutes)
    python benchmarks/gpu_suite.py --out DIR --dry-run        # every stage at tiny shapes on the CPU (CI)

Stages, in order; DIR/gpu_suite.json is rewritten (atomically) when each stage starts and ends, so a run
cut off at any point leaves every finished stage's results and names the one that was running:

  build        (--build-csrc) `setup.py build_ext --inplace` with FASTMASK_BUILD_CUDA=1 and
               FASTMASK_CUDA_ARCHS=90; the log and ptxas's registers/spills per kernel
  env          versions, GPU (name, capability, SMs, memory, L2), a device-to-device copy of 2 GiB
               (the memory-bound ceiling) and a bf16 8192^3 matmul (the compute ceiling)
  correctness  every op x backend at the exact MAE shapes (benchmarks/gpu_correctness.py)
  ops          op timings from benchmarks/bench_ops.py (its `main(argv)`, JSON in DIR/ops.json), each
               row with GB/s as % of the measured copy ceiling and its ratio to the best alternative
  step         one MAE ViT-L/16 step, bf16, batch 256 (`fastmask.bench.step.run_step_bench`):
               fastmask, official and strong side by side, images/s, MFU, peak memory; then
               fastmask with torch.compile alone; then a profiler top-20 of fastmask's step with the
               share of time in copies/casts and the GPU's idle share between its kernels
  summary      DIR/summary.md, a markdown digest of the above

It runs on the lent machine's own stack (torch 2.11, Triton 3.6, no DeepSpeed, no DALI): nothing here
imports deepspeed, so fastmask's step row is the method with the engine's optimizer (fused AdamW)
without DeepSpeed (`fastmask_step="direct"`, said in the JSON). The checkout need not be installed:
the repository root goes on sys.path and `kernels/` is mapped to `fastmask.kernels` as packaging
does. The JSON schema is documented in benchmarks/README.md.

Coupling with the kernel work is at function level only: `bench_ops.main(argv)` (its CLI options
--device --batch --dtype --models --reps --warmup --no-compile --out, and the JSON it writes: "meta",
"rows" with op/model/impl/pass_/ms/GB/s), `fastmask.ops.<op>(..., backend=)`, `backends_for(op)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1
STAGES = ("build", "env", "correctness", "ops", "step", "summary")
COMPILED_STEP_S = 240  # what the compiled fastmask step run needs (compile + timing); skipped with less left
COPY_PATTERN = re.compile(r"copy|cast|_to_copy|memcpy|convert|contiguous", re.IGNORECASE)


def import_project() -> None:
    """Make `fastmask` (and `fastmask.kernels`, `bench_ops`, `gpu_correctness`) importable from the
    checkout."""
    for path in (str(ROOT), str(ROOT / "benchmarks")):
        if path not in sys.path:
            sys.path.insert(0, path)
    import fastmask  # noqa: F401

    try:
        import fastmask.kernels  # noqa: F401  (installed: packaging maps kernels/ there)
    except ImportError:
        spec = importlib.util.spec_from_file_location("fastmask.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastmask.kernels"] = module
        spec.loader.exec_module(module)


@dataclasses.dataclass
class Plan:
    """The shapes and sizes of one run: the real ones on a GPU, tiny ones for --dry-run on the CPU."""

    device: str
    dtype: str                      # of the step and op timings
    correctness_dtypes: tuple[str, ...]
    correctness_batch: int
    copy_bytes: int
    matmul_n: int
    ops_argv: list[str]
    step: dict                      # StepBenchArgs fields
    profile_steps: int = 3
    fastmask_compile: bool = True   # also time fastmask with torch.compile (inductor: minutes on a CPU)

    @classmethod
    def make(cls, dry_run: bool, ops_compile: bool, fastmask_compile: bool = True) -> "Plan":
        if dry_run:
            return cls(device="cpu", dtype="fp32", correctness_dtypes=("float32",), correctness_batch=2,
                       copy_bytes=32 * 2 ** 20, matmul_n=256,
                       ops_argv=["--device", "cpu", "--batch", "1", "--models", "vit_b", "--reps", "1",
                                 "--warmup", "0", "--dtype", "float32", "--no-compile"],
                       step=dict(model="vit_tiny_patch16", img_size=32, batch_size=2, dtype="fp32",
                                 device="cpu", warmup=1, repeats=2, num_inputs=1, strong_compile=False,
                                 overrides=("method_args.decoder_embed_dim=32", "method_args.decoder_depth=1",
                                            "method_args.decoder_num_heads=4")),
                       profile_steps=1, fastmask_compile=False)
        return cls(device="cuda", dtype="bf16", correctness_dtypes=("bfloat16", "float32"),
                   correctness_batch=32, copy_bytes=2 * 2 ** 30, matmul_n=8192,
                   ops_argv=["--device", "cuda", "--batch", "256", "--dtype", "bfloat16", "--reps", "20",
                             "--warmup", "5"] + ([] if ops_compile else ["--no-compile"]),
                   step=dict(model="vit_large_patch16", img_size=224, batch_size=256, dtype="bf16",
                             device="cuda", warmup=2, repeats=5, num_inputs=2),
                   fastmask_compile=fastmask_compile)


class Suite:
    """Runs stages in order; the result JSON is rewritten atomically at each stage's start and end."""

    def __init__(self, out: Path, args: argparse.Namespace, plan: Plan):
        self.out, self.plan = out, plan
        self.data: dict[str, Any] = {
            "suite": "gpu_suite", "schema_version": SCHEMA_VERSION, "dry_run": args.dry_run,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:], "plan": dataclasses.asdict(plan), "stages": {}}
        out.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        return self.out / "gpu_suite.json"

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)

    def result(self, stage: str) -> dict | None:
        entry = self.data["stages"].get(stage)
        return entry.get("result") if entry and entry["status"] == "ok" else None

    def run(self, stage: str, fn: Callable[[], dict], log: Callable[[str], None]) -> None:
        entry: dict[str, Any] = {"status": "running",
                                 "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self.data["stages"][stage] = entry
        self.write()
        log(f"[suite] {stage} ...")
        t0 = time.perf_counter()
        try:
            entry["result"] = fn()
            entry["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one failing stage must not cost the others' results
            entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                         traceback=traceback.format_exc()[-6000:])
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        self.write()
        log(f"[suite] {stage}: {entry['status']} in {entry['seconds']} s"
            + (f": {entry['error']}" if entry["status"] == "failed" else ""))


# ------------------------------------------------------------------------------------------- build
PTXAS_FN = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_table(log_text: str) -> list[dict]:
    """ptxas -v lines -> [{kernel, arch, registers, spill_stores, spill_loads}] (mangled names kept)."""
    rows: list[dict] = []
    current: dict | None = None
    for line in log_text.splitlines():
        if m := PTXAS_FN.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2)}
            rows.append(current)
        elif current is not None and (m := PTXAS_SPILL.search(line)):
            current.update(spill_stores=int(m.group(1)), spill_loads=int(m.group(2)))
        elif current is not None and (m := PTXAS_REGS.search(line)):
            current["registers"] = int(m.group(1))
    return rows


def stage_build(out: Path, timeout_s: int) -> dict:
    import torch

    if not torch.cuda.is_available() or torch.version.cuda is None:
        raise RuntimeError("--build-csrc needs a CUDA torch and a GPU machine's toolkit")
    env = {**os.environ, "FASTMASK_BUILD_CUDA": "1", "FASTMASK_CUDA_ARCHS": "90",
           "MAX_JOBS": str(os.cpu_count())}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    text = proc.stdout + "\n" + proc.stderr
    (out / "csrc_build.log").write_text(text)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed (rc {proc.returncode}); last lines: {text[-1500:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "log": "csrc_build.log",
            "ptxas": ptxas_table(text)}


# ------------------------------------------------------------------------------------------- env
def _versions() -> dict:
    """Versions of the stack; optional packages through their metadata (importing deepspeed is slow
    and this suite must not depend on it)."""
    from importlib import metadata

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for name in ("triton", "timm", "deepspeed"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["dali"] = next((f"{d.metadata['Name']} {d.version}" for d in metadata.distributions()
                        if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")), None)
    from fastmask.bench.step import git_sha

    out["fastmask_git"] = git_sha()
    return out


def stage_env(plan: Plan) -> dict:
    import torch

    from fastmask.bench.timing import time_calls

    device = torch.device(plan.device)
    info: dict[str, Any] = {"versions": _versions(), "host": platform.node(), "cpu_count": os.cpu_count(),
                            "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "FASTMASK_BACKEND",
                                                                   "CUDA_VISIBLE_DEVICES")}}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                       "sm_count": p.multi_processor_count,
                       "memory_bytes": p.total_memory, "l2_bytes": getattr(p, "L2_cache_size", None)}
    n = plan.copy_bytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_calls(lambda _: dst.copy_(src), [None], device, warmup=3, repeats=10)
    info["copy"] = {"bytes_each_way": plan.copy_bytes, "median_s": t.median_s,
                    "gbps_read_plus_write": 2 * plan.copy_bytes / t.median_s / 1e9}
    del src, dst
    mdtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(plan.matmul_n, plan.matmul_n, device=device, dtype=mdtype)
    b = torch.randn(plan.matmul_n, plan.matmul_n, device=device, dtype=mdtype)
    t = time_calls(lambda _: a @ b, [None], device, warmup=3, repeats=10)
    info["matmul"] = {"n": plan.matmul_n, "dtype": str(mdtype).replace("torch.", ""), "median_s": t.median_s,
                      "tflops": 2 * plan.matmul_n ** 3 / t.median_s / 1e12}
    return info


# ------------------------------------------------------------------------------------------- correctness
def stage_correctness(plan: Plan, log) -> dict:
    import torch

    from gpu_correctness import run_correctness

    out = run_correctness(torch.device(plan.device), plan.device == "cpu", plan.correctness_batch,
                          tuple(getattr(torch, d) for d in plan.correctness_dtypes), log=log)
    return out


# ------------------------------------------------------------------------------------------- ops
def annotate_op_rows(rows: list[dict], copy_gbps: float | None) -> list[dict]:
    """Each timed row + `pct_of_copy_ceiling` (GB/s over the measured copy) and `ratio_to_best_other`
    (the fastest other implementation's ms over this one's: > 1 means this one is the fastest)."""
    timed = [r for r in rows if "ms" in r]
    out = []
    for r in rows:
        r = dict(r)
        if "ms" in r:
            if copy_gbps and "GB/s" in r:
                r["pct_of_copy_ceiling"] = round(100 * r["GB/s"] / copy_gbps, 1)
            others = [o["ms"] for o in timed if (o["op"], o["model"], o.get("pass_")) ==
                      (r["op"], r["model"], r.get("pass_")) and o["impl"] != r["impl"]]
            r["ratio_to_best_other"] = round(min(others) / r["ms"], 3) if others else None
        out.append(r)
    return out


def stage_ops(plan: Plan, out: Path, copy_gbps: float | None) -> dict:
    import bench_ops

    path = out / "ops.json"
    rc = bench_ops.main([*plan.ops_argv, "--out", str(path)])
    if rc:
        raise RuntimeError(f"bench_ops.main returned {rc}")
    data = json.loads(path.read_text())
    return {"ops_json": path.name, "argv": plan.ops_argv, "meta": data.get("meta"), "copy_gbps": copy_gbps,
            "rows": annotate_op_rows(data.get("rows", []), copy_gbps)}


# ------------------------------------------------------------------------------------------- step
def profile_top(step: Callable, inputs: list, device, steps: int, top: int = 20) -> dict:
    """Profile `steps` calls of step: the top-`top` ops by self device (else CPU) time, the share of
    that time in copies/casts, and (GPU) the idle share between the first and last kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for x in inputs[:2]:
        step(x)  # warm
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(inputs[i % len(inputs)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    on_gpu = device.type == "cuda"

    def self_time(e) -> float:
        if on_gpu:
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    # GPU: the device's own events (kernels, memcpy/memset), so each microsecond counts once; CPU: the ops.
    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    averages = [e for e in prof.key_averages() if getattr(e, "device_type", kind) == kind
                and self_time(e) > 0]
    total = sum(self_time(e) for e in averages) or 1.0
    averages.sort(key=self_time, reverse=True)
    rows = [{"name": e.key[:200], "calls": e.count, "self_us": round(self_time(e), 1),
             "share": round(self_time(e) / total, 4)} for e in averages[:top]]
    copy_share = sum(self_time(e) for e in averages if COPY_PATTERN.search(e.key)) / total
    idle = None
    if on_gpu:
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
        if spans:
            busy, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
            for s, e in spans[1:]:
                if s > cur_e:
                    busy += cur_e - cur_s
                    cur_s, cur_e = s, e
                else:
                    cur_e = max(cur_e, e)
            busy += cur_e - cur_s
            span = spans[-1][1] - spans[0][0]
            idle = round(1 - busy / span, 4) if span > 0 else None
    return {"steps": steps, "time_kind": "GPU kernel time" if on_gpu else "self CPU time of ops (no GPU)",
            "total_us": round(total, 1), "top": rows, "copy_cast_share": round(copy_share, 4),
            "copy_cast_pattern": COPY_PATTERN.pattern, "gpu_idle_share": idle,
            "gpu_idle_definition":
                "1 - (union of kernel intervals) / (first kernel start to last kernel end)"}


def stage_step(plan: Plan, matmul_tflops: float | None, seconds_left: Callable[[], float], log) -> dict:
    import torch

    from fastmask.bench.step import (StepBenchArgs, build_fastmask_method, make_fastmask_step,
                                     resolve_device_dtype, run_step_bench)

    args = StepBenchArgs(**plan.step, fastmask_step="direct", baseline="both")
    result = run_step_bench(args, log=log)
    out = {"side_by_side": result}
    if plan.fastmask_compile and seconds_left() < COMPILED_STEP_S:
        out["fastmask_compiled_skipped"] = (f"time budget: {seconds_left():.0f} s left, it needs "
                                            f"~{COMPILED_STEP_S} s")
    elif plan.fastmask_compile:
        compiled = dataclasses.replace(args, baseline="none",
                                       overrides=(*args.overrides, "engine.compile=true"),
                                       strong_compile=False)
        out["fastmask_compiled"] = run_step_bench(compiled, log=log)
    if matmul_tflops:  # MFU against what this GPU's matmul measured, beside the datasheet MFU
        flops = {n: p["flops_per_step"] / p["step_s_median"] / 1e12 for n, p in result["paths"].items()}
        out["mfu_vs_measured_matmul"] = {n: f / matmul_tflops for n, f in flops.items()}
    device, dtype = resolve_device_dtype(args)
    torch.manual_seed(0)
    method = build_fastmask_method(args, device)
    step = make_fastmask_step(method, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    inputs = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
              for _ in range(2)]
    out["profile"] = profile_top(step, inputs, device, plan.profile_steps)
    out["profile"]["path"] = "fastmask (direct: method + engine optimizer, no DeepSpeed)"
    return out


# ------------------------------------------------------------------------------------------- summary
def summary_markdown(data: dict) -> str:
    """A human digest of the stages that finished."""
    st = data["stages"]
    lines = [f"# GPU suite {'(dry run, CPU) ' if data['dry_run'] else ''}{data['created']}", ""]
    lines += ["| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['status']} | {v.get('seconds', '')} |" for k, v in st.items() if k != "summary"]
    env = st.get("env", {}).get("result")
    if env:
        gpu = env.get("gpu", {})
        v = env["versions"]
        lines += ["", f"Device: {gpu.get('name', 'CPU')} (capability {gpu.get('capability', '-')}, "
                      f"L2 {gpu.get('l2_bytes')} B); torch {v['torch']}, triton {v.get('triton')}, cuda "
                      f"{v['cuda']}.",
                  f"Copy ceiling: {env['copy']['gbps_read_plus_write']:.0f} GB/s (read + write); "
                  f"matmul {env['matmul']['dtype']} {env['matmul']['n']}^3: {env['matmul']['tflops']:.1f} "
                  "TFLOP/s."]
    corr = st.get("correctness", {}).get("result")
    if corr:
        bad = [r for r in corr["records"] if r["status"] not in ("ok", "declined")]
        lines += ["", f"## Correctness: {corr['counts']}", ""]
        lines += [f"- {r['status']}: {r['op']} {r['model']} {r['part']} {r['impl']} {r['dtype']}"
                  + (f" ({r.get('reason', '')[:120]})" if r.get("reason") else
                     f" (NaN/inf {r.get('nan_inf_total')})") for r in bad[:40]]
    ops = st.get("ops", {}).get("result")
    if ops:
        lines += ["", "## Ops (fwd+bwd)", "",
                  "| op | model | impl | ms | GB/s | % copy | TFLOP/s | vs best other |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in ops["rows"]:
            if r.get("pass_") == "fwd+bwd" and "ms" in r:
                lines.append(f"| {r['op']} | {r['model']} | {r['impl']} | {r['ms']} | {r.get('GB/s', '')} | "
                             f"{r.get('pct_of_copy_ceiling', '')} | {r.get('TFLOP/s', '')} | "
                             f"{r.get('ratio_to_best_other', '')} |")
    step = st.get("step", {}).get("result")
    if step:
        res = step["side_by_side"]
        a = res["args"]
        lines += ["", f"## Step: {a['model']} {a['img_size']} px, batch {a['batch_size']}, {a['dtype']}", "",
                  "| path | img/s | TFLOP/s | MFU (datasheet) | peak memory MiB | what |",
                  "| --- | --- | --- | --- | --- | --- |"]
        paths = dict(res["paths"])
        if "fastmask_compiled" in step:
            paths["fastmask + torch.compile"] = step["fastmask_compiled"]["paths"]["fastmask"]
        for n, p in paths.items():
            mem, mfu = p["memory"]["peak_bytes"], p["mfu"]
            mfu_s = "" if mfu is None else f"{100 * mfu:.1f}%"
            mem_s = "" if mem is None else f"{mem / 2 ** 20:.0f}"
            lines.append(f"| {n} | {p['images_per_s']:.1f} | {p['tflops'] or 0:.1f} | {mfu_s} | {mem_s} | "
                         f"{p['what']} |")
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()
                                             if "per_round" in k)]
        prof = step["profile"]
        lines += ["", f"Profile ({prof['time_kind']}, {prof['steps']} steps): copies/casts "
                      f"{100 * prof['copy_cast_share']:.1f}%, GPU idle "
                      + ("-" if prof["gpu_idle_share"] is None
                         else f"{100 * prof['gpu_idle_share']:.1f}%"), ""]
        lines += [f"{i + 1}. {r['name']} x{r['calls']}: {r['self_us']} us ({100 * r['share']:.1f}%)"
                  for i, r in enumerate(prof["top"])]
    return "\n".join(lines) + "\n"


def stage_summary(suite: Suite) -> dict:
    text = summary_markdown(suite.data)
    (suite.out / "summary.md").write_text(text)
    return {"markdown": "summary.md", "chars": len(text)}


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--out", required=True, help="folder for gpu_suite.json, ops.json, summary.md (created)")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on the CPU: checks that every stage works")
    ap.add_argument("--build-csrc", action="store_true", help="build the CUDA extension for sm_90 first")
    ap.add_argument("--build-timeout", type=int, default=300, help="seconds the extension build may take")
    ap.add_argument("--stages", default=",".join(s for s in STAGES if s != "build"),
                    help=f"comma-separated subset of {','.join(STAGES)} (build also with --build-csrc)")
    ap.add_argument("--ops-compile", action="store_true",
                    help="also time torch.compile rows in the ops stage")
    ap.add_argument("--no-fastmask-compile", dest="fastmask_compile", action="store_false",
                    help="skip the extra step run of fastmask with torch.compile")
    ap.add_argument("--budget-s", type=float, default=540,
                    help="seconds the whole run should take: the optional compiled fastmask step is skipped "
                         f"when fewer than {COMPILED_STEP_S} are left")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.build_csrc and "build" not in stages:
        stages.insert(0, "build")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stages {unknown}; choose from {STAGES}")
    import_project()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --dry-run for the CPU check")
    t_start = time.perf_counter()
    plan = Plan.make(args.dry_run, args.ops_compile, args.fastmask_compile)
    out = Path(args.out)
    suite = Suite(out, args, plan)

    def log(msg: str) -> None:
        print(msg, flush=True)

    def env_value(*keys) -> float | None:
        cur: Any = suite.result("env")
        for k in keys:
            cur = cur.get(k) if isinstance(cur, dict) else None
        return cur

    runners = {
        "build": lambda: stage_build(out, args.build_timeout),
        "env": lambda: stage_env(plan),
        "correctness": lambda: stage_correctness(plan, log),
        "ops": lambda: stage_ops(plan, out, env_value("copy", "gbps_read_plus_write")),
        "step": lambda: stage_step(plan, env_value("matmul", "tflops") if not args.dry_run else None,
                                   lambda: args.budget_s - (time.perf_counter() - t_start), log),
        "summary": lambda: stage_summary(suite),
    }
    for stage in (s for s in STAGES if s in stages):
        suite.run(stage, runners[stage], log)
    suite.data["deepspeed_imported"] = "deepspeed" in sys.modules  # must stay False: the GPU stack has none
    suite.write()
    failed = [s for s, e in suite.data["stages"].items() if e["status"] != "ok"]
    log(f"[suite] wrote {suite.path}" + (f"; failed stages: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
