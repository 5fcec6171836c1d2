"""An independent plain-PyTorch BYOL (timm's ViT-Tiny/16, written from the BYOL paper's recipe) on
fastmask's shapes, to tell a bug in fastmask's ExtreMA/BYOL from the objective at this scale.

    python benchmarks/independent_byol.py --out /tmp/byol        # 600 steps: 18 min, one thread, busy 2 cores
    python benchmarks/independent_byol.py --steps 1800 --out /tmp/byol1800   # probed at 600, 1200, 1800
    STEPS=3 python benchmarks/independent_byol.py --out /tmp/x   # smoke test (schedules stay --steps long)

Nothing from fastmask but `fastmask.data.shapes` for the images: its own views (torchvision: random
resized crop 0.2-1 at 64 px, flip, colour jitter 0.4/0.4/0.2/0.1 p 0.8, grey 0.2, blur p 1.0 / 0.1,
solarize p 0 / 0.2, BYOL's asymmetric pair), projector and predictor (BYOL's Linear-BatchNorm-ReLU-Linear,
hidden 1024, out 256), the symmetric loss 2 - 2 cos(q, sg(z')), the EMA target (0.99 -> 1 cosine, its
BatchNorm in training mode) and schedules (AdamW lr 1e-3 at batch 64, warm-up over 1/20 of the steps,
cosine to 0, weight decay 0.05 off biases and norms), at benchmarks/learning.py's batch and ExtreMA's step
budget (`--steps`, default 600). Logs the loss every 25 steps to OUT.jsonl, then k-NN (k 20, T 0.07, its
own) of the target encoder's cls token and mean patch token on the labelled shapes, at its random
initialization and every 600 steps, into OUT_result.json. Not fastmask's ExtreMA: no masking, no
class-attention pooling, timm's ViT and init.
"""
import argparse
import copy
import json
import math
import os
import time

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2 as T

from fastmask.data import shapes

torch.set_num_threads(1)

_ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_ap.add_argument("--out", default="independent_byol", help="prefix of OUT.jsonl and OUT_result.json")
_ap.add_argument("--steps", type=int, default=600, help="total steps (schedules are defined over them)")
_args = _ap.parse_args()
TOTAL_STEPS = _args.steps                  # schedules are always defined over the full run
RUN_STEPS = int(os.environ.get("STEPS", TOTAL_STEPS))
PREFIX = _args.out
PROBE_EVERY = 600                          # ExtreMA's BYOL-on-its-parts runs were probed at 600 and 1800
BATCH, LR, WARMUP, WD = 64, 1e-3, max(1, TOTAL_STEPS // 20), 0.05
M0 = 0.99
HID, OUT = 1024, 256
LOG_EVERY = 25
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def lr_at(step):
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (TOTAL_STEPS - WARMUP)))


def momentum_at(step):  # BYOL: 1 - (1 - m0) (cos(pi k / K) + 1) / 2
    return 1 - (1 - M0) * (math.cos(math.pi * step / TOTAL_STEPS) + 1) / 2


def mlp(in_dim):
    """BYOL's projector and predictor: Linear-BatchNorm-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, HID), nn.BatchNorm1d(HID), nn.ReLU(inplace=True),
                         nn.Linear(HID, OUT))


class Online(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0)
        self.projector = mlp(self.backbone.num_features)

    def forward(self, x):
        return self.projector(self.backbone(x))                 # the cls token (timm's global_pool "token")


def view(blur_p, solarize_p):
    return T.Compose([
        T.RandomResizedCrop(64, scale=(0.2, 1.0), antialias=True), T.RandomHorizontalFlip(0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=7, sigma=(0.1, 2.0))], p=blur_p),
        T.RandomSolarize(128, p=solarize_p),
        T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


VIEW1, VIEW2 = view(1.0, 0.0), view(0.1, 0.2)


def regression(q, z):
    return (2 - 2 * F.cosine_similarity(q, z.detach(), dim=-1)).mean()


@torch.no_grad()
def pooled(backbone, imgs_u8, bs=250):
    """-> {"cls", "mean"}: L2-normalized cls token and mean patch token, [N, D] each."""
    backbone.eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    cls, avg = [], []
    for i in range(0, len(imgs_u8), bs):
        x = torch.from_numpy(imgs_u8[i:i + bs]).permute(0, 3, 1, 2).float() / 255
        tokens = backbone.forward_features((x - mean) / std)   # [b, 1 + L, D] after the final norm
        cls.append(tokens[:, 0])
        avg.append(tokens[:, 1:].mean(1))
    backbone.train()
    return {"cls": F.normalize(torch.cat(cls), dim=-1), "mean": F.normalize(torch.cat(avg), dim=-1)}


def knn_scores(backbone, train, test, k=20, temp=0.07, ncls=10):
    ftr, fte = pooled(backbone, train[0]), pooled(backbone, test[0])
    ytr, yte = torch.from_numpy(train[1]).long(), torch.from_numpy(test[1]).long()
    out = {}
    for pool in ("cls", "mean"):
        sims, idx = (fte[pool] @ ftr[pool].t()).topk(k, dim=1)
        votes = torch.zeros(len(yte), ncls).scatter_add_(1, ytr[idx], (sims / temp).exp())
        out[pool] = (votes.argmax(1) == yte).float().mean().item()
    return out


def main():
    torch.manual_seed(0)
    pre, _ = shapes.shapes_set("pretrain", 20000, 64)
    train, test = shapes.shapes_set("train", 5000, 64), shapes.shapes_set("test", 2000, 64)
    pre_t = torch.from_numpy(pre).permute(0, 3, 1, 2).contiguous()          # uint8 [N, 3, 64, 64]

    online = Online()
    predictor = mlp(OUT)
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    random_knn = knn_scores(target.backbone, train, test)
    print(f"random-init target k-NN (cls / mean): {random_knn}", flush=True)

    params = [p for m in (online, predictor) for p in m.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": WD},
                             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999))
    perm = torch.randperm(len(pre_t), generator=torch.Generator().manual_seed(0))
    log_path = PREFIX + ".jsonl"
    if os.path.exists(log_path):
        os.remove(log_path)
    rows, probes, t_last, last = [], {}, time.time(), -1
    online.train(), predictor.train(), target.train()   # BYOL's target normalizes with batch statistics
    for step in range(RUN_STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        imgs = pre_t[perm[(step * BATCH + torch.arange(BATCH)) % len(perm)]]   # epochs wrap around
        x1 = torch.stack([VIEW1(x) for x in imgs])
        x2 = torch.stack([VIEW2(x) for x in imgs])
        q = predictor(online(torch.cat([x1, x2])))
        with torch.no_grad():
            z = target(torch.cat([x2, x1]))                          # each view's target is the other view
        loss = regression(q, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m = momentum_at(step + 1)
        with torch.no_grad():
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)
            for bo, bt in zip(online.buffers(), target.buffers()):  # BatchNorm's running statistics
                bt.copy_(bo)
        if step % LOG_EVERY == 0 or step == RUN_STEPS - 1:
            now = time.time()
            with torch.no_grad():
                spread = F.normalize(z.float(), dim=-1).std(dim=0).mean().item()
            row = {"step": step, "loss": loss.item(), "target_std": spread, "lr": lr_at(step), "momentum": m,
                   "sec_per_step": (now - t_last) / (step - last)}
            t_last, last = now, step
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if (step + 1) % PROBE_EVERY == 0 and step + 1 < RUN_STEPS:
            t_probe = time.time()
            probes[str(step + 1)] = knn_scores(target.backbone, train, test)
            t_last += time.time() - t_probe                        # sec_per_step counts training only
            print(f"step {step + 1} target k-NN: {probes[str(step + 1)]}", flush=True)

    trained_knn = knn_scores(target.backbone, train, test)
    print(f"random-init target k-NN: {random_knn}  trained target k-NN: {trained_knn}", flush=True)
    res = {"random_knn": random_knn, "trained_knn": trained_knn, "steps": RUN_STEPS,
           "total_steps": TOTAL_STEPS,
           "knn_at": {**probes, str(RUN_STEPS): trained_knn}, "rows": rows,
           "torch": torch.__version__, "timm": timm.__version__}
    with open(PREFIX + "_result.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
