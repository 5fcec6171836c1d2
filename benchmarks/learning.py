"""Does each method learn? Pretrain on the unlabelled shapes, probe on held-out labelled shapes,
against the same encoder at its random initialization.

    python benchmarks/learning.py --out benchmarks/results/learning-cpu.json              # all five methods
    python benchmarks/learning.py --methods mae,extrema --out ...                          # some (resumable)
    python benchmarks/learning.py --methods mst --steps 300 --work /tmp/learn --out ...    # a shorter budget
    python benchmarks/learning.py --methods extrema --img-size 96 --work /tmp/l96 --out ... # more tokens
    python benchmarks/learning.py --methods extrema --tag m996 --set method_args.momentum=0.996 --out ...
    python benchmarks/learning.py --methods none --set-baselines --out ...                 # the set itself
    python benchmarks/learning.py --methods none --supervised-vit fastmask --out ...       # the label ceiling
    python benchmarks/learning.py --methods mae --steps 4000 --finetune --out ...          # + fine-tuning
    python benchmarks/learning.py --methods mae --steps 4000 --finetune --finetune-seeds 1,2 --out ...

For each method: `fastmask pretrain --config <method>_tiny` (the method's tiny recipe) on
`data.dataset=shapes` (the unlabelled split of `fastmask.data.shapes`, 20,000 images) with the
budget below and a ViT-Tiny/16 at 64 px for every method, then k-NN (k = 20, T = 0.07) and a linear
probe (`fastmask.eval`) on the labelled shapes (5,000 train / 2,000 test, disjoint from the
pretraining split) for the trained encoder (`method.encoder()`, the teacher where the method
evaluates it) and for the same method built from the same seed without training (the engine seeds
the same way, so it is the run's own starting point). Both pools of `forward_features`: the cls
token and the mean of the patch tokens. Also recorded: the loss at the start and end, wall time,
images/s, the first and last rows of the run's metrics log (with the method's own metrics: MST's
teacher_entropy, ADIOS's mask areas, ...), the per-dimension std of the L2-normalized features (a
collapsed encoder gives ~0), and `colour_knn`: k-NN on a nuisance label, the background's hue
(`background_hue`), which tells an encoder that learned colour (up from random init) from one that
learned to ignore it (down).

`--set-baselines` measures the set itself into the JSON's "set" entry: k-NN and linear probe on raw
pixels and on a random-init ViT-Tiny/16 (these must be low), and a small supervised CNN trained
from scratch on the labelled pretraining split for SUPERVISED["steps"] steps (must be high: the
labels are learnable from the pixels). `--supervised-vit fastmask|timm` measures the label ceiling at
this budget: MODEL itself trained with labels for SUPERVISED_VIT["steps"] (about MAE's budget), probed
along the way; a self-supervised run of N steps is not expected to beat the supervised one at N steps.
With `timm`, timm's ViT-Tiny/16 in the same loop (is ours a slow learner?). `--finetune` adds the
evaluation the MIM papers lead with: each trained encoder and its random init fine-tuned end to end in
that loop (FINETUNE: a fresh linear head on the mean pool, FINETUNE["steps"] steps), held-out accuracy
and k-NN of the fine-tuned encoder along the way: does pretraining give a better starting point?
`--finetune-seeds` replicates it with other seeds (head init, batches, augmentation: the same start
weights), so that a gain can be read against the spread of the fine-tuning itself.

Budget (one home: BUDGET below): steps x batch x img size, batch and size the same for every
method, steps chosen so each method takes about ten minutes on a quiet 2-core CPU. Runs live in
`--work/<method>` and resume from their checkpoints; a finished run is only evaluated again. The
JSON (`--out`) is rewritten after each method and keeps the entries of methods not run this time, so
methods can be run one at a time, and whatever else the file holds (a run's entry keeps what was added
to it while its trained weights stay the same). An ablation, `--tag T --set KEY=VALUE ...`
(config overrides on top of the budget's, recorded in the result's `overrides`), runs in
`--work/<method>-T` and is stored under that key, beside the method's own result.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

METHODS = ("mae", "extrema", "relaxmim", "mst", "adios")
# Steps per method for about ten minutes each on a quiet 2-core CPU, at one batch size and image size
# for all; warmup is 5% of the steps. Measured (one thread, two runs sharing the 2 cores): MAE 1652 s,
# ExtreMA 897 s, RelaxMIM 629 s, MST 1721 s, ADIOS 1589 s: an MST or ADIOS step costs 5-6x an MAE step.
BUDGET = {"batch_size": 64, "img_size": 64,
          "steps": {"mae": 2000, "extrema": 600, "relaxmim": 800, "mst": 400, "adios": 300}}
MODEL = "vit_tiny_patch16"
# Per-method overrides on top of the tiny recipe, each with its reason (none yet).
OVERRIDES: dict[str, list[str]] = {m: [] for m in METHODS}
PROBE = {"k": 20, "temperature": 0.07, "linear_epochs": 50, "linear_lr": 1e-3}
SUPERVISED = {"steps": 1500, "batch_size": 64, "lr": 3e-3, "train_images": 5000}
# The label ceiling (supervised_vit): MODEL itself, with labels, over the pretraining runs' batch and about
# MAE's step count; probed along the way so each method's budget can be read against it.
SUPERVISED_VIT = {"steps": 1500, "batch_size": 64, "lr": 3e-4, "train_images": 5000,
                  "probe_at": [250, 500, 1000, 1500]}
# --finetune: SUPERVISED_VIT's loop from a pretrained encoder and from its random init, on the mean pool
# (MAE's fine-tuning pool; a method's cls token may not be trained by its loss), a third of its steps.
FINETUNE = {"steps": 500, "batch_size": 64, "lr": 3e-4, "train_images": 5000, "probe_at": [250, 500],
            "pool": "mean"}


def run_overrides(method: str, steps: int, img_size: int | None = None,
                  extra: list[str] = ()) -> list[str]:
    """The budget's config overrides for `method`, then OVERRIDES[method], then `extra` (--set: last wins)."""
    return [f"model={MODEL}", "data.root=null", "data.dataset=shapes",
            f"data.img_size={img_size or BUDGET['img_size']}",
            f"data.batch_size={BUDGET['batch_size']}", f"engine.warmup_steps={max(1, steps // 20)}",
            "engine.log_every=25", f"engine.checkpoint_every={max(50, steps // 8)}", "engine.keep_last=1",
            *OVERRIDES[method], *extra]


def finished_steps(run: Path) -> int:
    from fastmask.engine.checkpoint import latest_tag, read_state

    tag = latest_tag(run)
    return int(read_state(run, tag)["step"]) if tag else 0


def pretrain(method: str, run: Path, steps: int, threads: int, img_size: int | None = None,
             extra: list[str] = ()) -> float:
    """Train (or resume) in a child process; -> wall seconds spent now (0 when already done)."""
    if finished_steps(run) >= steps:
        return 0.0
    cmd = [sys.executable, "-m", "fastmask.cli", "pretrain", "--config", f"{method}_tiny", "--steps",
           str(steps), "--out", str(run), *run_overrides(method, steps, img_size, extra)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("[learning] " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def _std(f: torch.Tensor) -> float:
    return F.normalize(f.float(), dim=1).std(dim=0).mean().item()


def background_hue(imgs, bins: int = 8) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> int64 [N]: the hue of the mean colour of the 2-pixel border, in `bins` bins.
    A nuisance label: the background is drawn independently of the shape, so an encoder that scores
    higher on it than its random init learned colour, one that scores lower learned to ignore it."""
    x = torch.as_tensor(imgs).float() / 255
    border = torch.cat([x[:, :2].flatten(1, 2), x[:, -2:].flatten(1, 2), x[:, :, :2].flatten(1, 2),
                        x[:, :, -2:].flatten(1, 2)], 1).mean(1)  # [N, 3]
    r, g, b = border.unbind(1)
    hue = torch.atan2(3 ** 0.5 * (g - b), 2 * r - g - b) / (2 * torch.pi) % 1.0  # hexagonal hue, in [0, 1)
    return (hue * bins).long().clamp_max(bins - 1)


def probe(encoder, img_size: int, data) -> dict:
    """Frozen encoder -> {pool: {"knn", "linear", "std", "colour_knn"}} on the labelled shapes
    (colour_knn: k-NN on `background_hue`, the nuisance, chance 1/8)."""
    from fastmask.eval.features import extract_features, to_model_input

    ftr = extract_features(encoder, to_model_input(data[0], img_size), ("cls", "mean"))
    fte = extract_features(encoder, to_model_input(data[2], img_size), ("cls", "mean"))
    ctr, cte = background_hue(data[0]), background_hue(data[2])
    return {pool: {**_scores(a, b, data), "std": _std(b),
                   "colour_knn": _knn(a, ctr, b, cte, 8)}
            for pool, a, b in zip(("cls", "mean"), ftr, fte)}


def _knn(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor, classes: int) -> float:
    """k-NN accuracy with PROBE's k and temperature."""
    from fastmask.eval.knn import knn_accuracy

    return knn_accuracy(ftr, ytr, fte, yte, PROBE["k"], PROBE["temperature"], classes)


def _scores(ftr: torch.Tensor, fte: torch.Tensor, data) -> dict:
    from fastmask.eval.linear import ProbeArgs, linear_probe_accuracy

    ytr, yte, C = torch.as_tensor(data[1]), torch.as_tensor(data[3]), len(data[4])
    return {"knn": _knn(ftr, ytr, fte, yte, C),
            "linear": linear_probe_accuracy(ftr, ytr, fte, yte, C, ProbeArgs(epochs=PROBE["linear_epochs"],
                                                                                lr=PROBE["linear_lr"]))}


def supervised_cnn(data, img_size: int) -> dict:
    """A small CNN (4 conv-BN-ReLU-pool stages, 16-64 channels, global max pool) trained from scratch
    with labels on the pretraining split's first images -> test accuracy: are the labels learnable?"""
    from torch import nn

    from fastmask.data import shapes
    from fastmask.eval.features import to_model_input

    def stage(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    imgs, labels = shapes.shapes_set("pretrain", SUPERVISED["train_images"], shapes.DEFAULT_SIZE)
    x, y = to_model_input(imgs, img_size), torch.as_tensor(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(stage(3, 16), stage(16, 32), stage(32, 64), stage(64, 64),
                            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, len(shapes.CLASSES)))
    opt = torch.optim.AdamW(net.parameters(), lr=SUPERVISED["lr"], weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, SUPERVISED["lr"], total_steps=SUPERVISED["steps"])
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(SUPERVISED["steps"]):
        idx = torch.randint(0, len(y), (SUPERVISED["batch_size"],), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(b).argmax(1) for b in to_model_input(data[2], img_size).split(256)])
    return {**SUPERVISED, "test_accuracy": (pred == torch.as_tensor(data[3])).float().mean().item(),
            "train_s": time.perf_counter() - t0}


def supervised_vit(data, img_size: int, timm_model: bool = False) -> dict:
    """The label ceiling at this budget: the same ViT-Tiny/16 trained from scratch *with labels*
    (`train_with_labels` on the cls token). What a self-supervised run of the same steps can be expected
    to reach is below this: labels are the strongest signal there is. `timm_model`: timm's ViT-Tiny/16
    (its own init) in the same loop instead, to tell a slow learner of ours from the architecture's pace."""
    from fastmask.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if timm_model:
            import timm

            vit = timm.create_model("vit_tiny_patch16_224", img_size=img_size, num_classes=0,
                                    global_pool="token")
        else:
            vit = create_model(MODEL, img_size=img_size)
        head = torch.nn.Linear(vit.embed_dim, len(data[4]))
    return {**SUPERVISED_VIT, "probes": train_with_labels(vit, head, data, img_size, SUPERVISED_VIT, "cls")}


def finetune(run: Path | None, cfg, data, cache: dict | None = None, seed: int = 0) -> dict:
    """End-to-end fine-tuning from the encoder of `run` (None: the run's own random init), the MIM papers'
    headline evaluation: `finetune_encoder` on it.
    `cache`: figures by the starting weights' digest, so that methods whose random inits are the same
    weights (same model, size and seed) share one random-init fine-tuning within a run of this script."""
    from fastmask.eval.load import load_encoder

    encoder, _ = load_encoder(run, cfg=cfg)
    key = f"{_digest(encoder)}-{seed}" if cache is not None else None
    if key in (cache or {}):
        return cache[key]
    out = finetune_encoder(encoder, cfg.data.img_size, data, seed)
    if cache is not None:
        cache[key] = out
    return out


def finetune_encoder(encoder, img_size: int, data, seed: int = 0, pool: str | None = None,
                     settings: dict | None = None) -> dict:
    """`settings`' steps (None: FINETUNE) of `train_with_labels` on `encoder` (trained in place) and a
    fresh linear head, on `pool` (None: the settings'). `seed`: the head's init, the batches and the
    augmentation draws (a replicate: the same start weights)."""
    if not hasattr(encoder, "forward_features"):
        raise TypeError(f"fine-tuning needs a ViT encoder (forward_features), got {type(encoder).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(encoder.embed_dim, len(data[4]))
    base = settings or FINETUNE
    settings = {**base, "seed": seed, "pool": pool or base["pool"]}
    probes = train_with_labels(encoder, head, data, img_size, settings, settings["pool"])
    return {**settings, "probes": probes}


def _digest(module: torch.nn.Module) -> str:
    """sha256 over the module's state (names, shapes, values): equal digests, equal weights."""
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_with_labels(vit, head, data, img_size: int, cfg: dict, pool: str) -> list[dict]:
    """Train `vit` and `head` end to end with labels: cross-entropy on the `pool`ed tokens of
    `forward_features` ("cls" or "mean"), AdamW (weight decay 0.05), cosine lr with 5% warmup, the
    pretraining runs' crop + flip, on the pretraining split's first cfg["train_images"] images with their
    labels; at each step in cfg["probe_at"] -> the head's held-out accuracy and the pool's k-NN."""
    import math

    from fastmask.data import shapes
    from fastmask.eval.features import extract_features, pool_tokens, to_model_input
    from fastmask.methods.views import ViewAugment

    imgs, labels = shapes.shapes_set("pretrain", cfg["train_images"], shapes.DEFAULT_SIZE)
    x, y = to_model_input(imgs, img_size), torch.as_tensor(labels)
    xtr, xte = to_model_input(data[0], img_size), to_model_input(data[2], img_size)
    ytr, yte = torch.as_tensor(data[1]), torch.as_tensor(data[3])
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=cfg["lr"], weight_decay=0.05)
    aug = ViewAugment(crop_scale=(0.2, 1.0), jitter_p=0.0, gray_p=0.0)  # the torch loader's crop + flip
    g = torch.Generator().manual_seed(cfg.get("seed", 0))
    steps, warmup = cfg["steps"], max(1, cfg["steps"] // 20)
    probes, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        lr = cfg["lr"] * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(y), (cfg["batch_size"],), generator=g)
        vit.train()
        tokens = vit.forward_features(aug(x[idx], g))
        loss = F.cross_entropy(head(pool_tokens(tokens, pool)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in cfg["probe_at"]:
            ftr, fte = extract_features(vit, xtr, pool), extract_features(vit, xte, pool)
            with torch.no_grad():
                acc = (head(fte).argmax(1) == yte).float().mean().item()
            probes.append({"step": step, "test_accuracy": acc, "train_s": time.perf_counter() - t0,
                           f"knn_{pool}": _knn(ftr, ytr, fte, yte, len(data[4]))})
            print(f"[learning] with labels ({pool}) step {step}: {probes[-1]}", flush=True)
    return probes


def set_baselines(data, img_size: int) -> dict:
    """Raw pixels and a random-init ViT-Tiny (k-NN, linear; both pools) and the supervised CNN."""
    from fastmask.eval.features import extract_features, to_model_input
    from fastmask.models import create_model

    xtr, xte = to_model_input(data[0], img_size), to_model_input(data[2], img_size)
    out = {"raw_pixels": _scores(xtr.flatten(1), xte.flatten(1), data)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = create_model(MODEL, img_size=img_size)
    ftr, fte = extract_features(vit, xtr, ("cls", "mean")), extract_features(vit, xte, ("cls", "mean"))
    out["random_vit_tiny"] = {pool: _scores(a, b, data) for pool, a, b in zip(("cls", "mean"), ftr, fte)}
    out["raw_pixels"]["colour_knn"] = _knn(xtr.flatten(1), background_hue(data[0]), xte.flatten(1),
                                           background_hue(data[2]), 8)
    out["supervised_cnn"] = supervised_cnn(data, img_size)
    out["chance"] = 1.0 / len(data[4])
    return out


def evaluate(method: str, run: Path, steps: int, data, extra: list[str] = ()) -> dict:
    from fastmask.eval.load import load_encoder, resolve_config

    cfg = resolve_config(run)
    trained, _ = load_encoder(run, cfg=cfg)
    untrained, _ = load_encoder(None, cfg=cfg)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    size = cfg.data.img_size
    trained_probe, random_probe = probe(trained, size, data), probe(untrained, size, data)
    return {"recipe": f"{method}_tiny", "overrides": run_overrides(method, steps, cfg.data.img_size, extra),
            "masking": cfg.masking,
            "steps": metrics[-1]["step"], "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"],
            "imgs_per_s": sum(r["imgs_per_s"] for r in metrics[1:]) / max(1, len(metrics) - 1),
            "log_first": metrics[0], "log_last": metrics[-1],  # the method's own metrics are among them
            "weights": _digest(trained),  # a rerun of the same recipe need not give the same weights
            "trained": trained_probe, "random_init": random_probe,
            "knn_gain_cls": trained_probe["cls"]["knn"] - random_probe["cls"]["knn"],
            "knn_gain_mean": trained_probe["mean"]["knn"] - random_probe["mean"]["knn"]}


def _same_weights(earlier: dict, r: dict) -> bool:
    """Whether the file's entry `earlier` was evaluated from the weights `r` was: by their digest, or in
    entries written before it was recorded, by steps, overrides, last loss and probe figures all equal
    (steps and overrides alone do not say it: a rerun of a pretraining need not reproduce its weights)."""
    if "weights" in earlier:
        return earlier["weights"] == r["weights"]
    return all(earlier.get(k) == r[k] for k in ("steps", "overrides", "loss_last", "trained"))


def _cpu() -> dict:
    """This CPU and the vector code path torch's kernels take on it. Training is reproducible bit for bit
    on one machine, not across CPUs: another kernel path rounds differently and the runs drift apart."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return {"model": name or platform.processor(), "capability": torch.backends.cpu.get_cpu_capability()}


def _meta(data, threads: int) -> dict:
    import fastmask
    from fastmask.data import shapes

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = ""
    return {"device": "cpu", "threads": threads, "torch": torch.__version__, "fastmask": fastmask.__version__,
            "git": sha, "python": sys.version.split()[0], "platform": platform.platform(), "cpu": _cpu(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "budget": BUDGET, "model": MODEL, "probe": PROBE,
            "data": {"pretrain": f"shapes pretrain split, {shapes.PRETRAIN_COUNT} images at "
                                 f"{shapes.DEFAULT_SIZE} px",
                     "train": len(data[1]), "test": len(data[3]), "classes": len(data[4]),
                     "version": shapes.VERSION}}


def finetune_seeds(text: str) -> list[int]:
    """--finetune-seeds: "2,0,1" -> [0, 1, 2]; argparse.ArgumentTypeError unless one or more integers >= 0."""
    try:
        seeds = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError("wants one or more seeds >= 0")
    return seeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of " + ",".join(METHODS) + ", or none")
    ap.add_argument("--set-baselines", action="store_true", help="also measure the set itself (see above)")
    ap.add_argument("--supervised-vit", choices=("fastmask", "timm"), default=None,
                    help="also measure the label ceiling (supervised_vit) with fastmask's or timm's ViT-Tiny")
    ap.add_argument("--work", type=Path, default=Path("runs/learning"), help="run folders go here")
    ap.add_argument("--out", type=Path, required=True, help="results JSON (updated in place, per method)")
    ap.add_argument("--steps", type=int, default=None,
                    help="override the budget's steps (every method run now)")
    ap.add_argument("--img-size", type=int, default=None,
                    help="override the budget's image size (the 64 px shapes are resized to it: more tokens)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every method run now (an ablation), repeatable; "
                         "recorded in each result's overrides")
    ap.add_argument("--tag", default="",
                    help="with --set: results key and run folder <method>-<tag>, beside the method's own")
    # One thread by default: on a shared 2-core machine (load ~6) MAE's engine step took 8.2 s with two
    # spinning OpenMP threads and 1.3 s with one. On a quiet machine, --threads 2 is faster.
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    ap.add_argument("--finetune", action="store_true",
                    help="also fine-tune each trained encoder and its random init with labels (FINETUNE)")
    ap.add_argument("--finetune-seeds", type=finetune_seeds, default="0", metavar="S,S,...",
                    help="with --finetune: seeds of the fine-tuning (head init, batches, augmentation); "
                         "seed 0 goes to each result's finetune, others to finetune_replicates (kept)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "none"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not (methods or args.set_baselines or args.supervised_vit):
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.extra and not args.tag:
        ap.error("--set needs --tag: an ablation must not overwrite the method's own result or run folder")
    from fastmask.engine.config import ConfigError, load_config

    for method in methods:  # a bad --set (no "=", an unknown key, a bad value) fails here, before any run
        try:
            load_config(f"{method}_tiny", run_overrides(method, args.steps or BUDGET["steps"][method],
                                                        args.img_size, args.extra))
        except ConfigError as err:
            ap.error(f"--set for {method}: {err}")
    torch.set_num_threads(args.threads)

    from fastmask.eval.features import shapes_labeled_set

    data = shapes_labeled_set()
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results, set_figures = old.get("results", {}), old.get("set")

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        meta = {**old.get("meta", {}), **_meta(data, args.threads)}  # keeps notes added to earlier runs
        # keys this script does not write (a checkpoint probe, a note) are kept, not dropped
        tmp.write_text(json.dumps({**old, "meta": meta, "set": set_figures, "results": results},
                                  indent=2) + "\n")
        os.replace(tmp, args.out)

    if args.set_baselines:
        set_figures = set_baselines(data, BUDGET["img_size"])
        print("[learning] set: " + json.dumps(set_figures), flush=True)
        write()
    if args.supervised_vit:
        key = "supervised_vit_tiny" + ("_timm" if args.supervised_vit == "timm" else "")
        set_figures = {**(set_figures or {}), key: supervised_vit(data, BUDGET["img_size"],
                                                                  args.supervised_vit == "timm")}
        write()
    random_finetunes: dict[str, dict] = {}  # finetune's cache: one random-init fine-tuning per distinct init
    for method in methods:
        key = f"{method}-{args.tag}" if args.tag else method
        run = args.work / key
        steps = args.steps or BUDGET["steps"][method]
        wall = pretrain(method, run, steps, args.threads, args.img_size, args.extra)
        r = evaluate(method, run, steps, data, args.extra)
        earlier = results.get(key, {})
        if _same_weights(earlier, r):
            r = {**earlier, **r}  # the same weights: keep what was added to them (fine-tunings, notes)
        r["train_wall_s"] = wall or r.get("train_wall_s")  # an earlier wall time only for the same weights
        if args.finetune:
            from fastmask.eval.load import resolve_config

            cfg = resolve_config(run)
            for seed in args.finetune_seeds:
                pair = {"trained": finetune(run, cfg, data, seed=seed),
                        "random_init": finetune(None, cfg, data, random_finetunes, seed=seed)}
                if seed == 0:
                    r["finetune"] = pair
                else:
                    reps = {e["seed"]: e for e in r.get("finetune_replicates", [])}
                    reps[seed] = {"seed": seed, **pair}
                    r["finetune_replicates"] = [reps[s] for s in sorted(reps)]
                results[key] = r
                write()  # a fine-tuning pair is minutes: keep each one
        results[key] = r
        print(f"[learning] {key:9s} loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}  "
              f"k-NN cls {r['trained']['cls']['knn']:.3f} (random {r['random_init']['cls']['knn']:.3f})  "
              f"mean {r['trained']['mean']['knn']:.3f} (random {r['random_init']['mean']['knn']:.3f})  "
              f"linear cls {r['trained']['cls']['linear']:.3f} "
              f"(random {r['random_init']['cls']['linear']:.3f})",
              flush=True)
        write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
