"""`fastmask bench --integration timm|hf`: a training step of another library's model, unpatched vs
patched by `fastmask.integrations`, side by side in one process.

    fastmask bench --integration timm --model base --batch-size 8 --out timm.json
    fastmask bench --integration hf --model base --batch-size 8 --dtype bf16 --out hf.json

- timm: `timm.models.VisionTransformer` (ViT-{size}/{patch}, 1000 classes), step = cross-entropy on
  random labels, backward, AdamW.
- hf: `ViTMAEForPreTraining` (ViTMAE-{size}/{patch}, by default with MAE's decoder: 512 wide,
  8 deep, 16 heads; `norm_pix_loss`), step = its loss with a fixed `noise` per batch, backward, AdamW.

Both paths start from the same weights (the patched model is a deep copy patched with
`apply_fastmask(backend=...)`), get the same batches, and are timed in interleaved rounds
(`fastmask.bench.timing.time_interleaved`), so a drifting load hits them alike. Reduced precision
runs under autocast. Reported: step time per path (median, all rounds), images/s, the speed-up
(unpatched / patched, of the medians and the median of per-round ratios), the patch report, and the
device, versions and shapes.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
from typing import Any, Callable

import torch
from torch import nn

from ..models.vit import VIT_ARCHS
from .step import device_info, resolve_device_dtype, save_json, versions
from .timing import time_interleaved

LIBRARIES = ("timm", "hf")


@dataclasses.dataclass
class IntegrationBenchArgs:
    library: str = "timm"               # timm | hf
    model: str = "base"                 # ViT size: tiny | small | base | large | huge
    patch_size: int = 16
    img_size: int = 224
    decoder_dim: int = 512              # hf: MAE's decoder (512 wide, 8 deep, 16 heads)
    decoder_depth: int = 8
    batch_size: int = 8
    dtype: str = "auto"                 # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"
    backend: str = "auto"               # fastmask.ops backend of the patched model
    warmup: int = 2
    repeats: int = 5
    num_inputs: int = 3
    threads: int | None = None
    seed: int = 0


def validate(a: IntegrationBenchArgs) -> None:
    problems = []
    if a.library not in LIBRARIES:
        problems.append(f"library must be one of {LIBRARIES}, got {a.library!r}")
    if a.model not in VIT_ARCHS:
        problems.append(f"model must be one of {list(VIT_ARCHS)}, got {a.model!r}")
    if a.patch_size < 1 or a.img_size % a.patch_size:
        problems.append(f"img_size {a.img_size} must be a multiple of patch_size {a.patch_size}")
    if a.decoder_dim % 16 or a.decoder_dim < 16 or a.decoder_depth < 1:
        problems.append(f"decoder_dim must be a positive multiple of 16 heads and decoder_depth >= 1, got "
                        f"{a.decoder_dim}, {a.decoder_depth}")
    if a.batch_size < 1 or a.repeats < 1 or a.num_inputs < 1 or a.warmup < 0:
        problems.append("batch_size, repeats and num_inputs must be >= 1 and warmup >= 0")
    if problems:
        raise ValueError("integration benchmark: " + "; ".join(problems))


def _timm_model(a: IntegrationBenchArgs) -> tuple[nn.Module, Callable, Callable]:
    """-> (model, apply, loss(model, batch))."""
    from timm.models.vision_transformer import VisionTransformer

    from ..integrations.timm import apply_fastmask

    dim, depth, heads = VIT_ARCHS[a.model]
    model = VisionTransformer(img_size=a.img_size, patch_size=a.patch_size, embed_dim=dim, depth=depth,
                              num_heads=heads, num_classes=1000, qkv_bias=True)
    return model, apply_fastmask, lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1])


def _hf_model(a: IntegrationBenchArgs) -> tuple[nn.Module, Callable, Callable]:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from ..integrations.transformers import apply_fastmask

    dim, depth, heads = VIT_ARCHS[a.model]
    cfg = ViTMAEConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                       intermediate_size=4 * dim, image_size=a.img_size, patch_size=a.patch_size,
                       norm_pix_loss=True, mask_ratio=0.75,
                       decoder_hidden_size=a.decoder_dim, decoder_num_hidden_layers=a.decoder_depth,
                       decoder_num_attention_heads=16, decoder_intermediate_size=4 * a.decoder_dim)
    return ViTMAEForPreTraining(cfg), apply_fastmask, lambda m, batch: m(batch[0], noise=batch[1]).loss


def _batches(a: IntegrationBenchArgs, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(a.seed + 1)
    L = (a.img_size // a.patch_size) ** 2
    out = []
    for _ in range(a.num_inputs):
        imgs = torch.randn(a.batch_size, 3, a.img_size, a.img_size, generator=g)
        second = (torch.randint(0, 1000, (a.batch_size,), generator=g) if a.library == "timm"
                  else torch.rand(a.batch_size, L, generator=g))  # labels | ViTMAE's noise
        out.append((imgs.to(device), second.to(device)))
    return out


def _make_step(model: nn.Module, loss_fn: Callable, dtype: torch.dtype, device: torch.device) -> Callable:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(batch) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(model, batch)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run_integration_bench(a: IntegrationBenchArgs, log: Callable[[str], None] = print) -> dict[str, Any]:
    validate(a)
    device, dtype = resolve_device_dtype(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model, apply, loss_fn = (_timm_model if a.library == "timm" else _hf_model)(a)
    model = model.to(device).train()
    patched = copy.deepcopy(model)
    report = apply(patched, backend=a.backend)
    log(str(report))
    steps = {"unpatched": _make_step(model, loss_fn, dtype, device),
             "patched": _make_step(patched, loss_fn, dtype, device)}
    timings = time_interleaved(steps, _batches(a, device), device, warmup=a.warmup, repeats=a.repeats)
    paths = {name: {"step_s_median": t.median_s, "step_s_times": t.times_s,
                    "images_per_s": a.batch_size / t.median_s} for name, t in timings.items()}
    rounds = zip(timings["unpatched"].times_s, timings["patched"].times_s)
    ratios = {"speedup_patched_vs_unpatched": timings["unpatched"].median_s / timings["patched"].median_s,
              "speedup_patched_vs_unpatched_per_round_median": statistics.median(u / p for u, p in rounds)}
    dim, depth, heads = VIT_ARCHS[a.model]
    result = {"benchmark": f"integration_{a.library}", "args": {**dataclasses.asdict(a), "dtype": str(dtype)},
              "device": device_info(device), "versions": {**versions(), **_library_version(a.library)},
              "shapes": {"batch": a.batch_size, "img_size": a.img_size, "patch_size": a.patch_size,
                         "embed_dim": dim, "depth": depth, "num_heads": heads,
                         "patches": (a.img_size // a.patch_size) ** 2},
              "patch_report": str(report), "paths": paths, "ratios": ratios}
    log(json.dumps({"device": result["device"]["name"], "library": a.library, "model": a.model,
                    "dtype": str(dtype),
                    "step_s": {k: round(v["step_s_median"], 4) for k, v in paths.items()},
                    "ratios": {k: round(v, 3) for k, v in ratios.items()}}, indent=2))
    return result


def _library_version(library: str) -> dict[str, str]:
    import importlib

    name = "timm" if library == "timm" else "transformers"
    return {name: importlib.import_module(name).__version__}


def add_integration_arguments(parser: argparse.ArgumentParser) -> None:
    d = IntegrationBenchArgs()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("library", choices=LIBRARIES)
    parser.add_argument("--model", default=d.model, help=f"ViT size: {', '.join(VIT_ARCHS)}")
    parser.add_argument("--patch-size", type=int, default=d.patch_size)
    parser.add_argument("--img-size", type=int, default=d.img_size)
    parser.add_argument("--decoder-dim", type=int, default=d.decoder_dim, help="hf: ViTMAE decoder width")
    parser.add_argument("--decoder-depth", type=int, default=d.decoder_depth, help="hf: decoder layers")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--dtype", default=d.dtype, choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--backend", default=d.backend, help="fastmask.ops backend of the patched model")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per path")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds, one step per path each")
    parser.add_argument("--num-inputs", type=int, default=d.num_inputs, help="distinct batches rotated")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", default=None, help="write the result JSON here")


def main(argv: list[str], prog: str = "fastmask bench --integration") -> int:
    parser = argparse.ArgumentParser(prog=prog)
    add_integration_arguments(parser)
    ns = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(IntegrationBenchArgs)}
    result = run_integration_bench(IntegrationBenchArgs(**{k: v for k, v in vars(ns).items() if k in fields}))
    if ns.out:
        print(f"[bench] wrote {save_json(result, ns.out)}")
    return 0
