"""Evidence that pretraining learns something useful: short MAE and ExtreMA runs on the generated
shapes beat their own random initialization at k-NN on held-out labelled shapes.

The runs are plain in-process loops (AdamW, cosine lr with warmup, the method's own step hook) on
in-memory images of the shapes' unlabelled split with random resized crops; the probe is
`fastmask.eval`'s weighted k-NN on the cls token of `method.encoder()` (ExtreMA: the teacher, as
it evaluates), on the first images of the labelled train / test splits. The random-init encoder
of each method is near chance on this set (10 classes), so the margin asserted below is learning,
not a property of the architecture; `benchmarks/learning.py` has the long runs of all five methods.

Not a CI check (skipped below): no setting that fits CI's budget (a few CPU-minutes) separates, and
the label ceiling says why. Measured on 2026-11-30 (seed 0, the CASES below, 2000 pretraining images,
k-NN on 1000 / 500 labelled images, cls / mean pool, standard error ~0.015; one thread, loaded
2-core machine):
  MAE      random init 0.110 / 0.102; 300 steps 0.124 / 0.110 (linear probe 0.122 / 0.108, random
           0.116 / 0.122); mask ratio 0.5 at 400 steps 0.120 / 0.116; norm_pix off, or batch 256 at
           lr 2e-3, no better; 800 steps 0.140 / 0.120. About 0.53 CPU-s a step.
  ExtreMA  random init 0.100 / 0.102; 100 steps 0.116 / 0.102 (seed 1: 0.118 / 0.124); 600 steps
           0.118 / 0.112. About 1.3-1.6 CPU-s a step.
The same ViT-Tiny/16 trained *with labels* (benchmarks/learning.py --supervised-vit) gains 5.5 k-NN
points in 250 steps and 12 in 500, so a self-supervised run needs thousands of steps to separate
(MAE: +4.3 at 2000 steps, +5.6 on the mean pool at 4000): 20-40 CPU-minutes, past CI's budget.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastmask.data import shapes
from fastmask.eval.features import extract_features, to_model_input
from fastmask.eval.knn import knn_accuracy
from fastmask.methods import get_method
from fastmask.methods.views import ViewAugment

IMG = 64
PRETRAIN, TRAIN, TEST = 2000, 1000, 500
CASES = {
    "mae": dict(kwargs=dict(model="vit_tiny_patch16", mask_ratio=0.75, decoder_embed_dim=64, decoder_depth=1,
                            decoder_num_heads=4),
                steps=300, batch=64, lr=1e-3, pool="cls", margin=0.05),
    "extrema": dict(kwargs=dict(model="vit_tiny_patch16", mask_ratio=0.75, masking="multi", num_masks=4,
                                proj_hidden_dim=256, proj_dim=64, pred_hidden_dim=256, momentum=0.99,
                                drop_path_rate=0.0),
                    steps=300, batch=64, lr=1e-3, pool="cls", margin=0.05),
}


@pytest.fixture(scope="module")
def shapes_data():
    pre, _ = shapes.shapes_set("pretrain", PRETRAIN, shapes.DEFAULT_SIZE)
    xtr, ytr = shapes.shapes_set("train", TRAIN, shapes.DEFAULT_SIZE)
    xte, yte = shapes.shapes_set("test", TEST, shapes.DEFAULT_SIZE)
    return (to_model_input(pre, IMG), to_model_input(xtr, IMG), torch.as_tensor(ytr),
            to_model_input(xte, IMG),
            torch.as_tensor(yte))


def _knn(encoder, data, pool: str) -> float:
    _, xtr, ytr, xte, yte = data
    return knn_accuracy(extract_features(encoder, xtr, pool), ytr, extract_features(encoder, xte, pool), yte,
                        k=20, temperature=0.07, num_classes=len(shapes.CLASSES))


def _pretrain(method, x: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    aug = ViewAugment(crop_scale=(0.3, 1.0), jitter_p=0.0, gray_p=0.0)  # crop + flip, like the loaders
    opt = torch.optim.AdamW(method.param_groups(0.05), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    losses = []
    method.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        out = method(aug(x[idx], g))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.on_step_end(step + 1, steps)
        losses.append(out["loss"].item())
    return losses


@pytest.mark.skip(reason="no setting within CI's budget separates from random init (module docstring)")
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_short_pretraining_beats_random_init(name, shapes_data):
    case = CASES[name]
    torch.manual_seed(0)
    method = get_method(name)(img_size=IMG, seed=0, **case["kwargs"])
    before = _knn(method.encoder(), shapes_data, case["pool"])
    losses = _pretrain(method, shapes_data[0], case["steps"], case["batch"], case["lr"], seed=0)
    after = _knn(method.encoder(), shapes_data, case["pool"])
    assert all(math.isfinite(v) for v in losses)
    assert before < 0.2, f"{name}: the random-init encoder should be near chance here, got {before:.3f}"
    assert after >= before + case["margin"], (
        f"{name}: k-NN after {case['steps']} steps {after:.3f}, random init {before:.3f} "
        f"(loss {sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f})")
