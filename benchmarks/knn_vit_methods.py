"""k-NN accuracy on the embedded digits of tiny ExtreMA / RelaxMIM / MST / MAE runs vs random init.

    python benchmarks/knn_vit_methods.py RUN_DIR [RUN_DIR ...] [--out results.json]

Each RUN_DIR is a `fastmask pretrain --out RUN_DIR` folder. The whole method is loaded from its
latest checkpoint and `method.encoder()` is evaluated; the
baseline is the same method built from the same config and seed without training. Features: the
cls token (`pool=cls`) and the mean of the patch tokens (`pool=mean`) of `forward_features`, at the
run's img_size; weighted k-NN (k = 20, T = 0.07) on a fixed stratified 80/20 split of the digits.
The loss summary (first / last / min logged loss) comes from the run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from fastmask.eval.features import embedded_labeled_set, extract_features, fixed_split, to_model_input
from fastmask.eval.knn import knn_accuracy
from fastmask.eval.load import find_config, read_state_dict, resolve_weights
from fastmask.engine.config import load_config
from fastmask.methods import build_method


def _knn(encoder, x, labels, train_idx, test_idx) -> dict[str, float]:
    out = {}
    for pool in ("cls", "mean"):
        f = extract_features(encoder, x, pool=pool)
        out[pool] = knn_accuracy(f[train_idx], labels[train_idx], f[test_idx], labels[test_idx], k=20,
                                 temperature=0.07, num_classes=10)
    return out


def evaluate(run: Path) -> dict:
    # Whole-method load by hand: fastmask.eval.load treats a state dict without MAE's `decoder_*`
    # keys as encoder-only, which every non-MAE method's is.
    weights = resolve_weights(run)
    cfg = load_config(str(find_config(weights)))
    torch.manual_seed(cfg.engine.seed)  # the engine seeds the same way before building the method
    untrained = build_method(cfg).eval()
    method = build_method(cfg)
    method.load_state_dict(read_state_dict(weights), strict=True)
    method.eval()
    imgs, labels, _ = embedded_labeled_set()
    x = to_model_input(imgs, cfg.data.img_size)
    labels = torch.as_tensor(labels)
    tr, te = (torch.as_tensor(i) for i in fixed_split(labels.numpy(), 0.2, seed=0))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"run": str(run), "method": cfg.method, "model": cfg.model, "masking": cfg.masking,
            "img_size": cfg.data.img_size, "steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
            "loss_min": min(losses), "knn_trained": _knn(method.encoder(), x, labels, tr, te),
            "knn_random_init": _knn(untrained.encoder(), x, labels, tr, te)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    results = [evaluate(r) for r in args.runs]
    for r in results:
        print(f"{r['method']:9s} {r['masking']:9s} {r['steps']:3d} steps  loss {r['loss_first']:.4f} -> "
              f"{r['loss_last']:.4f}  kNN cls {r['knn_trained']['cls']:.3f} (random {r['knn_random_init']['cls']:.3f})"
              f"  mean {r['knn_trained']['mean']:.3f} (random {r['knn_random_init']['mean']:.3f})")
    if args.out:
        meta = {"device": "cpu", "torch": torch.__version__, "python": sys.version.split()[0],
                "platform": platform.platform(), "knn": {"k": 20, "temperature": 0.07, "split": "stratified 80/20 seed 0"}}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
