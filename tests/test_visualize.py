"""fastmask visualize: MAE panels (de-normalized reconstruction), the method hook, the PNG's size."""
from __future__ import annotations

import json

import numpy as np
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
    assert main(["visualize", "--checkpoint", str(run), "--images", "3", "--scale", "2", "--out",
                 str(out)]) == 0
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


# ---------------------------------------------------------------- every method draws a picture

@pytest.mark.parametrize("recipe,overrides,size,columns", [
    ("mae_tiny", ["data.img_size=32"], 32, 4),                                   # original, masked, recon x2
    # + class attention, 3 masks
    ("extrema_tiny", ["data.img_size=64", "method_args.num_masks=3"], 64, 2 + 3),
    ("relaxmim_tiny", ["data.img_size=32"], 32, 4),                              # + mask, masked, similarity
    # + mask, masked, recon x2
    ("relaxmim_tiny", ["data.img_size=32", "method_args.similarity=pixel"], 32, 5),
    ("mst_tiny", ["data.img_size=32", "method_args.out_dim=64"], 32, 5),
    ("adios_tiny", [], 32, 1 + 2 * 2),                                           # per slot: mask, hidden view
])
def test_every_method_draws_a_png(recipe, overrides, size, columns, tmp_path):
    from fastmask.cli import main

    out = tmp_path / "g.png"
    argv = ["visualize", "--random-init", "--config", recipe, *sum((["--set", o] for o in overrides), []),
            "--images", "2", "--out", str(out)]
    assert main(argv) == 0
    im = Image.open(out)
    assert im.size == grid_size(2, columns, size, 1)
    assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 16  # a picture, not a blank canvas
    assert not list(tmp_path.glob("*.tmp"))


def _tiny(recipe, overrides):
    from fastmask.engine.config import load_config
    from fastmask.methods import build_method

    torch.manual_seed(0)
    return build_method(load_config(recipe, overrides)).eval()


def _visible(panel: torch.Tensor, imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, L] bool: patches of `panel` equal to the image's (the rest were greyed out)."""
    from fastmask.ops import reference

    return (reference.patchify(panel, p) == reference.patchify(imgs, p)).all(dim=-1)


def test_mst_picture_masks_the_least_attended_patches():
    from fastmask.methods.panels import _grey
    from fastmask.models.attention_probe import forward_with_cls_attention
    from fastmask.ops import reference

    mst = _tiny("mst_tiny", ["data.img_size=64", "method_args.out_dim=64", "method_args.mask_prob=0.9"])
    imgs = torch.randn(3, 3, 64, 64)
    panels = mst.visualize(imgs)
    assert list(panels) == ["original", "teacher attention", "mask", "student input", "reconstruction"]
    mask = reference.patchify(panels["mask"].expand(-1, 3, -1, -1), 16)[..., 0]   # [B, L], 1 = hidden
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    visible = _visible(panels["student input"], imgs, 16)
    assert torch.equal(visible, mask == 0)
    hidden_px = reference.patchify(panels["student input"], 16)[mask == 1].view(-1, 3)
    torch.testing.assert_close(hidden_px, _grey(imgs).view(1, 3).expand_as(hidden_px))
    # Only the lowest-attention half (mask_rho = 0.5) of the teacher's patches may be hidden.
    with torch.no_grad():
        scores = forward_with_cls_attention(mst.teacher["backbone"], imgs)[1].mean(dim=1)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    assert (ranks[mask == 1] < 8).all()
    att = reference.patchify(panels["teacher attention"].expand(-1, 3, -1, -1), 16)[..., 0]
    assert torch.equal(att.argsort(dim=1), scores.argsort(dim=1))  # the map is the teacher's attention
    assert panels["reconstruction"].shape == imgs.shape


def test_extrema_picture_disjoint_masks_and_class_attention():
    from fastmask.methods.extrema import class_attention

    ext = _tiny("extrema_tiny", ["data.img_size=64"])   # 16 patches, 80% x 5: 3 visible each
    imgs = torch.randn(2, 3, 64, 64)
    panels = ext.visualize(imgs)
    assert list(panels)[:2] == ["original", "class attention"] and len(panels) == 2 + 5
    visible = torch.stack([_visible(panels[f"visible {k}"], imgs, 16) for k in range(1, 6)])   # [M, B, L]
    assert (visible.sum(dim=-1) == 3).all() and (visible.sum(dim=0) <= 1).all()   # 3 each, disjoint
    # The attention weights reproduce the class-attention block's output (softmax(q k^T) v, projected).
    enc, blk = ext.encoder(), ext.encoder().ca_blocks[-1]
    box = {}
    handle = blk.attn.register_forward_hook(lambda m, i, o: box.update(u=i[0], out=o))
    with torch.no_grad():
        a = class_attention(enc, imgs)                                    # [B, h, L]
    handle.remove()
    u, h, d = box["u"], blk.attn.num_heads, blk.attn.head_dim
    v = blk.attn.v(u).view(2, -1, h, d).transpose(1, 2)                  # [B, h, 1+L, d]
    weights = torch.cat([1 - a.sum(-1, keepdim=True), a], dim=-1)        # the cls column is the rest
    out = blk.attn.proj((weights.unsqueeze(2) @ v).transpose(1, 2).reshape(2, 1, h * d))
    torch.testing.assert_close(out, box["out"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("similarity", ["infonce", "pixel", "rmae"])
def test_relaxmim_picture(similarity):
    from fastmask.ops import reference

    rmim = _tiny("relaxmim_tiny", ["data.img_size=32", f"method_args.similarity={similarity}"])
    imgs = torch.randn(2, 3, 32, 32)
    panels = rmim.visualize(imgs)
    mask = reference.patchify(panels["mask"].expand(-1, 3, -1, -1), 16)[..., 0]
    assert (mask.sum(dim=1) == 3).all()                                    # 4 patches, ratio 0.75
    assert torch.equal(_visible(panels["masked"], imgs, 16), mask == 0)
    if similarity != "infonce":
        assert torch.equal(_visible(panels["recon + visible"], imgs, 16), mask == 0)
        assert panels["reconstruction"].shape == imgs.shape
    else:
        sim = panels["similarity"]
        assert sim.shape == (2, 1, 32, 32) and 0 <= sim.min() and sim.max() <= 1 and sim.std() > 0
