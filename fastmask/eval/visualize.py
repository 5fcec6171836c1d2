"""`fastmask visualize`: a PNG grid of what a method sees and produces, one row per image.

    fastmask visualize --checkpoint runs/mae_b --out grid.png                # 4 embedded photos
    fastmask visualize --random-init --config mae_tiny --images 6 --out grid.png

Columns come from the method:
- a method with `visualize(imgs [B, C, H, W]) -> dict[str, Tensor]` draws whatever it returns
  (ADIOS: its learned masks; MST: the teacher's attention, the attention-guided mask and the global
  decoder's reconstruction; ExtreMA: the class-attention map and each of its disjoint masks;
  RelaxMIM: its mask and the reconstruction or the per-position similarity), in the dict's order: 3-channel
  tensors are ImageNet-normalized images [B, 3, H, W]; 1-channel tensors [B, 1, H, W] (or [B, H, W])
  are maps in [0, 1] (masks: 1 = hidden), drawn in grey levels;
- an MAE-style method (`draw_masks`, `forward_encoder`, `forward_decoder`) gets `mae_panels`:
  original / masked / reconstruction / "recon + visible" (the visible patches pasted back).
  The decoder predicts normalized pixels; each predicted patch is mapped back with the mean and
  variance of the true patch (as the MAE demo notebook does), then unpatchified.

Grid size (pixels): width = pad + columns * (S * scale + pad), height = HEADER + pad + rows * (S *
scale + pad), S = the model's img_size; `grid_size()` computes it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .features import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from .load import add_source_arguments

HEADER = 16
PAD = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n".join(__doc__.splitlines()[2:])
    add_source_arguments(parser, "run folder, checkpoint folder or weights file of a whole method",
                         "an untrained method (to see the layout)")
    parser.add_argument("--data", default=None,
                        help="image folder (class subfolders); default: embedded photos")
    parser.add_argument("--images", type=int, default=4, help="rows in the grid")
    parser.add_argument("--scale", type=int, default=1, help="integer upscaling of every image")
    parser.add_argument("--seed", type=int, default=0, help="which images and masks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, help="PNG to write")


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized [B, 3, H, W] -> [B, 3, H, W] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() * std + mean).clamp(0, 1)


@torch.no_grad()
def mae_panels(method: torch.nn.Module, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
    """imgs [B, C, H, W] normalized -> {name: [B, C, H, W] normalized} for an MAE-style method."""
    from fastmask.methods.panels import reconstruction_panels

    masks = method.draw_masks(imgs.shape[0], imgs.device)
    pred = method.forward_decoder(method.forward_encoder(imgs, masks.ids_keep), masks.ids_restore)
    norm_pix = getattr(getattr(method, "objective", None), "norm_pix", True)
    return {"original": imgs, **reconstruction_panels(imgs, masks.mask, pred, method.patch_size, norm_pix)}


def panels_for(method: torch.nn.Module, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
    if callable(getattr(method, "visualize", None)):
        with torch.no_grad():
            return dict(method.visualize(imgs))
    if all(hasattr(method, a) for a in ("draw_masks", "forward_encoder", "forward_decoder")):
        return mae_panels(method, imgs)
    raise TypeError(f"method {type(method).__name__} has no visualize(imgs) and is not MAE-style "
                    f"(draw_masks/forward_encoder/forward_decoder); nothing to draw")


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    """One panel ([B, 3, H, W] normalized images, or [B, 1, H, W] / [B, H, W] maps in [0, 1])
    -> uint8 [B, H, W, 3]."""
    t = t.detach().float().cpu()
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"panels must be [B, 3, H, W] images or [B, 1, H, W] maps, got {tuple(t.shape)}")
    t = denormalize(t) if t.shape[1] == 3 else t.clamp(0, 1).expand(-1, 3, -1, -1)
    return (t.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def grid_size(rows: int, cols: int, img_size: int, scale: int = 1) -> tuple[int, int]:
    """-> (width, height) of the PNG `draw_grid` writes."""
    cell = img_size * scale + PAD
    return PAD + cols * cell, HEADER + PAD + rows * cell


def draw_grid(panels: dict[str, torch.Tensor], path: str | Path, scale: int = 1) -> Path:
    """Write panels (all with the same B, H, W) as a PNG: one column per panel, titles on top."""
    from PIL import Image, ImageDraw

    arrays = {name: _to_uint8(t) for name, t in panels.items()}
    shapes = {a.shape[:3] for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"panels differ in [B, H, W]: { {n: a.shape[:3] for n, a in arrays.items()} }")
    B, H, W = shapes.pop()
    if H != W:
        raise ValueError(f"panels must be square, got {H}x{W}")
    cols = len(arrays)
    width, height = grid_size(B, cols, H, scale)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    cell = H * scale + PAD
    for c, (name, a) in enumerate(arrays.items()):
        x0 = PAD + c * cell
        draw.text((x0, 2), name[: max(1, (cell - 2) // 6)], fill=(0, 0, 0))
        for r in range(B):
            im = Image.fromarray(a[r])
            if scale != 1:
                im = im.resize((W * scale, H * scale), Image.NEAREST)
            canvas.paste(im, (x0, HEADER + PAD + r * cell))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def sample_images(count: int, img_size: int, data: str | None = None, seed: int = 0) -> torch.Tensor:
    """-> float32 [count, 3, img_size, img_size] ImageNet-normalized: embedded photos or images of --data."""
    if data is None:
        from fastmask.data.embedded import embedded_images

        pool = embedded_images()
    else:
        from .features import image_folder_set

        pool = image_folder_set(data, size=max(img_size, 32))[0]
    if count < 1:
        raise ValueError(f"images must be >= 1, got {count}")
    idx = np.random.default_rng(seed).choice(len(pool), size=min(count, len(pool)), replace=False)
    return to_model_input(pool[np.sort(idx)], img_size)


def _reseed(method: torch.nn.Module, seed: int) -> None:
    """The same masks (and views) for the same --seed: every draw stream (`methods._stream.DrawStream`)
    restarts at (seed, draw 0)."""
    from fastmask.methods._stream import DrawStream

    for module in method.modules():
        for stream in (getattr(module, "stream", None), getattr(module, "_stream", None)):
            if isinstance(stream, DrawStream):
                stream.load({"seed": int(seed), "draws": 0})


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument that can be checked without a model, in one ValueError."""
    from fastmask.paths import check_output_file

    problems = []
    if args.images < 1 or args.scale < 1:
        problems.append(f"--images and --scale must be >= 1, got {args.images}, {args.scale}")
    if args.data is not None and not Path(args.data).is_dir():
        problems.append(f"--data {args.data} is not a folder")
    if problems:
        raise ValueError("; ".join(problems))
    check_output_file(args.out, "--out")


def main(args: argparse.Namespace) -> int:
    from .load import load_method, pick_device, resolve_config

    check_arguments(args)
    device = pick_device(args.device)
    cfg = resolve_config(None if args.random_init else args.checkpoint, args.config, args.overrides)
    method, cfg = load_method(None if args.random_init else args.checkpoint, cfg=cfg, device=device)
    _reseed(method, args.seed)
    torch.manual_seed(args.seed)
    imgs = sample_images(args.images, cfg.data.img_size, args.data, args.seed).to(device)
    panels = panels_for(method, imgs)
    path = draw_grid(panels, args.out, args.scale)
    w, h = grid_size(imgs.shape[0], len(panels), cfg.data.img_size, args.scale)
    print(f"[visualize] wrote {path} ({w}x{h}: {imgs.shape[0]} images x {', '.join(panels)})")
    return 0
