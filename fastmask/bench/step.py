"""The training-step benchmark: fastmask's step and the plain-PyTorch baseline, side by side.

    result = run_step_bench(StepBenchArgs(model="vit_base_patch16", batch_size=8, dtype="fp32"))

Paths (each its own model and optimizer, built from the same dimensions, timed in interleaved
rounds in one process so a drifting load hits them alike):

- `fastmask`: the method from `fastmask.methods.build_method(cfg)` (its models, masking and fused
  ops, backends chosen by `auto` or `--backend`), `loss = method(imgs)["loss"]`, backward, torch
  AdamW (fused where torch has it for the device, else foreach) over `method.param_groups`, then
  `on_step_end`. No DeepSpeed in the timed loop: at world size 1 and ZeRO stage 0 the engine adds
  only its bookkeeping around the same forward/backward/optimizer; the engine's own throughput
  is in its log lines. Reduced precision runs under autocast, as the baseline.
- `baseline`: `fastmask.bench.baseline.BaselineMAE` (the official MAE code's structure: all-patch
  conv embedding, torch.gather masking, eager attention, loss on all patches then masked, AMP,
  `loss.item()` every step, AdamW foreach=False).
- with `ablation=True`, the MAE paper's encoder ablation on both: `fastmask_all_tokens` (every
  patch enters the encoder, hidden ones as a learned mask token: `forward_masked_tokens`, then
  the same decoder and fused loss) and `baseline_all_tokens`.

Reported per path: step time (median after warm-up; first call separately, which holds any
compilation), images/s, achieved TFLOP/s from `fastmask.bench.flops` (the same count for a path and
its baseline, so TFLOP/s compare like images/s), MFU against the given or known peak, peak memory
(GPU: allocator peak above what was allocated before the step; CPU: sampled RSS growth) and the
exact bytes saved for backward. Ratios: baseline time / fastmask time (speed-up), memory ratios,
and all-token time / visible-only time per implementation.
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

from . import flops as F
from .baseline import BaselineMAE, baseline_forward, make_train_step
from .timing import measure_peak_memory, saved_activation_bytes, time_interleaved

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = ("fastmask", "baseline")


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
    paths: tuple[str, ...] = PATHS
    ablation: bool = False              # also time the all-token encoder on both implementations
    threads: int | None = None          # torch CPU threads (None: leave torch's default)
    backend: str = "auto"               # fastmask.ops backend for the fastmask path
    compile: bool = False               # torch.compile both paths' models
    recipe: str | None = None           # fastmask config recipe the method is built from
    overrides: tuple[str, ...] = ()     # extra key=value config overrides
    peak_tflops: float | None = None    # for MFU; None: the known-device table (GPU), else no MFU
    num_inputs: int = 3                 # distinct random batches rotated through the timed calls
    memory: bool = True                 # run one more step per path to measure its peak memory
    seed: int = 0


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
    unknown = [p for p in args.paths if p not in PATHS]
    if unknown or not args.paths:
        problems.append(f"paths must be a non-empty subset of {PATHS}, got {args.paths}")
    if args.batch_size < 1 or args.warmup < 0 or args.repeats < 1 or args.num_inputs < 1:
        problems.append("batch_size, repeats and num_inputs must be >= 1 and warmup >= 0")
    if not 0.0 < args.mask_ratio < 1.0:
        problems.append(f"mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if "baseline" in args.paths and args.method != "mae":
        problems.append(f"the baseline is MAE; method {args.method!r} runs with --paths fastmask only")
    if args.ablation and args.method != "mae":
        problems.append("the all-token ablation is defined for MAE only")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        problems.append(f"peak_tflops must be > 0, got {args.peak_tflops}")
    if problems:
        raise ValueError("step benchmark: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------- builders
def build_fastmask_method(args: StepBenchArgs, device: torch.device) -> nn.Module:
    from fastmask.engine.config import load_config
    from fastmask.methods import build_method

    overrides = [f"method={args.method}", f"model={args.model}", f"mask_ratio={args.mask_ratio}",
                 f"data.img_size={args.img_size}", f"data.batch_size={args.batch_size}",
                 f"engine.backend={args.backend}", *args.overrides]
    cfg = load_config(args.recipe, overrides)
    return build_method(cfg).to(device)


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

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
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
        return _split_decay(self, weight_decay)


def _split_decay(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fused_adamw(groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    kw = dict(lr=1.5e-4, betas=(0.9, 0.95))
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):  # a torch without a fused kernel for this device
        return torch.optim.AdamW(groups, foreach=True, **kw)


def make_fastmask_step(module: nn.Module, dtype: torch.dtype, device: torch.device) -> Callable:
    """module: a Method (or AllTokensMAE) -> step(imgs) with no host sync; returns the loss tensor."""
    opt = _fused_adamw(module.param_groups(0.05), device)
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
        if hasattr(module, "on_step_end"):
            module.on_step_end(counter["step"], 1_000_000)
        counter["step"] += 1
        return loss.detach()

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def make_fastmask_forward(module: nn.Module, dtype: torch.dtype, device: torch.device) -> Callable:
    def forward(imgs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return module(imgs)["loss"]
    return forward


def build_baseline(shape: F.MAEShape, all_tokens: bool, device: torch.device) -> BaselineMAE:
    return BaselineMAE(img_size=shape.img_size, patch_size=shape.patch_size, in_chans=shape.in_chans,
                       embed_dim=shape.embed_dim, depth=shape.depth, num_heads=shape.num_heads,
                       decoder_embed_dim=shape.decoder_embed_dim, decoder_depth=shape.decoder_depth,
                       decoder_num_heads=shape.decoder_num_heads, mlp_ratio=shape.mlp_ratio,
                       all_tokens=all_tokens).to(device)


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
def run_step_bench(args: StepBenchArgs, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, time and measure every path; -> the JSON-ready result dict (see module docstring)."""
    validate(args)
    device, dtype = resolve_device_dtype(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # Build every module first, then time: all paths share the process and its load.
    modules: dict[str, nn.Module] = {}
    steps: dict[str, Callable] = {}
    forwards: dict[str, Callable] = {}
    shape = None
    names = list(args.paths)
    if "fastmask" in args.paths or args.ablation or args.method == "mae":
        method = build_fastmask_method(args, device)
        if "fastmask" in args.paths:
            modules["fastmask"] = method
        if args.method == "mae":
            shape = mae_shape(find_mae_model(method), args)
    if args.ablation:
        names += [f"{p}_all_tokens" for p in args.paths]
        if "fastmask" in args.paths:
            modules["fastmask_all_tokens"] = AllTokensMAE(find_mae_model(build_fastmask_method(args, device)),
                                                          args.mask_ratio, backend=args.backend).to(device)
    for name in names:
        if name.startswith("baseline"):
            modules[name] = build_baseline(shape, name.endswith("_all_tokens"), device)
    for name, mod in modules.items():
        if args.compile:
            mod = torch.compile(mod)
        if name.startswith("baseline"):
            steps[name] = make_train_step(mod, dtype, args.mask_ratio)
            forwards[name] = baseline_forward(mod, dtype, args.mask_ratio)
        else:
            steps[name] = make_fastmask_step(mod, dtype, device)
            forwards[name] = make_fastmask_forward(mod, dtype, device)

    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    inputs = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
              for _ in range(args.num_inputs)]

    # The first call of each path on its own: it holds lazy init and any compilation.
    first_call = {}
    for name in names:
        t = time_interleaved({name: steps[name]}, inputs[:1], device, warmup=0, repeats=1)[name]
        first_call[name] = t.median_s
        log(f"[bench] {name}: first step {t.median_s:.3f} s")
    timings = time_interleaved({n: steps[n] for n in names}, inputs, device,
                               warmup=max(args.warmup - 1, 0), repeats=args.repeats)

    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
        peak = F.peak_tflops(torch.cuda.get_device_name(device), dtype_name)
    results: dict[str, Any] = {}
    for name in names:
        t = timings[name]
        flops_step = (F.mae_train_flops(shape, args.batch_size, all_tokens=name.endswith("_all_tokens"))
                      if shape is not None else None)
        mem = measure_peak_memory(lambda n=name: steps[n](inputs[0]), device) if args.memory else \
            {"peak_bytes": None, "kind": "not measured"}
        results[name] = {
            "step_s_median": t.median_s,
            "step_s_min": t.min_s,
            "step_s_times": t.times_s,
            "first_step_s": first_call[name],
            "images_per_s": args.batch_size / t.median_s,
            "flops_per_step": flops_step,
            "tflops": flops_step / t.median_s / 1e12 if flops_step else None,
            "mfu": F.mfu(flops_step, t.median_s, peak) if flops_step else None,
            "memory": mem,
            "optimizer": _describe(steps[name].optimizer),
            "saved_activation_bytes": saved_activation_bytes(lambda n=name: forwards[n](inputs[0]),
                                                             modules[name]),
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
        "versions": versions(),
        "args": {**dataclasses.asdict(args), "dtype": {v: k for k, v in DTYPES.items()}[dtype],
                 "device": str(device)},
        "shapes": _shapes(shape, args) if shape else None,
        "flops": _flops_summary(shape, args) if shape else None,
        "peak_tflops": peak,
        "paths": results,
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
        return statistics.median(a / b for a, b in zip(results[num]["step_s_times"], results[den]["step_s_times"]))

    for suffix in ("", "_all_tokens"):
        f, b = "fastmask" + suffix, "baseline" + suffix
        if f in results and b in results:
            out[f"speedup_fastmask_vs_baseline{suffix}"] = step(b) / step(f)
            out[f"speedup_fastmask_vs_baseline{suffix}_per_round_median"] = per_round(b, f)
            out[f"saved_activations_baseline_over_fastmask{suffix}"] = (
                results[b]["saved_activation_bytes"] / max(results[f]["saved_activation_bytes"], 1))
            mb, mf = results[b]["memory"]["peak_bytes"], results[f]["memory"]["peak_bytes"]
            if mb and mf:
                out[f"peak_memory_baseline_over_fastmask{suffix}"] = mb / mf
    for impl in ("fastmask", "baseline"):
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
