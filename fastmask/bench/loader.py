"""Loader benchmark: images/s of the DALI pipeline against the PyTorch/PIL loader, in one run.

    python -m fastmask.bench.loader                          # embedded photos as 200 px JPEGs, 224 px out
    fastmask bench --loader --root /data/imagenet/train --batch-size 256 --threads 16 --workers 16
    python benchmarks/bench_loader.py --device cuda --out benchmarks/results/loader-h100.json

Both loaders are built through `fastmask.data.build_loader` from the same DataConfig (same files,
crop scale, flip, output size, device), so they do the same work: read JPEG, decode, random
resized crop, resize, flip, normalize, deliver [B, 3, S, S] float32 on the device. Per loader and
repeat: a fresh epoch, `--warmup` untimed batches (pipeline build, worker start, first allocations),
then `--batches` timed ones; images/s = batches x B / seconds; the median over `--repeats` is
reported, and the ratio of the medians (DALI / torch). Loader construction (listing and checking
the files; cached after the first run) is reported apart as setup_s. On CUDA the clock stops after
a device synchronize, so batches still in flight are counted.

Without `--root`, the embedded photo set is written once as `--src-size` px JPEGs into the cache
folder (`$FASTMASK_CACHE` or ~/.cache/fastmask), a stand-in for ImageNet's ~400x350 px files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

LOADERS = ("dali", "torch")


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    cpus = os.cpu_count() or 1
    parser.add_argument("--root", default=None,
                        help="image folder (class subfolders) or .txt file list; default: the embedded "
                             "photos written as JPEGs")
    parser.add_argument("--count", type=int, default=None,
                        help="embedded images to write (no --root); default: enough for warm-up + timed "
                             "batches, at least 1024")
    parser.add_argument("--src-size", type=int, default=200, help="side of the embedded JPEGs (no --root)")
    parser.add_argument("--img-size", type=int, default=224, help="output side S")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=cpus, help="DALI threads (data.dali_threads)")
    parser.add_argument("--workers", type=int, default=cpus,
                        help="torch DataLoader workers (data.num_workers)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--min-scale", type=float, default=0.2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per repeat")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per loader (median reported)")
    parser.add_argument("--loaders", default=",".join(LOADERS), help="comma-separated subset of dali,torch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result JSON here")


def bench_root(count: int, size: int) -> Path:
    """-> folder of `count` embedded photo crops as `size` px JPEGs (quality 90), written once."""
    import tempfile

    from PIL import Image

    from fastmask.data.embedded import embedded_images
    from fastmask.data.files import cache_dir

    root = cache_dir() / f"bench-photos-{count}x{size}-v1"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    (tmp / "photos").mkdir()
    for i, img in enumerate(embedded_images(count=count, size=size)):
        Image.fromarray(img).save(tmp / "photos" / f"{i:05d}.jpg", quality=90)
    os.replace(tmp, root)
    return root


def _versions() -> dict:
    import numpy
    import PIL
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
         "pillow": PIL.__version__}
    try:
        import nvidia.dali
        v["nvidia-dali"] = nvidia.dali.__version__
    except ImportError:
        v["nvidia-dali"] = None
    return v


def _device_info(device) -> dict:
    import torch

    info = {"device": str(device), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _time_epoch(loader, epoch: int, args, device) -> tuple[float, "torch.Tensor"]:
    """-> (images/s over args.batches batches after args.warmup untimed ones, the last batch)."""
    import torch

    it = loader.epoch(epoch)
    try:
        for _ in range(args.warmup):
            next(it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            imgs = next(it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
    finally:
        it.close()  # stops this epoch's DALI pipeline / DataLoader workers now
    return args.batches * args.batch_size / dt, imgs


def run_loader_bench(args: argparse.Namespace) -> dict:
    """Benchmark the loaders named in args.loaders side by side; print a table; -> the result dict."""
    import torch

    from fastmask.data import build_loader
    from fastmask.engine.config import DataConfig

    names = [n.strip() for n in args.loaders.split(",") if n.strip()]
    problems = [f"unknown loader {n!r} (choose from {', '.join(LOADERS)})" for n in names if n not in LOADERS]
    for k in ("img_size", "batch_size", "threads", "batches", "repeats"):
        if getattr(args, k) < 1:
            problems.append(f"--{k.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.workers < 0:
        problems.append("--warmup and --workers must be >= 0")
    if problems:
        raise ValueError("loader bench: " + "; ".join(problems))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.root is None and args.count is None:
        args.count = max(1024, -(-(args.warmup + args.batches) * args.batch_size // 512) * 512)
    root = args.root if args.root is not None else str(bench_root(args.count, args.src_size))

    loaders, results = {}, {}
    for name in names:
        data_cfg = DataConfig(loader=name, root=root, img_size=args.img_size, batch_size=args.batch_size,
                              num_workers=args.workers, min_scale=args.min_scale, hflip=True,
                              dali_threads=args.threads)
        t0 = time.perf_counter()
        loaders[name] = build_loader(data_cfg, 0, 1, seed=args.seed, device=device)
        results[name] = {"setup_s": time.perf_counter() - t0, "config": asdict(data_cfg),
                         "runs_images_per_s": []}
        need = args.warmup + args.batches
        if loaders[name].batches_per_epoch < need:
            raise ValueError(f"{name}: an epoch has {loaders[name].batches_per_epoch} batches of "
                             f"{args.batch_size}, fewer than --warmup + --batches = {need}; "
                             f"use more images or smaller batches")
    # Repeats interleave the loaders, so a load change on a shared machine hits both alike.
    for r in range(args.repeats):
        for name, loader in loaders.items():
            rate, imgs = _time_epoch(loader, r, args, device)
            results[name]["runs_images_per_s"].append(rate)
            results[name].update(shape=list(imgs.shape), dtype=str(imgs.dtype).replace("torch.", ""),
                                 out_device=str(imgs.device))
    for r in results.values():
        r["images_per_s"] = statistics.median(r["runs_images_per_s"])
        r["ms_per_batch"] = 1e3 * args.batch_size / r["images_per_s"]
    del loaders

    out = {"bench": "loader", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           **_device_info(device), "versions": _versions(), "root": root,
           "source": None if args.root else {"embedded_count": args.count, "jpeg_side": args.src_size},
           "args": {k: v for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
           "results": results}
    if "dali" in results and "torch" in results:
        out["ratio_dali_over_torch"] = results["dali"]["images_per_s"] / results["torch"]["images_per_s"]

    print(f"loader bench on {device} ({out.get('gpu', out['cpu'])}, {os.cpu_count()} CPUs): "
          f"{root}, out [{args.batch_size}, 3, {args.img_size}, {args.img_size}]")
    print(f"{'loader':<8}{'images/s':>12}{'min':>10}{'max':>10}{'ms/batch':>11}{'setup s':>10}  "
          "workers/threads")
    for name, r in results.items():
        par = args.threads if name == "dali" else args.workers
        print(f"{name:<8}{r['images_per_s']:>12.1f}{min(r['runs_images_per_s']):>10.1f}"
              f"{max(r['runs_images_per_s']):>10.1f}{r['ms_per_batch']:>11.1f}{r['setup_s']:>10.2f}  {par}")
    if "ratio_dali_over_torch" in out:
        print(f"DALI / torch: {out['ratio_dali_over_torch']:.2f}x")
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=str))
        print(f"wrote {path}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmask.bench.loader",
                                     description=__doc__.splitlines()[0])
    add_loader_arguments(parser)
    run_loader_bench(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
