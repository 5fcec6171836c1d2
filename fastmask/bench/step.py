"""The training-step benchmark: fastmask's step beside the official and the strong MAE baselines.

    result = run_step_bench(StepBenchArgs(model="vit_base_patch16", batch_size=8, dtype="fp32"))

Paths (each its own model and optimizer, built from the same dimensions, timed in interleaved rounds
in one process so a drifting load hits them alike):

- `fastmask`: what `fastmask pretrain` runs (`fastmask.bench.engine_step`): the method built from the
  pretrain config (`--config`, `--set`, `--backend`) inside the DeepSpeed engine, with the engine's
  optimizer (torch AdamW, fused), its DeepSpeed config (ZeRO stage, precision as `engine.precision`)
  and its per-step lr; `engine.compile=true` compiles it as pretrain does. With
  `fastmask_step="direct"` (the GPU suite, whose machine has no DeepSpeed) the method's forward and
  backward run with the engine's optimizer but without DeepSpeed, under autocast; the result says so.
- `official` (`fastmask.bench.baseline_official`): the official MAE code's model and training step:
  all-patch conv embedding, torch.gather masking, eager attention, loss on all patches then masked,
  AMP autocast (GradScaler for fp16), torch's default AdamW for the device, the per-step gradient
  norm of its loss scaler, `loss.item()` and `torch.cuda.synchronize()` every step.
- `strong` (`fastmask.bench.baseline_strong`): the same model code with timm's SDPA blocks, autocast,
  fused AdamW, no host syncs, `torch.compile` (inductor by default; `strong_compile=False` or another
  `compile_backend` for tests, and the result says which ran). Needs timm.
- with `ablation=True`, the MAE paper's encoder ablation: `fastmask_all_tokens` (every patch enters
  the encoder, hidden ones as a learned mask token, through the same step as `fastmask`) and
  `official_all_tokens`.

Reported per path: what it runs, step time (median after warm-up; the first call separately, which
holds any compilation), images/s, achieved TFLOP/s from `fastmask.bench.flops` (the same count for
every path, so TFLOP/s compare like images/s), MFU against the given or known peak, peak memory (GPU:
allocator peak above what was allocated before the step; CPU: sampled RSS growth) and the exact bytes
saved for backward (one eager forward of the path's model under its autocast). Ratios: time of a
baseline / time of fastmask (> 1: fastmask is faster), as the ratio of medians and as the median of
per-round ratios, memory ratios, and all-token time / visible-only time per implementation.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fastmask.engine.step import DTYPES

from . import flops as F
from .baseline_official import OfficialMAE, make_official_step, official_forward, official_param_groups
from .timing import measure_peak_memory, saved_activation_bytes, time_interleaved

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PATHS = ("fastmask", "official", "strong")
BASELINES = {"both": ("official", "strong"), "official": ("official",), "strong": ("strong",), "none": ()}
FASTMASK_STEPS = ("engine", "direct")


@dataclasses.dataclass
class StepBenchArgs:
    method: str = "mae"
    model: str = "vit_base_patch16"
    img_size: int = 224
    batch_size: int = 8
    mask_ratio: float = 0.75
    dtype: str = "auto"                 # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    warmup: int = 2
    repeats: int = 5
    baseline: str = "both"              # both | official | strong | none
    ablation: bool = False              # also time the all-token encoder (fastmask and official)
    threads: int | None = None          # torch CPU threads (None: leave torch's default)
    backend: str = "auto"               # fastmask.ops backend for the fastmask path (engine.backend)
    recipe: str | None = None           # fastmask config recipe the method is built from
    overrides: tuple[str, ...] = ()     # extra key=value config overrides
    fastmask_step: str = "engine"       # engine (DeepSpeed, as pretrain) | direct (no DeepSpeed)
    strong_compile: bool = True         # torch.compile the strong baseline (part of it; off for tests only)
    compile_backend: str = "inductor"   # the strong baseline's torch.compile backend
    peak_tflops: float | None = None    # for MFU; None: the known-device table (GPU), else no MFU
    num_inputs: int = 3                 # distinct random batches rotated through the timed calls
    memory: bool = True                 # run one more step per path to measure its peak memory
    seed: int = 0

    @property
    def paths(self) -> tuple[str, ...]:
        names = ("fastmask", *BASELINES.get(self.baseline, ()))
        if self.ablation:
            names += ("fastmask_all_tokens",) + (("official_all_tokens",) if "official" in names else ())
        return names


def resolve_device_dtype(args: StepBenchArgs) -> tuple[torch.device, torch.dtype]:
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {args.device!r} asked for, but CUDA is not available")
    name = ("bf16" if device.type == "cuda" else "fp32") if args.dtype == "auto" else args.dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto|{'|'.join(DTYPES)}, got {args.dtype!r}")
    return device, DTYPES[name]


def validate(args: StepBenchArgs) -> None:
    problems = []
    if args.baseline not in BASELINES:
        problems.append(f"baseline must be {'|'.join(BASELINES)}, got {args.baseline!r}")
    if args.fastmask_step not in FASTMASK_STEPS:
        problems.append(f"fastmask_step must be {'|'.join(FASTMASK_STEPS)}, got {args.fastmask_step!r}")
    if args.batch_size < 1 or args.warmup < 0 or args.repeats < 1 or args.num_inputs < 1:
        problems.append("batch_size, repeats and num_inputs must be >= 1 and warmup >= 0")
    if not 0.0 < args.mask_ratio < 1.0:
        problems.append(f"mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if BASELINES.get(args.baseline) and args.method != "mae":
        problems.append(f"the baselines are MAE; method {args.method!r} runs with --baseline none")
    if args.ablation and args.method != "mae":
        problems.append("the all-token ablation is defined for MAE only")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        problems.append(f"peak_tflops must be > 0, got {args.peak_tflops}")
    if problems:
        raise ValueError("step benchmark: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------- builders
def fastmask_config(args: StepBenchArgs, dtype: torch.dtype | None = None):
    """The pretrain Config the fastmask path runs: recipe + the bench's shape options + overrides."""
    from fastmask.engine.config import load_config

    overrides = [f"method={args.method}", f"model={args.model}", f"mask_ratio={args.mask_ratio}",
                 f"data.img_size={args.img_size}", f"data.batch_size={args.batch_size}",
                 f"engine.backend={args.backend}"]
    if dtype is not None:
        overrides.append(f"engine.precision={DTYPE_NAMES[dtype]}")
    return load_config(args.recipe, [*overrides, *args.overrides])


def build_fastmask_method(args: StepBenchArgs, device: torch.device) -> nn.Module:
    from fastmask.methods import build_method

    return build_method(fastmask_config(args)).to(device)


def find_mae_model(method: nn.Module) -> nn.Module:
    """The MaskedAutoencoderViT inside a method (encoder + decoder), for dimensions and the ablation."""
    from fastmask.models import MaskedAutoencoderViT

    for m in method.modules():
        if isinstance(m, MaskedAutoencoderViT):
            return m
    raise TypeError(f"{type(method).__name__} holds no MaskedAutoencoderViT")


def mae_shape(model: nn.Module, args: StepBenchArgs) -> F.MAEShape:
    blk = model.blocks[0]
    return F.MAEShape(img_size=args.img_size, patch_size=model.patch_size, in_chans=model.in_chans,
                      embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=blk.attn.num_heads,
                      decoder_embed_dim=model.decoder_embed_dim, decoder_depth=len(model.decoder_blocks),
                      decoder_num_heads=model.decoder_blocks[0].attn.num_heads,
                      mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim, mask_ratio=args.mask_ratio)


def official_dims(shape: F.MAEShape) -> dict[str, Any]:
    """OfficialMAE's keyword arguments for an MAE of `shape`."""
    return dict(img_size=shape.img_size, patch_size=shape.patch_size, in_chans=shape.in_chans,
                embed_dim=shape.embed_dim, depth=shape.depth, num_heads=shape.num_heads,
                decoder_embed_dim=shape.decoder_embed_dim, decoder_depth=shape.decoder_depth,
                decoder_num_heads=shape.decoder_num_heads, mlp_ratio=shape.mlp_ratio)


def build_official(shape: F.MAEShape, device: torch.device, all_tokens: bool = False) -> OfficialMAE:
    return OfficialMAE(**official_dims(shape), all_tokens=all_tokens).to(device)


class AllTokensMAE(nn.Module):
    """The MAE paper's ablation on fastmask's model: forward(imgs) -> {"loss"}.

    A random mask as MAE's, every patch through the encoder with hidden ones replaced by a learned
    mask token (`forward_masked_tokens`), the decoder on all L + 1 outputs (identity ids_restore:
    nothing to fill), the fused normalized-pixel loss over hidden patches.
    """

    def __init__(self, model: nn.Module, mask_ratio: float, norm_pix: bool = True, backend: str = "auto"):
        super().__init__()
        from fastmask.masking import RandomMasking

        self.model, self.norm_pix, self.backend = model, norm_pix, backend
        self.masker = RandomMasking(mask_ratio)
        self.enc_mask_token = nn.Parameter(torch.zeros(model.embed_dim))
        nn.init.normal_(self.enc_mask_token, std=0.02)

    def forward(self, imgs: torch.Tensor, keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """keys: the engine's per-sample keys, accepted and unused (a benchmark's masks: torch's RNG)."""
        from fastmask import ops

        B, L = imgs.shape[0], self.model.num_patches
        masks = self.masker(B, self.model.grid_size, device=imgs.device)
        latent = self.model.forward_masked_tokens(imgs, masks.mask, self.enc_mask_token)
        ids_identity = torch.arange(L, device=imgs.device).expand(B, L)
        pred = self.model.forward_decoder(latent, ids_identity)
        loss = ops.norm_pix_loss(pred, imgs, masks.mask, self.model.patch_size, self.norm_pix,
                                 backend=self.backend)
        return {"loss": loss}

    def param_groups(self, weight_decay: float) -> list[dict]:
        return official_param_groups(self, weight_decay)


def make_fastmask_step(module: nn.Module, dtype: torch.dtype, device: torch.device, lr: float = 1.5e-4,
                       weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95)) -> Callable:
    """module: a Method (or AllTokensMAE) -> step(imgs) -> loss (detached), no host sync, no DeepSpeed.

    The engine's optimizer (`fastmask.optim.build_optimizer`: torch AdamW, fused) over
    `module.param_groups`; the forward under autocast for bf16/fp16 (GradScaler for fp16);
    `post_step(lr)` and `on_step_end` after each step. The ablation's rows and the GPU suite (no
    DeepSpeed there) use it.
    """
    from fastmask.optim import OptimizerSettings, build_optimizer

    opt = build_optimizer("adamw", module.param_groups(weight_decay), lr, OptimizerSettings(betas=betas),
                          device)
    amp = dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    counter = {"step": 0}

    def step(imgs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = module(imgs)["loss"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        counter["step"] += 1
        if hasattr(module, "post_step"):
            module.post_step(lr)  # a method's own phase after the step (ADIOS's occluder)
        if hasattr(module, "on_step_end"):
            module.on_step_end(counter["step"], 1_000_000)
        return loss.detach()

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def make_fastmask_forward(module: nn.Module, dtype: torch.dtype, device: torch.device) -> Callable:
    def forward(imgs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return module(imgs)["loss"]
    return forward


# ---------------------------------------------------------------------------------------- environment
def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                               timeout=10)
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    import fastmask

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "fastmask": fastmask.__version__, "fastmask_git": git_sha(),
                                  "cuda": torch.version.cuda}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "torch_threads": torch.get_num_threads(),
                            "host": platform.node(), "cpu": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count()}
    if hasattr(os, "getloadavg"):
        # A shared CPU's load explains noisy timings; recorded with every result.
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_bytes=props.total_memory, sm_count=props.multi_processor_count)
    else:
        info["name"] = f"CPU ({info['cpu']}, {torch.get_num_threads()} threads)"
    return info


# ---------------------------------------------------------------------------------------- the run
def _build_path(name: str, args: StepBenchArgs, cfg, shape: F.MAEShape, device: torch.device,
                dtype: torch.dtype) -> tuple[Callable, Callable, nn.Module, str]:
    """-> (step, eager forward for the activation probe, the module, what the path runs)."""
    torch.manual_seed(args.seed)
    all_tokens = name.endswith("_all_tokens")
    if name.startswith("official"):
        model = build_official(shape, device, all_tokens)
        step = make_official_step(model, dtype, args.mask_ratio)
        return step, official_forward(model, dtype, args.mask_ratio), model, (
            "the official MAE step: all-patch conv embedding, eager attention, loss on all patches then "
            f"masked, {_describe(step.optimizer)} (torch's default for {device.type}), the loss scaler's "
            "per-step gradient norm, loss.item() and cuda.synchronize() every step")
    if name == "strong":
        from .baseline_strong import build_strong_model, make_strong_step, uses_sdpa

        model = build_strong_model(**official_dims(shape)).to(device)
        step = make_strong_step(model, dtype, args.mask_ratio, compile=args.strong_compile,
                                compile_backend=args.compile_backend)
        return step, official_forward(model, dtype, args.mask_ratio), model, (
            f"the official model code with timm's Block (SDPA: {uses_sdpa(model)}), "
            f"{_describe(step.optimizer)}, "
            f"no host syncs, {step.compiled or 'NOT compiled (strong_compile off)'}")
    from fastmask.methods import build_method

    method = build_method(cfg)
    module = (AllTokensMAE(find_mae_model(method), args.mask_ratio, backend=args.backend) if all_tokens
              else method)
    forward = make_fastmask_forward(module, dtype, device)
    if args.fastmask_step == "direct":
        module.to(device)
        e = cfg.engine
        run = torch.compile(module) if e.compile else module  # engine.compile, as pretrain's engine.compile()
        step = make_fastmask_step(run, dtype, device, weight_decay=e.weight_decay, betas=tuple(e.betas))
        return step, forward, module, (
            f"the method with the engine's optimizer ({_describe(step.optimizer)}) WITHOUT DeepSpeed "
            f"(fastmask_step=direct), autocast {DTYPE_NAMES[dtype]}, no host sync"
            + (", torch.compile" if e.compile else ""))
    from .engine_step import make_engine_step

    step = make_engine_step(cfg, module)
    e = cfg.engine
    return step, forward, module, (
        f"fastmask pretrain's step: the method in the DeepSpeed engine (ZeRO stage {e.zero_stage}, "
        f"{step.precision}), {_describe(step.optimizer)}, per-step lr, no host sync"
        + (", engine.compile" if e.compile else "") + (", CUDA graphs" if e.cuda_graphs else ""))


def _why_not(name: str, args: StepBenchArgs) -> str | None:
    if name == "strong":
        from .baseline_strong import why_not_strong
        return why_not_strong()
    if name.startswith("fastmask") and args.fastmask_step == "engine":
        from .engine_step import why_not_engine
        reason = why_not_engine()
        if reason:  # the path the user asked for cannot run: say so before any work, never substitute
            raise RuntimeError(f"{reason}; run with --fastmask-step direct to time the method without "
                               "DeepSpeed")
    return None


def run_step_bench(args: StepBenchArgs, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, time and measure every path; -> the JSON-ready result dict (see module docstring)."""
    validate(args)
    device, dtype = resolve_device_dtype(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    code = versions()  # at the start: the git sha of the code that runs, not of a later checkout
    cfg = fastmask_config(args, dtype)
    skipped = {n: r for n in args.paths if (r := _why_not(n, args))}
    torch.manual_seed(args.seed)
    shape = None
    if args.method == "mae":
        from fastmask.methods import build_method
        shape = mae_shape(find_mae_model(build_method(cfg)), args)

    # Build every path first, then time: all paths share the process and its load.
    names = [n for n in args.paths if n not in skipped]
    built = {name: _build_path(name, args, cfg, shape, device, dtype) for name in names}
    for name, reason in skipped.items():
        log(f"[bench] {name}: skipped: {reason}")

    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    inputs = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
              for _ in range(args.num_inputs)]

    # The first call of each path on its own: it holds lazy init and any compilation.
    first_call = {}
    for name in names:
        t = time_interleaved({name: built[name][0]}, inputs[:1], device, warmup=0, repeats=1)[name]
        first_call[name] = t.median_s
        log(f"[bench] {name}: first step {t.median_s:.3f} s")
    timings = time_interleaved({n: built[n][0] for n in names}, inputs, device,
                               warmup=max(args.warmup - 1, 0), repeats=args.repeats)

    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = F.peak_tflops(torch.cuda.get_device_name(device), DTYPE_NAMES[dtype])
    results: dict[str, Any] = {}
    for name in names:
        step, forward, module, what = built[name]
        t = timings[name]
        flops_step = (F.mae_train_flops(shape, args.batch_size, all_tokens=name.endswith("_all_tokens"))
                      if shape is not None else None)
        mem = measure_peak_memory(lambda s=step: s(inputs[0]), device) if args.memory else \
            {"peak_bytes": None, "kind": "not measured"}
        results[name] = {
            "what": what,
            "step_s_median": t.median_s,
            "step_s_min": t.min_s,
            "step_s_times": t.times_s,
            "first_step_s": first_call[name],
            "images_per_s": args.batch_size / t.median_s,
            "flops_per_step": flops_step,
            "tflops": flops_step / t.median_s / 1e12 if flops_step else None,
            "mfu": F.mfu(flops_step, t.median_s, peak) if flops_step else None,
            "memory": mem,
            "optimizer": _describe(step.optimizer),
            "saved_activation_bytes": saved_activation_bytes(lambda f=forward: f(inputs[0]), module),
        }
        r = results[name]
        log(f"[bench] {name}: {r['step_s_median'] * 1e3:.1f} ms/step (median of {t.repeats}), "
            f"{r['images_per_s']:.1f} img/s"
            + (f", {r['tflops']:.3f} TFLOP/s" if r["tflops"] else "")
            + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "")
            + f", saved activations {r['saved_activation_bytes'] / 2**20:.1f} MiB")

    return {
        "benchmark": "train_step",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": code,
        "args": {**dataclasses.asdict(args), "dtype": DTYPE_NAMES[dtype], "device": str(device),
                 "paths": list(args.paths)},
        "shapes": _shapes(shape, args) if shape else None,
        "flops": _flops_summary(shape, args) if shape else None,
        "peak_tflops": peak,
        "paths": results,
        "skipped": skipped,
        "ratios": ratios(results),
    }


def _describe(opt: torch.optim.Optimizer) -> str:
    flags = [k for k in ("fused", "foreach") if opt.defaults.get(k) is not None]
    return f"{type(opt).__name__}(" + ", ".join(f"{k}={opt.defaults[k]}" for k in flags) + ")"


def _shapes(s: F.MAEShape, args: StepBenchArgs) -> dict[str, Any]:
    return {"images": [args.batch_size, s.in_chans, s.img_size, s.img_size], "patches": s.num_patches,
            "visible": s.len_keep, "encoder_tokens": 1 + s.len_keep, "encoder_tokens_all": 1 + s.num_patches,
            "decoder_tokens": 1 + s.num_patches, **dataclasses.asdict(s)}


def _flops_summary(s: F.MAEShape, args: StepBenchArgs) -> dict[str, Any]:
    fwd = F.mae_forward_flops(s)
    return {"counted": "matrix products (2*M*N*K) incl. attention QK^T and PV and the all-patch embedding; "
                       "training = 3x forward; norms, activations, softmax, loss, optimizer not counted",
            "train_per_image": F.mae_train_flops(s), "train_per_step": F.mae_train_flops(s, args.batch_size),
            "train_per_image_all_tokens": F.mae_train_flops(s, all_tokens=True),
            "forward_per_image_parts": fwd}


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Speed-up and memory ratios between the paths present in `results`."""
    out: dict[str, float] = {}

    def step(n: str) -> float:
        return results[n]["step_s_median"]

    def per_round(num: str, den: str) -> float:
        # Paths are timed in interleaved rounds: the median of per-round ratios cancels load that
        # drifts between rounds (a shared CPU) better than the ratio of the medians.
        pairs = zip(results[num]["step_s_times"], results[den]["step_s_times"])
        return statistics.median(a / b for a, b in pairs)

    pairs = [("official", ""), ("strong", ""), ("official", "_all_tokens")]
    for base, suffix in pairs:
        f, b = "fastmask" + suffix, base + suffix
        if f in results and b in results:
            out[f"speedup_fastmask_vs_{base}{suffix}"] = step(b) / step(f)
            out[f"speedup_fastmask_vs_{base}{suffix}_per_round_median"] = per_round(b, f)
            out[f"saved_activations_{base}_over_fastmask{suffix}"] = (
                results[b]["saved_activation_bytes"] / max(results[f]["saved_activation_bytes"], 1))
            mb, mf = results[b]["memory"]["peak_bytes"], results[f]["memory"]["peak_bytes"]
            if mb and mf:
                out[f"peak_memory_{base}_over_fastmask{suffix}"] = mb / mf
    for impl in ("fastmask", "official"):
        if impl in results and impl + "_all_tokens" in results:
            out[f"all_tokens_over_visible_{impl}"] = step(impl + "_all_tokens") / step(impl)
            out[f"all_tokens_over_visible_{impl}_per_round_median"] = per_round(impl + "_all_tokens", impl)
    return out


def save_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """A PNG with two bar charts: images/s and saved-activation memory per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = result["paths"]
    names = list(paths)
    colors = ["tab:orange" if n.startswith("fastmask") else "tab:gray" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ips = [paths[n]["images_per_s"] for n in names]
    axes[0].bar(names, ips, color=colors)
    axes[0].set_ylabel("images / s")
    for i, n in enumerate(names):
        label = f"{ips[i]:.1f}" + (f"\nMFU {100 * paths[n]['mfu']:.0f}%" if paths[n].get("mfu") else "")
        axes[0].annotate(label, (i, ips[i]), ha="center", va="bottom", fontsize=8)
    mem = [paths[n]["saved_activation_bytes"] / 2**20 for n in names]
    axes[1].bar(names, mem, color=colors)
    axes[1].set_ylabel("saved activations (MiB)")
    a = result["args"]
    fig.suptitle(f"{a['method']} {a['model']} {a['img_size']}px, batch {a['batch_size']}, {a['dtype']}, "
                 f"{result['device']['name']}", fontsize=10)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
