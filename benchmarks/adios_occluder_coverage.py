"""A diagnostic: where does a trained ADIOS occluder put its masks on the shapes set? Over every
checkpoint of a run (and the run's random initialization), how much of each image's labelled shape
the slot that hides most of it covers, against the slot's share of the image.

    fastmask pretrain --config adios_tiny --steps 1500 --out RUN data.dataset=shapes data.img_size=32 \\
        data.batch_size=64 engine.checkpoint_every=250 engine.keep_last=10
    python benchmarks/adios_occluder_coverage.py RUN --out RESULT.json

On the full images of the shapes' pretraining split (the first `--images`, resized to the run's size
as the probes see them), with the shape's pixel coverage from `shapes.shapes_image_and_mask`, per slot
k of the soft masks M [B, N, H, W] (summing to 1 over the slots at every pixel):
- `area[k]`: the slot's mean over the image;
- `shape_hidden`: sum(M_k * shape) / sum(shape) for the slot k with the most of it, averaged over
  the images: the share of the shape that one occluded view loses when that slot is drawn;
- `background_hidden`: the same slot's mean over the pixels off the shape.
A slot blind to the shape hides the same share of the shape and of the background (about its area).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastmask.data import shapes
from fastmask.eval.features import to_model_input
from fastmask.eval.load import load_method, resolve_config


def coverage(soft: torch.Tensor, shape: torch.Tensor) -> dict:
    """soft [B, N, H, W] slot masks, shape [B, H, W] coverage in [0, 1] -> the figures above."""
    on = (soft * shape[:, None]).flatten(2).sum(2) / shape.flatten(1).sum(1, keepdim=True)   # [B, N]
    most, best = on.max(dim=1)
    off = 1 - shape
    slot = soft[torch.arange(soft.shape[0]), best]                                          # [B, H, W]
    return {"area": soft.flatten(2).mean(2).mean(0).tolist(),
            "shape_hidden": most.mean().item(),
            "background_hidden": ((slot * off).flatten(1).sum(1) / off.flatten(1).sum(1)).mean().item()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="an ADIOS run folder with checkpoints/")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = resolve_config(args.run)
    if cfg.method != "adios":
        ap.error(f"{args.run} is a {cfg.method} run; this reads ADIOS's occluder")
    pairs = [shapes.shapes_image_and_mask(0, "pretrain", i) for i in range(args.images)]
    size = cfg.data.img_size
    x = to_model_input(np.stack([p[0] for p in pairs]), size)
    shape = F.adaptive_avg_pool2d(torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None], size)[:, 0]
    results = {}
    tags = sorted(p.name for p in (args.run / "checkpoints").iterdir() if p.name.startswith("step_"))
    for tag in ["random_init", *tags]:
        path = None if tag == "random_init" else args.run / "checkpoints" / tag
        method, _ = load_method(path, cfg=cfg)
        with torch.no_grad():
            results[tag] = coverage(method.masker.pixel_masks(x), shape)
        print(tag, json.dumps(results[tag]), flush=True)
    meta = {"run": str(args.run), "method": cfg.method, "model": cfg.model, "img_size": size,
            "images": args.images, "shape_share": shape.mean().item(), "torch": torch.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
