"""`fastmask bench`: pretrain's training step beside the official MAE step and a strong baseline.

The fastmask path is the DeepSpeed step `fastmask pretrain` runs; `official` is the official MAE
code's step, `strong` a strong plain-PyTorch baseline (fastmask.bench.step says what each runs).
With `--loader ...` the data-loader benchmark runs instead, with `--ablate ...` the ablation, with
`--integration ...` the timm / HF integration benchmark.

    fastmask bench --model vit_base_patch16 --batch-size 8 --dtype fp32 --threads 2 --out step.json
    fastmask bench --model vit_large_patch16 --batch-size 256 --dtype bf16 --baseline strong --plot step.png
    fastmask bench --loader [loader options...]      # everything after --loader goes to fastmask.bench.loader
    fastmask bench --ablate [ablation options...]    # the optimization ablation (fastmask.bench.ablate)
    fastmask bench --integration timm|hf [options...]  # timm / HF model, unpatched vs patched
                                                         (bench.integration)

Defaults live in `fastmask.bench.step.StepBenchArgs`. Op benchmarks: `pytest benchmarks/`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .step import BASELINES, FASTMASK_STEPS, StepBenchArgs

_D = StepBenchArgs()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n".join(__doc__.splitlines()[2:])
    parser.add_argument("--loader", nargs=argparse.REMAINDER, default=None, metavar="LOADER_ARGS",
                        help="benchmark the data loader instead; the rest of the line goes to it "
                             "(`fastmask bench --loader --help` lists its options)")
    parser.add_argument("--ablate", nargs=argparse.REMAINDER, default=None, metavar="ABLATE_ARGS",
                        help="run the optimization ablation instead; the rest of the line goes to it "
                             "(`fastmask bench --ablate --help` lists its options)")
    parser.add_argument("--integration", nargs=argparse.REMAINDER, default=None, metavar="LIBRARY [ARGS]",
                        help="time a timm or HF model's training step unpatched vs patched by "
                             "fastmask.integrations; the rest of the line goes to it "
                             "(`fastmask bench --integration --help` lists its options)")
    parser.add_argument("--method", default=_D.method, help="registered method (the baselines exist for mae)")
    parser.add_argument("--model", default=_D.model, help="registered ViT, e.g. vit_base_patch16")
    parser.add_argument("--img-size", type=int, default=_D.img_size)
    parser.add_argument("--batch-size", type=int, default=_D.batch_size)
    parser.add_argument("--mask-ratio", type=float, default=_D.mask_ratio)
    parser.add_argument("--dtype", default=_D.dtype, choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto: bf16 on CUDA, fp32 on CPU (engine.precision for fastmask, autocast for "
                             "the baselines)")
    parser.add_argument("--device", default=_D.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--warmup", type=int, default=_D.warmup,
                        help="untimed steps per path (the first one is reported)")
    parser.add_argument("--repeats", type=int, default=_D.repeats,
                        help="timed steps per path (median reported)")
    parser.add_argument("--baseline", default=_D.baseline, choices=tuple(BASELINES),
                        help="baselines timed beside fastmask: official (the official MAE step), strong "
                             "(timm SDPA blocks, fused AdamW, no syncs, torch.compile), both, none")
    parser.add_argument("--ablation", action="store_true",
                        help="also time MAE's all-token encoder (mask tokens in the encoder), fastmask and "
                             "official")
    parser.add_argument("--fastmask-step", default=_D.fastmask_step, choices=FASTMASK_STEPS,
                        help="engine: the DeepSpeed step pretrain runs; direct: the method and the engine's "
                             "optimizer without DeepSpeed (for machines without it)")
    parser.add_argument("--no-strong-compile", dest="strong_compile", action="store_false",
                        help="do not torch.compile the strong baseline (tests; the result says so)")
    parser.add_argument("--compile-backend", default=_D.compile_backend,
                        help="torch.compile backend of the strong baseline (inductor; aot_eager for a quick "
                             "check)")
    parser.add_argument("--threads", type=int, default=_D.threads, help="torch CPU threads")
    parser.add_argument("--backend", default=_D.backend, help="fastmask.ops backend for the fastmask path "
                                                               "(engine.backend)")
    parser.add_argument("--config", default=_D.recipe, help="config recipe the method is built from")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set method_args.decoder_depth=1)")
    parser.add_argument("--peak-tflops", type=float, default=_D.peak_tflops,
                        help="peak TFLOP/s for MFU (default: datasheet figure for known GPUs, none on CPU)")
    parser.add_argument("--num-inputs", type=int, default=_D.num_inputs, help="distinct batches rotated")
    parser.add_argument("--seed", type=int, default=_D.seed)
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the extra step per path that measures peak memory "
                             "(saved activations are still measured)")
    parser.add_argument("--out", default=None, help="write the result JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart here (needs matplotlib)")


def _loader_main(rest: list[str]) -> int:
    import importlib

    try:
        loader = importlib.import_module("fastmask.bench.loader")
    except ModuleNotFoundError as e:
        if e.name != "fastmask.bench.loader":
            raise
        print("fastmask bench --loader: fastmask.bench.loader is not installed in this build",
              file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="fastmask bench --loader")
    loader.add_loader_arguments(parser)
    loader.run_loader_bench(parser.parse_args(rest))  # prints its table and writes its --out JSON
    return 0


def args_from_namespace(ns: argparse.Namespace) -> StepBenchArgs:
    fields = {f.name for f in dataclasses.fields(StepBenchArgs)}
    kw = {k: v for k, v in vars(ns).items() if k in fields}
    kw["recipe"] = ns.config
    kw["overrides"] = tuple(ns.overrides)
    return StepBenchArgs(**kw)


def check_outputs(ns: argparse.Namespace) -> None:
    """--out and --plot can be written (and --plot's matplotlib imported): checked before the benchmark."""
    from fastmask.paths import check_output_file

    if ns.out:
        check_output_file(ns.out, "--out")
    if ns.plot:
        check_output_file(ns.plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plot needs matplotlib, which is not installed (pip install matplotlib); "
                              "run without --plot, or install it first") from None


def main(ns: argparse.Namespace) -> int:
    if ns.loader is not None:
        return _loader_main(ns.loader)
    if ns.ablate is not None:
        from .ablate import main as ablate_main
        return ablate_main(ns.ablate, prog="fastmask bench --ablate")
    if ns.integration is not None:
        from .integration import main as integration_main
        return integration_main(ns.integration)
    from .step import plot, run_step_bench, save_json

    check_outputs(ns)
    args = args_from_namespace(ns)
    result = run_step_bench(args)
    print(json.dumps({"device": result["device"]["name"], "model": args.model, "batch_size": args.batch_size,
                      "dtype": result["args"]["dtype"], "skipped": result["skipped"],
                      "ratios": result["ratios"]},
                     indent=2))
    if ns.out:
        print(f"[bench] wrote {save_json(result, ns.out)}")
    if ns.plot:
        print(f"[bench] wrote {plot(result, ns.plot)}")
    return 0
