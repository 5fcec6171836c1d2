"""An independent plain-PyTorch DINO (timm's ViT-Tiny/16, written from the DINO paper's recipe) on
fastmask's shapes, to tell a bug in fastmask's MST/DINO from the recipe at this scale.

    python benchmarks/independent_dino.py --out /tmp/dino        # 300 steps, ~20 min on one CPU thread
    STEPS=3 python benchmarks/independent_dino.py --out /tmp/x   # smoke test (schedules stay 300-step)

Nothing from fastmask but `fastmask.data.shapes` for the images: its own head, multi-crop and DINO
augmentations (torchvision), loss, centre, EMA teacher and schedules, set to mst_tiny's DINO part at
benchmarks/learning.py's budget (batch 64, lr 5e-4 with 15 warm-up steps, weight decay 0.04 -> 0.4,
clip 3.0, momentum 0.99 -> 1, out_dim 1024, tau_s 0.1, tau_t 0.04, 2 global 64 px + 2 local 32 px
crops). Logs the loss and the teacher's entropy at tau_t (as MST's `teacher_entropy`) every 25 steps
to OUT.jsonl, then k-NN (k 20, T 0.07, its own) of the teacher's cls token on the labelled shapes,
trained and at its random initialization, into OUT_result.json. Not fastmask's MST: no masking, no
decoder, no frozen last layer, no teacher-temperature warm-up, timm's ViT and initialization.
"""
import copy
import json
import math
import os
import sys
import time

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2 as T

from fastmask.data import shapes

torch.set_num_threads(1)

TOTAL_STEPS = 300                     # schedules are always defined over the full 300-step run
RUN_STEPS = int(os.environ.get("STEPS", TOTAL_STEPS))
PREFIX = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "independent_dino"
BATCH = 64
BASE_LR, WARMUP = 5e-4, 15
WD0, WD1 = 0.04, 0.4
M0, M1 = 0.99, 1.0
CLIP = 3.0
OUT_DIM, HID, BOT = 1024, 512, 64
T_STUDENT, T_TEACHER, CENTER_M = 0.1, 0.04, 0.9
LOG_EVERY = 25
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------- schedules
def cosine(base, final, n, warmup=0, start_warmup=0.0):
    """DINO's cosine_scheduler, per iteration: linear warm-up then half-cosine base -> final."""
    w = np.linspace(start_warmup, base, warmup) if warmup > 0 else np.array([])
    it = np.arange(n - warmup)
    s = final + 0.5 * (base - final) * (1 + np.cos(np.pi * it / len(it)))
    return np.concatenate([w, s])


LR = cosine(BASE_LR, 0.0, TOTAL_STEPS, WARMUP)
WD = cosine(WD0, WD1, TOTAL_STEPS)
MOM = cosine(M0, M1, TOTAL_STEPS)


# --------------------------------------------------------------------------------------------- model
class DINOHead(nn.Module):
    def __init__(self, in_dim=192, hid=HID, bot=BOT, out=OUT_DIM):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hid), nn.GELU(), nn.Linear(hid, hid), nn.GELU(),
                                 nn.Linear(hid, bot))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight-normalised last layer with g fixed to 1 (norm_last_layer=True): W = V / ||V||_row
        lin = nn.Linear(bot, out, bias=False)  # default init for V, like DINO (weight_norm of nn.Linear)
        self.last_v = nn.Parameter(lin.weight.detach().clone())

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        w = self.last_v / self.last_v.norm(dim=1, keepdim=True)
        return x @ w.t()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0,
                                          dynamic_img_size=True)
        self.head = DINOHead(self.backbone.num_features)

    def forward(self, crops):
        """crops: list of tensors; like DINO's MultiCropWrapper, run the backbone once per resolution."""
        feats, i = [], 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape[-1] == crops[i].shape[-1]:
                j += 1
            feats.append(self.backbone(torch.cat(crops[i:j])))
            i = j
        return self.head(torch.cat(feats))


# -------------------------------------------------------------------------------------- augmentation
def blur(p):
    return T.RandomApply([T.GaussianBlur(kernel_size=7, sigma=(0.1, 2.0))], p=p)


flip_color = T.Compose([
    T.RandomHorizontalFlip(0.5),
    T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
    T.RandomGrayscale(0.2),
])
normalize = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
g1_tf = T.Compose([T.RandomResizedCrop(64, scale=(0.4, 1.0), antialias=True), flip_color, blur(1.0),
                   normalize])
g2_tf = T.Compose([T.RandomResizedCrop(64, scale=(0.4, 1.0), antialias=True), flip_color, blur(0.1),
                   T.RandomSolarize(128, p=0.2), normalize])
loc_tf = T.Compose([T.RandomResizedCrop(32, scale=(0.05, 0.4), antialias=True), flip_color, blur(0.5),
                    normalize])


def make_views(imgs_u8):
    """imgs_u8: uint8 [B,3,64,64] tensor -> [g1, g2, l1, l2] float batches."""
    g1 = torch.stack([g1_tf(x) for x in imgs_u8])
    g2 = torch.stack([g2_tf(x) for x in imgs_u8])
    l1 = torch.stack([loc_tf(x) for x in imgs_u8])
    l2 = torch.stack([loc_tf(x) for x in imgs_u8])
    return [g1, g2, l1, l2]


# ---------------------------------------------------------------------------------------------- k-NN
@torch.no_grad()
def features(backbone, imgs_u8, bs=250):
    backbone.eval()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(imgs_u8), bs):
        x = torch.from_numpy(imgs_u8[i:i + bs]).permute(0, 3, 1, 2).float() / 255
        out.append(backbone((x - mean) / std))
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def knn(backbone, train, test, k=20, temp=0.07, ncls=10):
    ftr, fte = features(backbone, train[0]), features(backbone, test[0])
    ytr, yte = torch.from_numpy(train[1]).long(), torch.from_numpy(test[1]).long()
    sims, idx = (fte @ ftr.t()).topk(k, dim=1)
    w = (sims / temp).exp()
    votes = torch.zeros(len(fte), ncls).scatter_add_(1, ytr[idx], w)
    return (votes.argmax(1) == yte).float().mean().item()


# ---------------------------------------------------------------------------------------------- main
def main():
    torch.manual_seed(0)
    np.random.seed(0)
    pre, _ = shapes.shapes_set("pretrain", 20000, 64)
    train = shapes.shapes_set("train", 5000, 64)
    test = shapes.shapes_set("test", 2000, 64)
    print("data", type(pre), pre.dtype, pre.shape, train[0].shape, train[1].dtype, test[0].shape,
          np.bincount(test[1]), flush=True)
    pre_t = torch.from_numpy(pre).permute(0, 3, 1, 2).contiguous()  # uint8 [N,3,64,64]

    student = Net()
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # sanity: both crop sizes accepted
        student.eval()
        print("feat shapes", student.backbone(torch.zeros(2, 3, 64, 64)).shape,
              student.backbone(torch.zeros(2, 3, 32, 32)).shape, flush=True)
    student.train()
    teacher.train()  # no dropout/BN in the ViT or head, so train/eval mode is identical for the forward

    random_knn = knn(teacher.backbone, train, test)
    print(f"random-init teacher k-NN: {random_knn:.4f}", flush=True)
    teacher.train()

    decay, no_decay = [], []
    for n, p in student.named_parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "wd": True},
                             {"params": no_decay, "wd": False, "weight_decay": 0.0}],
                            lr=BASE_LR, betas=(0.9, 0.999))
    center = torch.zeros(1, OUT_DIM)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(pre_t), generator=gen)
    assert RUN_STEPS * BATCH <= len(perm)

    log_path = PREFIX + ".jsonl"
    if RUN_STEPS == TOTAL_STEPS and os.path.exists(log_path):
        os.remove(log_path)
    rows, t_last, steps_since = [], time.time(), 0
    for step in range(RUN_STEPS):
        for g in opt.param_groups:
            g["lr"] = LR[step]
            if g["wd"]:
                g["weight_decay"] = WD[step]
        imgs = pre_t[perm[step * BATCH:(step + 1) * BATCH]]
        views = make_views(imgs)

        with torch.no_grad():
            t_out = teacher(views[:2])                      # [2B, OUT]
        s_out = student(views)                              # [4B, OUT]
        t_probs = F.softmax((t_out - center) / T_TEACHER, dim=-1).chunk(2)
        s_logp = F.log_softmax(s_out / T_STUDENT, dim=-1).chunk(4)
        loss, nterms = 0.0, 0
        for i, q in enumerate(t_probs):
            for j, lp in enumerate(s_logp):
                if j == i:
                    continue
                loss = loss + (-q * lp).sum(-1).mean()
                nterms += 1
        loss = loss / nterms
        with torch.no_grad():
            t_ent = torch.stack([(-q * q.clamp_min(1e-30).log()).sum(-1).mean() for q in t_probs]).mean()

        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
        opt.step()
        with torch.no_grad():
            m = MOM[step]
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            center.mul_(CENTER_M).add_(t_out.mean(0, keepdim=True), alpha=1 - CENTER_M)
        steps_since += 1

        if step % LOG_EVERY == 0 or step == RUN_STEPS - 1:
            now = time.time()
            row = {"step": step, "loss": loss.item(), "teacher_entropy": t_ent.item(),
                   "kl": loss.item() - t_ent.item(), "sec_per_step": (now - t_last) / steps_since,
                   "lr": float(LR[step]), "wd": float(WD[step]), "momentum": float(m),
                   "grad_norm": gnorm.item()}
            t_last, steps_since = now, 0
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    trained_knn = knn(teacher.backbone, train, test)
    print(f"random-init teacher k-NN: {random_knn:.4f}  trained teacher k-NN: {trained_knn:.4f}", flush=True)
    res = {"random_knn": random_knn, "trained_knn": trained_knn, "steps": RUN_STEPS,
           "rows": rows, "max_entropy": math.log(OUT_DIM)}
    with open(PREFIX + "_result.json", "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
