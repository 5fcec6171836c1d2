"""pytest-benchmark suite over the same cases as bench_ops.py (fwd+bwd of each op, each implementation).

    pytest benchmarks/test_bench_ops.py --benchmark-only                 # CUDA: ViT-B shapes, batch 64
    pytest benchmarks/test_bench_ops.py --benchmark-json out.json        # CPU: tiny shapes, torch rows

Not part of the test suite (testpaths = tests). On a CPU the Triton rows are skipped ("no GPU"):
interpreter timings mean nothing. Bytes and FLOPs of each case go into extra_info, with the achieved
GB/s or TFLOP/s computed from the median. CUDA timings synchronize inside the timed call.
"""
import pytest
import torch

import bench_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 64 if DEVICE == "cuda" else 2
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CASES = bench_ops.build_cases(DEVICE, BATCH, DTYPE, models=("vit_b",))


def _params():
    for case in CASES:
        for impl in bench_ops._impls(case.op, DEVICE):
            yield pytest.param(case, impl, id=f"{case.op}-{case.model}-{impl}")


@pytest.mark.parametrize("case,impl", list(_params()))
def test_fwd_bwd(benchmark, case, impl):
    fn, skip = bench_ops._impls(case.op, DEVICE)[impl]
    if fn is None:
        pytest.skip(skip)
    inputs = [case.make(seed) for seed in range(3)]
    grads = []
    step = [0]

    def run():
        i = step[0] % 3
        step[0] += 1
        args, wrt = inputs[i]
        res = torch.autograd.grad(bench_ops._as_tuple(fn(*args)), wrt, grads[i])
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return res

    try:
        for args, _ in inputs:
            with torch.no_grad():
                outs = bench_ops._as_tuple(fn(*args))
            grads.append([torch.randn(o.shape, device=o.device).to(o.dtype) for o in outs])
        run()  # compile / autotune / first-call costs stay out of the timings
    except RuntimeError as e:  # an SDPA backend that cannot take these inputs on this device
        if impl.startswith("sdpa:"):
            pytest.skip(str(e)[:200])
        raise
    res = benchmark(run)
    assert all(torch.isfinite(g).all() for g in res)
    median_s = benchmark.stats.stats.median
    nbytes, flops = case.bytes_fwd + case.bytes_bwd, case.flops_fwd + case.flops_bwd
    benchmark.extra_info.update(shapes=case.shapes, device=DEVICE, dtype=str(DTYPE), bytes=nbytes,
                                flops=flops)
    if nbytes:
        benchmark.extra_info["GB/s"] = nbytes / median_s / 1e9
    if flops:
        benchmark.extra_info["TFLOP/s"] = flops / median_s / 1e12
