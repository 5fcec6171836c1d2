"""Learning at micro scale: a method pretrained on a micro ViT, fine-tuned from checkpoints along the way
against its own random init. The CI learning check (tests/test_learning.py) is this at its smallest.

    python benchmarks/learning_micro.py --method mae --out F                 # the CI case (1000 steps)
    python benchmarks/learning_micro.py --method mst --steps 4000 --ft-at 500,1000,2000,4000 --out F
    python benchmarks/learning_micro.py --method extrema --ft-at 1000,2000,4000,6000 --seed 1 --out F

Why micro: at benchmarks/learning.py's scale (ViT-Tiny/16 at 64 px) a 10x step budget is hours a method
on 2 CPU cores. The micro ViT (96 wide, 4 blocks, 3 heads, 8-px patches: 16 patches at 32 px, the
token count of ViT-Tiny/16 at 64 px) makes a step 5-20x cheaper, so long budgets fit a CPU.

The pretraining is a plain in-process loop (AdamW with each method's parameter groups, weight decay
0.05, betas 0.9 / 0.95, the engine's warmup + cosine lr, the method's own step hook) over 5000 images of
the shapes' unlabelled split with random resized crops and flips, batch 64, one thread. Fine-tuning is
benchmarks/learning.py's loop (`train_with_labels`: encoder and a fresh linear head on the mean pool,
FINETUNE below) on a copy of the encoder (a teacher's weights made trainable, a fixed position
embedding kept fixed), scored on the 2000 held-out labelled shapes; the random init is fine-tuned the
same way. Each method's arguments are its tiny recipe's, with heads shrunk to the micro width (CASES).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from fastmask.data import shapes
from fastmask.engine.schedule import lr_at
from fastmask.eval.features import shapes_labeled_set, to_model_input
from fastmask.methods import get_method
from fastmask.methods.views import ViewAugment
from fastmask.models import MODELS, VisionTransformer
from fastmask.models import vit as vit_module

MICRO_NAME, MICRO_ARCH, MICRO_PATCH, MICRO_IMG = "vit_learnci_patch8", (96, 4, 3), 8, 32
PRETRAIN_IMAGES = 5000
PRETRAIN = {"batch": 64, "lr": 1e-3, "min_scale": 0.2}
_DECODER = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
# method -> (its arguments at micro scale, default steps). MAE and RelaxMIM (C-MAE: InfoNCE between the
# masked and the full branch's tokens) at the CI check's steps.
CASES = {
    "mae": (dict(mask_ratio=0.75, norm_pix=True, **_DECODER), 1000),
    "relaxmim": (dict(mask_ratio=0.75, similarity="infonce", target="stopgrad", level="token",
                      negatives="batch", temperature=0.2, proj_hidden_dim=256, proj_dim=64, **_DECODER),
                 2000),
    "extrema": (dict(mask_ratio=0.8, num_masks=5, proj_hidden_dim=256, proj_dim=64, pred_hidden_dim=256,
                     momentum=0.996, drop_path_rate=0.0), 6000),
    # 2 local crops of 16 px (2x2 patches); no frozen last layer: the loop has no epochs
    "mst": (dict(out_dim=1024, head_hidden_dim=512, bottleneck_dim=64, momentum=0.996, local_crops_number=2,
                 local_crop_size=16, decoder_width=64, drop_path_rate=0.0, freeze_last_layer=0), 4000),
}
FINETUNE = {"steps": 200, "batch_size": 64, "lr": 1e-3, "train_images": 5000, "probe_at": [200],
            "pool": "mean"}  # learning.finetune_encoder's settings


class _Forever:
    """register_micro_vit's patcher outside a test: plain assignments, for the life of the process."""

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value

    @staticmethod
    def setattr(obj, name, value):
        setattr(obj, name, value)


def register_micro_vit(patch=None) -> None:
    """Make MICRO_NAME a ViT name (MAE takes architectures by name, through vit_config). `patch`: a pytest
    MonkeyPatch (undone after the test); None: for the life of the process."""
    patch = patch or _Forever()
    patch.setitem(vit_module.VIT_ARCHS, "learnci", MICRO_ARCH)
    if MICRO_PATCH not in vit_module.PATCH_SIZES:
        patch.setattr(vit_module, "PATCH_SIZES", (*vit_module.PATCH_SIZES, MICRO_PATCH))

    def micro(**kw):
        return VisionTransformer(**{**vit_module.vit_config(MICRO_NAME), **kw})

    patch.setitem(MODELS, MICRO_NAME, micro)


_spec = importlib.util.spec_from_file_location("learning", Path(__file__).with_name("learning.py"))
learning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning)


def pretrain_loop(method, x: torch.Tensor, steps: int, seed: int, device, batch: int, lr: float,
                  min_scale: float, on_step=None) -> list[float]:
    """Train `method` for `steps` on random crops of `x` -> the losses; on_step(step, out) after each (out:
    the method's outputs at that step)."""
    aug = ViewAugment(crop_scale=(min_scale, 1.0), jitter_p=0.0, gray_p=0.0)  # the loaders' crop and flip
    opt = torch.optim.AdamW(method.param_groups(0.05), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    losses = []
    method.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        out = method(aug(x[idx], g).to(device))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.on_step_end(step + 1, steps)
        losses.append(out["loss"].item())
        if on_step is not None:
            on_step(step + 1, out)
    return losses


def run(method_name: str, steps: int | None = None, seed: int = 0, ft_at: list[int] | None = None,
        log=None) -> dict:
    """Pretrain CASES[method_name] for `steps` (None: its default) from `seed`; fine-tune its random init
    and the encoder at each step of `ft_at` (None: the last) -> {"random_init": accuracy, "trained":
    {step: accuracy}, "losses": [...], "metrics": {step: the method's scalar outputs, averaged over the
    last 50 steps}}. `log(result)`: called after each fine-tuning (to save partial results)."""
    kwargs, default_steps = CASES[method_name]
    steps = steps or default_steps
    ft_at = sorted(set(ft_at or [steps]))
    if ft_at[0] < 1 or ft_at[-1] > steps:
        raise ValueError(f"ft_at must lie in 1..{steps}, got {ft_at}")
    pre, _ = shapes.shapes_set("pretrain", PRETRAIN_IMAGES, shapes.DEFAULT_SIZE)
    data = shapes_labeled_set(shapes.DEFAULT_SIZE)
    torch.manual_seed(seed)
    method = get_method(method_name)(model=MICRO_NAME, img_size=MICRO_IMG, seed=seed, **kwargs)
    pos_names = [n for n, _ in method.encoder().named_parameters() if n.startswith("pos_embed")]
    pos_trainable = {n: any(p.requires_grad for m, p in method.named_parameters()
                            if m == n or m.endswith("." + n))
                     for n in pos_names}  # the student's flag (a teacher's copy is never trainable)

    def finetune(encoder) -> float:
        encoder = copy.deepcopy(encoder)
        for n, p in encoder.named_parameters():
            p.requires_grad_(pos_trainable.get(n, True))
        out = learning.finetune_encoder(encoder, MICRO_IMG, data, seed, settings=FINETUNE)
        return out["probes"][-1]["test_accuracy"]

    result = {"method": method_name, "steps": steps, "seed": seed, "kwargs": kwargs,
              "random_init": finetune(method.encoder()), "trained": {}, "metrics": {}}
    history: dict[str, list[float]] = {}  # the method's scalar outputs, step by step
    t0 = time.perf_counter()

    def on_step(step: int, out: dict) -> None:
        for k, v in out.items():
            if torch.is_tensor(v) and v.numel() == 1:
                history.setdefault(k, []).append(float(v.detach()))
        if step in ft_at:
            result["trained"][step] = finetune(method.encoder())
            result["metrics"][step] = {k: sum(v[-50:]) / len(v[-50:]) for k, v in history.items()}
            result["pretrain_s"] = time.perf_counter() - t0
            if log is not None:
                log(result)

    result["losses"] = pretrain_loop(method, to_model_input(pre, MICRO_IMG), steps, seed, torch.device("cpu"),
                                     on_step=on_step, **PRETRAIN)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=list(CASES), required=True)
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps (default: CASES')")
    ap.add_argument("--ft-at", default=None, metavar="S,S,...",
                    help="fine-tune at these steps (default: the last)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="results JSON (rewritten after each fine-tuning)")
    a = ap.parse_args(argv)
    ft_at = [int(s) for s in a.ft_at.split(",")] if a.ft_at else None
    torch.set_num_threads(1)
    register_micro_vit()

    def save(result: dict) -> None:
        a.out.write_text(json.dumps(result, indent=1))
        print(f"[micro] {a.method} step {max(result['trained'])}: fine-tuned {result['trained']}, "
              f"random init {result['random_init']:.4f}", flush=True)

    result = run(a.method, a.steps, a.seed, ft_at, log=save)
    losses = result.pop("losses")
    result["loss_first_last_50"] = [sum(losses[:50]) / 50, sum(losses[-50:]) / 50]
    args = sys.argv[1:] if argv is None else argv
    result["command"] = "python benchmarks/learning_micro.py " + " ".join(args)
    a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
