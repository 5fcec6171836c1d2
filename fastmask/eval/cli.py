"""`fastmask eval`: k-NN and linear-probe accuracy of a checkpoint's frozen encoder.

    fastmask eval --checkpoint runs/mae_tiny                   # generated shapes, k-NN (k=20) + linear probe
    fastmask eval --checkpoint runs/mae_tiny --data digits     # scikit-learn's handwritten digits
    fastmask eval --checkpoint runs/mae_tiny --data my_val_dir --k 10 --out eval.json
    fastmask eval --random-init --config mae_tiny               # the untrained model alone
    fastmask eval --checkpoint mae_pretrain_vit_base.pth --config mae_vit_base_patch16  # official MAE

Every result is printed beside the random-init baseline: the same model, untrained (seeded with
the config's engine.seed), on the same data. Small or unlike evaluation sets can rank an untrained
encoder above a trained one; the baseline keeps that from being misread.

Data (`--data`): `shapes` (the default) is the generated set of `fastmask.data.shapes`, 10 shape
classes over random colours, backgrounds and clutter, 5,000 train / 2,000 test images held out from
its pretraining split, on which a random-init encoder scores near chance; `digits` is
scikit-learn's handwritten digits (fixed stratified split), which a random ViT-Tiny already
classifies at ~90%; any other value is a labeled image folder (DIR/<class>/<image>; DIR/train and
DIR/val when both exist, else a fixed stratified split). Images are resized to the model's
img_size and ImageNet-normalized. Features: the cls token after the final
norm (MAE's linear-probe feature) or `--pool mean`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import time
from pathlib import Path

import numpy as np
import torch

from .features import (embedded_labeled_set, extract_features, fixed_split, image_folder_set,
                       shapes_labeled_set, to_model_input)
from .knn import knn_accuracy
from .load import add_source_arguments
from .linear import ProbeArgs, linear_probe_accuracy

_P = ProbeArgs()
LABELED_SETS = ("shapes", "digits")  # the built-in sets --data names; anything else is a folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n".join(__doc__.splitlines()[2:])
    add_source_arguments(parser, "run folder, checkpoint folder or weights file (.pt/.pth)",
                         "evaluate a randomly initialized encoder")
    parser.add_argument("--data", default="shapes",
                        help="shapes (generated, the default) | digits (scikit-learn's) | a labeled image "
                             "folder")
    parser.add_argument("--data-size", type=int, default=64, help="side images from --data are read at")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="held-out share when --data has no val/")
    parser.add_argument("--k", type=int, default=20, help="neighbours for k-NN")
    parser.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature (DINO's 0.07)")
    parser.add_argument("--pool", default="cls", choices=("cls", "mean"))
    parser.add_argument("--probe-epochs", type=int, default=_P.epochs)
    parser.add_argument("--probe-lr", type=float, default=_P.lr)
    parser.add_argument("--no-knn", action="store_true")
    parser.add_argument("--no-linear", action="store_true")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=128, help="feature-extraction batch")
    parser.add_argument("--out", default=None, help="write the result JSON here")


def load_labeled(data: str | None, test_fraction: float, data_size: int = 64):
    """data: "shapes" (None: the same), "digits" or a folder -> (uint8 train images, train labels,
    uint8 test images, test labels, class names, description)."""
    if data in (None, "shapes"):
        xtr, ytr, xte, yte, classes = shapes_labeled_set(data_size)
        return xtr, ytr, xte, yte, classes, "generated shapes (fastmask.data.shapes)"
    if data == "digits":
        imgs, labels, classes = embedded_labeled_set()
        tr, te = fixed_split(labels, test_fraction)
        return imgs[tr], labels[tr], imgs[te], labels[te], classes, "embedded digits (scikit-learn)"
    root = Path(data)
    if (root / "train").is_dir() and (root / "val").is_dir():
        xtr, ytr, classes = image_folder_set(root / "train", data_size)
        xte, yte, classes_te = image_folder_set(root / "val", data_size)
        if classes_te != classes:
            raise ValueError(f"{root}/train and {root}/val have different classes: {classes} vs {classes_te}")
        return xtr, ytr, xte, yte, classes, str(root)
    imgs, labels, classes = image_folder_set(root, data_size)
    tr, te = fixed_split(labels, test_fraction)
    return imgs[tr], labels[tr], imgs[te], labels[te], classes, str(root)


def evaluate_encoder(encoder: torch.nn.Module, img_size: int, data: str | None = "shapes", k: int = 20,
                     temperature: float = 0.07, pool: str = "cls", knn: bool = True, linear: bool = True,
                     probe: ProbeArgs = _P, test_fraction: float = 0.2, data_size: int = 64,
                     device: str | torch.device = "cpu", batch_size: int = 128) -> dict:
    """Frozen `encoder` (forward_features) -> {"knn_top1", "linear_top1", sizes, timings} on the
    labeled set."""
    t0 = time.perf_counter()
    xtr, ytr, xte, yte, classes, desc = load_labeled(data, test_fraction, data_size)
    ftr = extract_features(encoder, to_model_input(xtr, img_size), pool, batch_size, device)
    fte = extract_features(encoder, to_model_input(xte, img_size), pool, batch_size, device)
    t_feat = time.perf_counter() - t0
    ytr_t, yte_t = torch.as_tensor(ytr), torch.as_tensor(yte)
    C = len(classes)
    out = {"data": desc, "classes": C, "train_size": len(ytr), "test_size": len(yte), "img_size": img_size,
           "pool": pool, "feature_dim": ftr.shape[1], "chance": float(np.bincount(yte).max() / len(yte)),
           "features_s": t_feat}
    if knn:
        out.update(knn_top1=knn_accuracy(ftr, ytr_t, fte, yte_t, k, temperature, C), k=k,
                   temperature=temperature)
    if linear:
        t1 = time.perf_counter()
        out.update(linear_top1=linear_probe_accuracy(ftr, ytr_t, fte, yte_t, C, probe),
                   probe_epochs=probe.epochs, probe_lr=probe.lr, linear_s=time.perf_counter() - t1)
    return out


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument that can be checked without a model, in one ValueError."""
    from fastmask.paths import check_output_file

    problems = []
    if args.k < 1:
        problems.append(f"--k must be >= 1, got {args.k}")
    if not args.temperature > 0:
        problems.append(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.test_fraction < 1:
        problems.append(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.probe_epochs < 1 or not args.probe_lr > 0:
        problems.append(f"--probe-epochs must be >= 1 and --probe-lr > 0, "
                        f"got {args.probe_epochs}, {args.probe_lr}")
    if args.batch_size < 1 or args.data_size < 1:
        problems.append(f"--batch-size and --data-size must be >= 1, got {args.batch_size}, {args.data_size}")
    if args.no_knn and args.no_linear:
        problems.append("--no-knn and --no-linear together leave nothing to evaluate")
    if args.data not in (None, *LABELED_SETS) and not Path(args.data).is_dir():
        problems.append(f"--data {args.data} is not a folder (nor one of {', '.join(LABELED_SETS)})")
    if args.data in (None, "shapes") and args.data_size < 16:
        problems.append(f"--data-size must be >= 16 for the shapes, got {args.data_size}")
    if problems:
        raise ValueError("; ".join(problems))
    if args.out:
        check_output_file(args.out, "--out")


def _scores(r: dict, k: int) -> list[tuple[str, float, str]]:
    return [(name, r[key], key) for name, key in ((f"k-NN@{k}", "knn_top1"), ("linear probe", "linear_top1"))
            if key in r]


def main(args: argparse.Namespace) -> int:
    from .load import load_encoder, pick_device, resolve_config

    check_arguments(args)
    device = pick_device(args.device)
    checkpoint = None if args.random_init else args.checkpoint
    cfg = resolve_config(checkpoint, args.config, args.overrides)
    encoder, cfg = load_encoder(checkpoint, cfg=cfg, device=device)
    run = dict(data=args.data, k=args.k, temperature=args.temperature, pool=args.pool, knn=not args.no_knn,
               linear=not args.no_linear, probe=ProbeArgs(epochs=args.probe_epochs, lr=args.probe_lr),
               test_fraction=args.test_fraction, data_size=args.data_size, device=device,
               batch_size=args.batch_size)
    result = evaluate_encoder(encoder, cfg.data.img_size, **run)
    baseline = result if checkpoint is None else evaluate_encoder(
        load_encoder(None, cfg=cfg, device=device)[0], cfg.data.img_size, **run)
    result = {"checkpoint": None if checkpoint is None else str(checkpoint), "model": cfg.model,
              "method": cfg.method, "device": str(device),
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **result,
              "random_init": {key: baseline[key] for _, _, key in _scores(baseline, args.k)}}
    what = "random init" if checkpoint is None else str(checkpoint)
    line = (f"[eval] {result['model']} ({what}) on {result['data']} ({result['test_size']} test images, "
            f"chance {100 * result['chance']:.1f}%): ")
    line += ", ".join(f"{name} {100 * value:.1f}%" + ("" if checkpoint is None else
                                                      f" (random init {100 * baseline[key]:.1f}%)")
                      for name, value, key in _scores(result, args.k))
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)
        print(f"[eval] wrote {args.out}")
    return 0
