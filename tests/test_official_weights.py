"""The released official MAE files: the encoder-only pretraining weights (`mae_pretrain_vit_base.pth`:
{"model": encoder keys only}) load into the encoder (engine.init_from, eval, then export) with the
fresh part named; a full checkpoint (encoder + decoder) keeps loading strictly.

The files are built here from the official key layout, written out by hand (facebookresearch/mae
`models_vit.VisionTransformer`, timm names), not from fastmask's own state dict."""
from __future__ import annotations

import pytest
import torch

TINY = ["model=vit_tiny_patch16", "data.img_size=32", "method_args.decoder_embed_dim=64",
        "method_args.decoder_depth=1", "method_args.decoder_num_heads=4"]
D, DEPTH, GRID = 192, 12, 2   # ViT-Tiny/16 at 32 px: 2 x 2 patches


def official_encoder_state(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + GRID * GRID, D),
              "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,),
              "norm.weight": (D,), "norm.bias": (D,)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,),
                       b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                       b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                       b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                       b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


@pytest.fixture
def encoder_file(tmp_path):
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": official_encoder_state()}, path)
    return path


def _method(recipe: str | None = None, overrides=TINY, seed: int = 0):
    from fastmask.engine.config import load_config
    from fastmask.methods import build_method

    torch.manual_seed(seed)
    return build_method(load_config(recipe, list(overrides)))


def test_encoder_only_file_initializes_every_encoder_and_names_the_fresh_part(encoder_file):
    from fastmask.engine.export import load_pretrained
    from fastmask.models import create_model

    state = official_encoder_state()
    assert set(state) == set(create_model("vit_tiny_patch16", img_size=32).state_dict())  # official names
    mae = _method()
    decoder_before = {k: v.clone() for k, v in mae.state_dict().items()
                      if k not in state and torch.is_tensor(v)}
    lines: list[str] = []
    fresh = load_pretrained(mae, encoder_file, log=lines.append)
    after = mae.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    for k, v in decoder_before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    assert sorted(fresh) == sorted(decoder_before)
    assert any(k.startswith("decoder_blocks.") for k in fresh) and "mask_token" in fresh
    assert len(lines) == 1 and "initialized fresh" in lines[0] and "decoder_blocks" in lines[0]
    # A student-teacher method: both copies of the encoder get the weights.
    mst = _method("mst_tiny", ["data.img_size=32", "method_args.out_dim=64"])
    fresh = load_pretrained(mst, encoder_file, log=lambda _: None)
    for copy in ("student", "teacher"):
        got = mst.state_dict()
        for k, v in state.items():
            torch.testing.assert_close(got[f"{copy}.backbone.{k}"], v, rtol=0, atol=0)
    assert any(k.startswith("decoder.") for k in fresh) and not any(".backbone." in k for k in fresh)


def test_full_official_checkpoint_loads_strictly(tmp_path):
    from fastmask.engine.export import load_pretrained

    source = _method(seed=1)
    full = source.official_state_dict()
    torch.save({"model": full}, tmp_path / "full.pth")
    target = _method(seed=2)
    assert load_pretrained(target, tmp_path / "full.pth") == []
    for k, v in full.items():
        torch.testing.assert_close(target.state_dict()[k], v, rtol=0, atol=0)
    # A full checkpoint with one decoder tensor missing is not taken for an encoder-only file.
    del full["decoder_pred.bias"]
    torch.save({"model": full}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="decoder_pred.bias"):
        load_pretrained(_method(), tmp_path / "broken.pth")


def test_pretrain_from_official_encoder_then_export_and_eval(encoder_file, tmp_path, capsys):
    """engine.init_from with the encoder-only file: one step at lr 0, so the exported encoder is
    exactly the file's; `fastmask eval` reads the same file with a recipe."""
    from fastmask.cli import main
    from fastmask.engine.config import load_config
    from fastmask.eval.load import load_encoder

    run, exported = tmp_path / "run", tmp_path / "encoder.pth"
    argv = ["pretrain", "--out", str(run), "--steps", "1", f"engine.init_from={encoder_file}", "engine.lr=0",
            "data.batch_size=4", "--export", str(exported), *TINY]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert "encoder-only weights loaded" in out and "initialized fresh: " in out and "decoder_blocks" in out
    state, got = official_encoder_state(), torch.load(exported, weights_only=True)
    assert set(got) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    encoder, _ = load_encoder(encoder_file, cfg=load_config(None, TINY))  # what `fastmask eval` does
    for k, v in state.items():
        torch.testing.assert_close(encoder.state_dict()[k], v, rtol=0, atol=0)
