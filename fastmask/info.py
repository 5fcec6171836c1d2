"""`python -m fastmask.info` (or `fastmask info`): which backend each op would use here, and why.

For every op and every device on this machine it prints the backends in `auto`'s order with the
reasons each declines and what decided that order (a measured figure from the committed table
benchmarks/results/auto_backends.json for this GPU's architecture, or the documented rule), then what
`auto` picks for the MAE-B/L/H encoder and decoder attention shapes (224 px, mask 0.75) in each
training dtype. Nothing is run: only the backend records are asked.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from .ops import backends

# (name, batch, heads, tokens, head_dim): MAE at 224 px, mask ratio 0.75, 512-wide 16-head decoder.
MAE_ATTENTION_SHAPES = [
    ("MAE-B/16 encoder", 256, 12, 50, 64), ("MAE-L/16 encoder", 256, 16, 50, 64),
    ("MAE-H/14 encoder", 256, 16, 65, 80), ("MAE decoder (p16)", 256, 16, 197, 32),
    ("MAE decoder (p14)", 256, 16, 257, 32),
]
OPS = ("patch_gather", "patch_embed_visible", "patch_scatter", "decoder_unshuffle", "norm_pix_loss",
       "attention", "add_layer_norm", "bias_gelu")


def _example_inputs(op: str, device: str, dtype: torch.dtype) -> dict:
    """Small meta-free example inputs: records look at device, dtype and a few sizes only."""
    t = lambda *s, dt=dtype: torch.empty(*s, device=device, dtype=dt)  # noqa: E731
    if op == "patch_gather":
        return {"imgs": t(2, 3, 32, 32), "ids_keep": t(2, 1, dt=torch.int64), "patch_size": 16}
    if op == "patch_embed_visible":
        return {"imgs": t(2, 3, 32, 32), "ids_keep": t(2, 1, dt=torch.int64), "weight": t(8, 3, 16, 16),
                "bias": t(8), "pos_embed": t(4, 8)}
    if op == "patch_scatter":
        return {"tokens": t(2, 1, 8), "ids_restore": t(2, 4, dt=torch.int64), "mask_token": t(8)}
    if op == "decoder_unshuffle":
        return {"x": t(2, 2, 8), "ids_restore": t(2, 4, dt=torch.int64), "mask_token": t(8, dt=torch.float32),
                "pos_embed": t(5, 8, dt=torch.float32)}
    if op == "norm_pix_loss":
        return {"pred": t(2, 4, 768), "imgs": t(2, 3, 32, 32), "mask": t(2, 4), "patch_size": 16,
                "norm_pix": True}
    if op == "attention":
        return {"q": t(2, 2, 50, 64), "k": t(2, 2, 50, 64), "v": t(2, 2, 50, 64), "scale": None}
    if op in ("add_layer_norm", "bias_gelu"):
        d = {"x": t(4, 64), "weight": t(64), "bias": t(64)}
        if op == "add_layer_norm":
            d["residual"] = t(4, 64)
        else:
            d.pop("weight")
        return d
    raise KeyError(op)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def report() -> dict:
    out: dict = {"python": platform.python_version(), "torch": torch.__version__,
                 "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                 "ops": {}, "attention_picks": []}
    for dev in devices():
        dt = torch.bfloat16 if dev == "cuda" else torch.float32
        for op in OPS:
            inputs = _example_inputs(op, dev, dt)
            rows = backends.explain(op, **inputs)
            picked = backends.select(op, "auto", **inputs).name
            out["ops"].setdefault(op, {})[f"{dev}/{str(dt).replace('torch.', '')}"] = {
                "auto": picked, "decided_by": backends.decided_by(op, **inputs),
                "backends": {name: reasons for name, reasons in rows}}
        for name, B, H, N, D in MAE_ATTENTION_SHAPES:
            for dt in ((torch.bfloat16, torch.float16) if dev == "cuda" else (torch.float32,)):
                q = torch.empty(1, H, N, D, device=dev, dtype=dt)  # batch does not change the choice
                rows = backends.explain("attention", q=q, k=q, v=q, scale=None)
                out["attention_picks"].append({
                    "shape": name, "device": dev, "dtype": str(dt).replace("torch.", ""),
                    "B,H,N,D": [B, H, N, D],
                    "auto": backends.select("attention", "auto", q=q, k=q, v=q, scale=None).name,
                    "declined": {n: r for n, r in rows if r}})
    return out


def format_report(rep: dict) -> str:
    lines = [f"fastmask backends — torch {rep['torch']}, GPU: {rep['cuda_device'] or 'none'}", ""]
    for op, per_dev in rep["ops"].items():
        for dev, info in per_dev.items():
            lines.append(f"{op:19s} {dev:14s} auto -> {info['auto']}   ({info['decided_by']})")
            for name, reasons in info["backends"].items():
                lines.append(f"    {name:9s} {'ok' if not reasons else 'declines: ' + '; '.join(reasons)}")
    lines += ["", "attention at MAE shapes:"]
    for row in rep["attention_picks"]:
        lines.append(f"  {row['shape']:20s} {row['device']}/{row['dtype']:8s} N={row['B,H,N,D'][2]:<4d} "
                     f"head_dim={row['B,H,N,D'][3]:<3d} auto -> {row['auto']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args: argparse.Namespace) -> int:
    rep = report()
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m fastmask.info", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
