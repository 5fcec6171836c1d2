"""The engine with the real MAE method: exact resume, encoder export to timm, official-checkpoint import."""
import pytest
import torch

from fastmask.engine import checkpoint as ckpt
from fastmask.engine.config import load_config
from fastmask.engine.export import (consolidated_state_dict, encoder_state_dict, export_encoder,
                                    load_pretrained)
from fastmask.engine.trainer import pretrain
from fastmask.methods import build_method

timm = pytest.importorskip("timm")


def _cfg(*extra):
    return load_config("mae_tiny", ["data.img_size=32", "data.batch_size=8", "data.num_workers=0",
                                    "engine.steps=6", "engine.log_every=1", "engine.warmup_steps=2", *extra])


@pytest.fixture(scope="module")
def mae_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mae")
    full = pretrain(_cfg("engine.zero_stage=1"), out=root / "full", progress=False)
    half = pretrain(_cfg("engine.zero_stage=1", "engine.stop_at=3"), out=root / "split", progress=False)
    rest = pretrain(_cfg("engine.zero_stage=1"), out=root / "split", progress=False)
    return root, full, half, rest


def test_mae_stop_and_resume_equals_uninterrupted(mae_runs):
    _, full, half, rest = mae_runs
    assert rest.resumed_from == 3 and len(full.losses) == 6
    assert half.losses + rest.losses == full.losses  # exact: fp32 on CPU, masks and RNG restored
    assert len({loss for _, loss in full.losses}) == 6


def test_export_encoder_from_a_run_loads_into_timm(mae_runs, tmp_path):
    root = mae_runs[0]
    path = export_encoder(root / "full", tmp_path / "encoder.pth")
    state = torch.load(path, weights_only=True)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, global_pool="token",
                              img_size=32)
    model.load_state_dict(state, strict=True)
    # The same features as the trained method's encoder (fp32 master weights of the ZeRO-1 run).
    method = build_method(load_config(str(root / "full" / "config.yaml")))
    method.load_state_dict(consolidated_state_dict(root / "full"), strict=False)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), method.encoder().forward_features(x),
                                   rtol=1e-5, atol=1e-5)
    trained = consolidated_state_dict(root / "full")["blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(state["blocks.0.attn.qkv.weight"], trained, rtol=0, atol=0)
    assert not torch.equal(trained, build_method(load_config(str(root / "full" / "config.yaml")))
                           .state_dict()["blocks.0.attn.qkv.weight"])


def test_vit_base_encoder_export_gives_timm_the_same_features():
    torch.manual_seed(0)
    method = build_method(load_config("mae_vit_base_patch16"))
    state = encoder_state_dict(method)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="token")
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), method.encoder().forward_features(x),
                                   rtol=1e-4, atol=1e-4)


def test_init_from_an_official_mae_checkpoint(tmp_path):
    torch.manual_seed(1)
    src = build_method(_cfg())
    official = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    torch.save({"model": official, "epoch": 799}, tmp_path / "mae_pretrain.pth")
    torch.manual_seed(2)
    dst = build_method(_cfg())
    load_pretrained(dst, tmp_path / "mae_pretrain.pth")
    for k, v in official.items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)
    bad = dict(official)
    bad["blocks.0.attn.qkv.weight_renamed"] = bad.pop("blocks.0.attn.qkv.weight")
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        load_pretrained(dst, tmp_path / "bad.pth")
    # Through the engine: the run starts from those weights (step 1's loss is the loaded model's).
    run = pretrain(_cfg("engine.steps=1", f"engine.init_from={tmp_path / 'mae_pretrain.pth'}"), out=None,
                   progress=False)
    again = pretrain(_cfg("engine.steps=1", f"engine.init_from={tmp_path / 'mae_pretrain.pth'}"), out=None,
                     progress=False)
    fresh = pretrain(_cfg("engine.steps=1"), out=None, progress=False)  # same seed and masks, own init
    assert run.losses == again.losses and run.losses != fresh.losses
