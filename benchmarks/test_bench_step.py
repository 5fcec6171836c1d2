"""pytest-benchmark suite for whole MAE training steps: fastmask's step and the official and strong baselines.

    pytest benchmarks/test_bench_step.py --benchmark-only                # CPU: a tiny ViT at 64 px
    pytest benchmarks/test_bench_step.py --benchmark-json out.json       # CUDA: ViT-B/L/H at 224 px, bf16

Not part of the test suite (testpaths = tests). Each case builds its path once (outside the timed
region) and times one optimizer step per round on rotated random batches; CUDA steps end with a
synchronize inside the timed call so the timer sees the GPU's work. fastmask's step here is the method
with the engine's optimizer, without DeepSpeed (`make_fastmask_step`); `fastmask bench` times the
DeepSpeed engine step itself. The analytic FLOPs of the step
(`fastmask.bench.flops`) go into extra_info with the achieved TFLOP/s and, on known GPUs, the MFU.
For side-by-side ratios in one process, use `fastmask bench` (benchmarks/bench_step.py).
"""
import itertools

import pytest
import torch

from fastmask.bench import flops as F
from fastmask.bench.baseline_official import make_official_step
from fastmask.bench.step import (AllTokensMAE, StepBenchArgs, build_fastmask_method, build_official,
                                 find_mae_model, mae_shape, make_fastmask_step, official_dims)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (model, img_size, batch, decoder overrides)
CASES = ([("vit_base_patch16", 224, 128, ()), ("vit_large_patch16", 224, 128, ()),
          ("vit_huge_patch14", 224, 64, ())]
         if CUDA else
         [("vit_tiny_patch16", 64, 8, ("method_args.decoder_embed_dim=128", "method_args.decoder_depth=2",
                                       "method_args.decoder_num_heads=4"))])
PATHS = ("fastmask", "official", "strong", "fastmask_all_tokens", "official_all_tokens")


@pytest.mark.parametrize("case,path", list(itertools.product(CASES, PATHS)),
                         ids=lambda v: v if isinstance(v, str) else f"{v[0]}-{v[1]}px-b{v[2]}")
def test_step(benchmark, case, path):
    model, img_size, batch, overrides = case
    args = StepBenchArgs(model=model, img_size=img_size, batch_size=batch, overrides=overrides)
    torch.manual_seed(0)
    method = build_fastmask_method(args, DEVICE)
    shape = mae_shape(find_mae_model(method), args)
    all_tokens = path.endswith("all_tokens")
    if path.startswith("official"):
        del method
        step = make_official_step(build_official(shape, DEVICE, all_tokens), DTYPE, args.mask_ratio)
    elif path == "strong":
        pytest.importorskip("timm")
        from fastmask.bench.baseline_strong import build_strong_model, make_strong_step

        del method
        step = make_strong_step(build_strong_model(**official_dims(shape)).to(DEVICE), DTYPE, args.mask_ratio)
    else:
        module = AllTokensMAE(method, args.mask_ratio).to(DEVICE) if all_tokens else method
        step = make_fastmask_step(module, DTYPE, DEVICE)
    batches = itertools.cycle([torch.randn(batch, 3, img_size, img_size, device=DEVICE) for _ in range(3)])

    def run():
        step(next(batches))
        if CUDA:
            torch.cuda.synchronize()

    run()  # warm-up outside the timer (allocator, autotuning)
    benchmark.pedantic(run, rounds=5 if CUDA else 3, warmup_rounds=1, iterations=1)
    flops = F.mae_train_flops(shape, batch, all_tokens=all_tokens)
    median = benchmark.stats.stats.median
    peak = F.peak_tflops(torch.cuda.get_device_name(), "bf16") if CUDA else None
    benchmark.extra_info.update(model=model, img_size=img_size, batch=batch, dtype=str(DTYPE), path=path,
                                flops_per_step=flops, tflops=flops / median / 1e12,
                                images_per_s=batch / median, mfu=F.mfu(flops, median, peak))
