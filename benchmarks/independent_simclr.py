"""An independent plain-PyTorch SimCLR (timm's ViT-Tiny/16, written from the SimCLR paper) at ADIOS's
learning.py budget, to tell a bug in fastmask's ADIOS/SimCLR from the objective at this scale: is a
SimCLR-pretrained ViT a worse start for fine-tuning than its random init here, as ADIOS's is?

    python benchmarks/independent_simclr.py --out F.json      # 300 steps, then probes and fine-tuning
    python benchmarks/independent_simclr.py --init-from RUN --out F.json   # from a run's initial weights
    python benchmarks/independent_simclr.py --steps 3 --no-finetune --out /tmp/x.json   # smoke test

Nothing from fastmask for the pretraining but `fastmask.data.shapes` for the images: its own views
(torchvision, as ADIOS's recipe draws them: random resized crop 0.2-1 at 64 px, flip, colour jitter
0.4/0.4/0.2/0.1 p 0.8, grey 0.2, Gaussian blur p 0.5), projector (the paper's g = W2 relu(W1 h), 256, 64),
NT-Xent over the 2B views at temperature 0.2 (each view's positive is its pair, the other 2B-2 its
negatives), SGD (momentum 0.9, lr 0.05, weight decay 1e-4) with 5% warm-up and cosine, batch 64,
timm's ViT and init. Evaluated with benchmarks/learning.py's yardsticks, the same as fastmask's runs:
the frozen probes (`learning.probe`) and the fine-tuning (`learning.finetune_encoder`), for the
trained encoder and its random init (timm's init, seed 0; or, with --init-from, the initial weights of a
learning.py run, e.g. ADIOS's: fastmask's ViT has timm's parameter names and function, and timm's own
init fine-tunes far slower here, 0.116 / 0.127 at 250 / 500 steps against fastmask's 0.141 / 0.200).
Not ADIOS: no occluder.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2 as T

_spec = importlib.util.spec_from_file_location("learning", Path(__file__).with_name("learning.py"))
learning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning)

BATCH, LR, MOMENTUM, WD, TEMPERATURE = 64, 0.05, 0.9, 1e-4, 0.2
HID, OUT = 256, 64
IMG = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIEW = T.Compose([
    T.RandomResizedCrop(IMG, scale=(0.2, 1.0), antialias=True), T.RandomHorizontalFlip(0.5),
    T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
    T.RandomApply([T.GaussianBlur(kernel_size=7, sigma=(0.1, 2.0))], p=0.5),
    T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


def backbone(init_from: Path | None = None) -> nn.Module:
    """timm's ViT-Tiny/16 at 64 px: timm's init, or `init_from`'s (a learning.py run) initial weights."""
    net = timm.create_model("vit_tiny_patch16_224", img_size=IMG, num_classes=0)
    if init_from is not None:
        from fastmask.eval.load import load_encoder, resolve_config

        cfg = resolve_config(init_from)
        if cfg.data.img_size != IMG:
            raise ValueError(f"{init_from} trains at {cfg.data.img_size} px, this script at {IMG}")
        net.load_state_dict(load_encoder(None, cfg=cfg)[0].state_dict())  # strict: the same names
    return net


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: row i of the 2B normalized projections against all others, its pair the positive."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))                       # a view is not its own negative
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, pair)


def lr_at(step: int, total: int) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return LR * (step + 1) / warmup
    return LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def pretrain(net: nn.Module, steps: int) -> list[dict]:
    """SimCLR on the unlabelled shapes split; -> loss rows every 25 steps."""
    from fastmask.data import shapes

    pre, _ = shapes.shapes_set("pretrain", shapes.PRETRAIN_COUNT, IMG)   # learning.py's pretraining split
    pre = torch.from_numpy(pre).permute(0, 3, 1, 2).contiguous()            # uint8 [N, 3, 64, 64]
    projector = nn.Sequential(nn.Linear(net.num_features, HID), nn.ReLU(inplace=True), nn.Linear(HID, OUT))
    params = [*net.parameters(), *projector.parameters()]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    perm = torch.randperm(len(pre), generator=torch.Generator().manual_seed(0))
    rows, t0 = [], time.perf_counter()
    net.train(), projector.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps)
        imgs = pre[perm[(step * BATCH + torch.arange(BATCH)) % len(perm)]]   # epochs wrap around
        x = torch.cat([torch.stack([VIEW(i) for i in imgs]), torch.stack([VIEW(i) for i in imgs])])
        z1, z2 = projector(net(x)).chunk(2)                     # the cls token (timm's global_pool "token")
        loss = simclr_loss(z1, z2, TEMPERATURE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            rows.append({"step": step, "loss": loss.item(), "lr": lr_at(step, steps),
                         "s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=learning.BUDGET["steps"]["adios"])
    ap.add_argument("--finetune-seeds", type=learning.finetune_seeds, default="0", metavar="S,S,...",
                    help="fine-tuning seeds")
    ap.add_argument("--no-finetune", action="store_true", help="frozen probes only")
    ap.add_argument("--init-from", type=Path, default=None, help="a learning.py run: start from its initial "
                                                                 "weights (default: timm's init)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from fastmask.eval.features import shapes_labeled_set

    torch.manual_seed(0)
    net = backbone(args.init_from)
    random_init = copy.deepcopy(net)
    data = shapes_labeled_set()
    result = {"command": " ".join(sys.argv), "meta": learning._meta(data, 1), "timm": timm.__version__,
              "init": str(args.init_from or "timm"), "random_init_weights": learning._digest(random_init),
              "recipe": {"steps": args.steps, "batch_size": BATCH, "optimizer": "sgd", "lr": LR,
                         "momentum": MOMENTUM, "weight_decay": WD, "temperature": TEMPERATURE,
                         "projector": [HID, OUT], "img_size": IMG}}
    t0 = time.perf_counter()
    result["rows"] = pretrain(net, args.steps)
    result["train_wall_s"] = time.perf_counter() - t0
    result["trained"] = learning.probe(net, IMG, data)
    result["random_init"] = learning.probe(random_init, IMG, data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_finetune:
        result["finetune"] = []
        for seed in args.finetune_seeds:
            result["finetune"].append({
                "seed": seed,
                "trained": learning.finetune_encoder(copy.deepcopy(net), IMG, data, seed),
                "random_init": learning.finetune_encoder(copy.deepcopy(random_init), IMG, data, seed)})
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
