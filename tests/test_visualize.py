"""fastmask visualize: MAE panels (de-normalized reconstruction), the method hook, the PNG's size."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from fastmask.eval.visualize import HEADER, PAD, draw_grid, grid_size, mae_panels, panels_for

TINY_OVERRIDES = ["model=vit_tiny_patch16", "data.img_size=48", "method_args.decoder_embed_dim=64",
                  "method_args.decoder_depth=1", "method_args.decoder_num_heads=4"]


def _mae(overrides=()):
    from fastmask.engine.config import load_config
    from fastmask.methods import build_method

    torch.manual_seed(0)
    cfg = load_config(None, [*TINY_OVERRIDES, *overrides])
    return build_method(cfg).eval(), cfg


def test_mae_panels_reconstruction_denormalizes_per_patch():
    from fastmask.ops import reference

    method, _ = _mae()
    imgs = torch.randn(3, 3, 48, 48)
    method.mask_draws = 0
    panels = mae_panels(method, imgs)
    assert list(panels) == ["original", "masked", "reconstruction", "recon + visible"]
    assert all(p.shape == imgs.shape for p in panels.values())
    # Redo by hand: same mask draw, prediction mapped back with each true patch's mean and std.
    method.mask_draws = 0
    masks = method.draw_masks(3, imgs.device)
    with torch.no_grad():
        pred = method.forward_decoder(method.forward_encoder(imgs, masks.ids_keep), masks.ids_restore)
    t = reference.patchify(imgs, 16)
    expect = pred * (t.var(-1, keepdim=True) + 1e-6).sqrt() + t.mean(-1, keepdim=True)
    torch.testing.assert_close(reference.patchify(panels["reconstruction"], 16), expect)
    # Visible patches are the original's, in the masked and the pasted panels; hidden ones differ.
    vis = masks.mask == 0
    for name in ("masked", "recon + visible"):
        torch.testing.assert_close(reference.patchify(panels[name], 16)[vis], t[vis])
    assert not torch.allclose(reference.patchify(panels["masked"], 16)[~vis], t[~vis])
    torch.testing.assert_close(reference.patchify(panels["recon + visible"], 16)[~vis], expect[~vis])


def test_draw_grid_size_and_content(tmp_path):
    imgs = torch.randn(2, 3, 20, 20)
    maps = torch.rand(2, 1, 20, 20)
    path = draw_grid({"a": imgs, "mask": maps, "b": imgs}, tmp_path / "g.png", scale=3)
    w, h = grid_size(2, 3, 20, 3)
    assert (w, h) == (PAD + 3 * (60 + PAD), HEADER + PAD + 2 * (60 + PAD))
    im = Image.open(path)
    assert im.size == (w, h) and im.mode == "RGB"
    # The map column is grey levels (R = G = B) of the map, nearest-upscaled.
    px = im.getpixel((PAD + (60 + PAD) + 1, HEADER + PAD + 1))
    assert px[0] == px[1] == px[2] == int(maps[0, 0, 0, 0] * 255 + 0.5)
    with pytest.raises(ValueError, match="differ"):
        draw_grid({"a": imgs, "b": imgs[:1]}, tmp_path / "x.png")


def test_method_visualize_hook_is_drawn_as_returned():
    class Occluder(torch.nn.Module):
        def visualize(self, imgs):
            return {"input": imgs, "learned mask": (imgs[:, :1] > 0).float()}

    panels = panels_for(Occluder(), torch.randn(2, 3, 16, 16))
    assert list(panels) == ["input", "learned mask"]
    with pytest.raises(TypeError, match="no visualize"):
        panels_for(torch.nn.Linear(2, 2), torch.randn(1, 3, 16, 16))


def test_visualize_cli_writes_png_of_expected_size(tmp_path):
    from fastmask.cli import main
    from fastmask.engine.config import to_dict

    method, cfg = _mae()
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": method.state_dict()}, run / "model.pt")
    (run / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg)))))
    out = tmp_path / "grid.png"
    assert main(["visualize", "--checkpoint", str(run), "--images", "3", "--scale", "2", "--out", str(out)]) == 0
    im = Image.open(out)
    assert im.size == grid_size(3, 4, 48, 2)
    # Real pictures: the original column is not flat.
    import numpy as np

    crop = np.asarray(im.crop((PAD, HEADER + PAD, PAD + 96, HEADER + PAD + 96)).convert("L"))
    assert int(crop.max()) - int(crop.min()) > 50
    # --random-init needs no checkpoint.
    out2 = tmp_path / "r.png"
    argv = ["visualize", "--random-init", *sum((["--set", o] for o in TINY_OVERRIDES), []), "--images", "2",
            "--out", str(out2)]
    assert main(argv) == 0
    assert Image.open(out2).size == grid_size(2, 4, 48, 1)
