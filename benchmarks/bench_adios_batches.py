"""ADIOS: one view per BatchNorm batch (the official loop, what `ADIOS` does) against all views in one
batch (`joint`, written here only: the library has no option for it unless this measures it faster),
the encoder's phase (forward + backward) timed side by side.

    python benchmarks/bench_adios_batches.py [--model resnet18] [--img 32] [--batch 16] [--masks 4]
        [--rounds 7] [--out benchmarks/results/adios-batches-DATE-DEVICE.json]

Each round times one step of each form (alternating order); the verdict is the median over rounds of
the per-round ratio joint / per_view, so drift in a shared machine's load cancels.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fastmask.bench.step import device_info, versions
from fastmask.methods.adios import ADIOS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--masks", type=int, default=4)
    ap.add_argument("--ssl", default="simclr")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    args = ADIOS.Args(ssl=a.ssl, num_masks=a.masks, mask_fbase=8, unet_norm="gn", small_stem=True)
    m = ADIOS(a.model, a.img, args).to(device)
    imgs = torch.randn(a.batch, 3, a.img, a.img, device=device)

    per_view = (m._embed, m._predict)

    def joint_embed(net, views):
        return list(net(torch.cat(views)).split(views[0].shape[0]))

    def joint_predict(z):
        return list(m.predictor(torch.cat(z)).split(z[0].shape[0]))

    def step(form: str) -> float:
        m._embed, m._predict = per_view if form == "per_view" else (joint_embed, joint_predict)
        m.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        m(imgs)["loss"].backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        m._pending.clear()
        return time.perf_counter() - t0

    for form in ("per_view", "joint"):  # warm-up
        step(form)
    times: dict[str, list[float]] = {"per_view": [], "joint": []}
    for r in range(a.rounds):
        for form in (("per_view", "joint") if r % 2 == 0 else ("joint", "per_view")):
            times[form].append(step(form))
    ratios = [j / p for j, p in zip(times["joint"], times["per_view"])]
    result = {"benchmark": "adios_bn_batches", "model": a.model, "img_size": a.img, "batch": a.batch,
              "num_masks": a.masks, "ssl": a.ssl, "dtype": "fp32", "what": "encoder phase forward+backward",
              "median_s": {k: statistics.median(v) for k, v in times.items()}, "times_s": times,
              "median_ratio_joint_over_per_view": statistics.median(ratios),
              "device": device_info(device), "versions": versions()}
    print(f"{a.model} {a.img}px batch {a.batch} N={a.masks} {a.ssl}: per_view "
          f"{result['median_s']['per_view']:.3f} s, joint {result['median_s']['joint']:.3f} s, "
          f"joint/per_view (median of per-round ratios) {result['median_ratio_joint_over_per_view']:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
