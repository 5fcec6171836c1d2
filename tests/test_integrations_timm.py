"""fastmask.integrations.timm: a patched timm ViT against the same ViT unpatched (Liger-Kernel's
convergence style: same weights, same inputs; outputs, loss, every gradient, a few optimizer steps),
revert, state_dict round trips, what is left alone, and the visible-only MAE encoder helper.

Tolerances come from the backend records (`fastmask.ops.backends`): the loosest fp32 tolerance of
the ops the patch uses, 10x for gradients (summed through every block and the backward).
"""
import copy
import importlib
import sys
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from fastmask.integrations.timm import (ALL_OPS, apply_fastmask, forward_visible, is_patched,  # noqa: E402
                                        revert_fastmask)
from fastmask.ops import backends  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, **kw})
    with torch.no_grad():  # timm zero-inits biases; random ones exercise the fused bias paths
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _pair(**kw):
    """(unpatched, patched copy with the same weights)."""
    ref = _vit(**kw)
    return ref, copy.deepcopy(ref)


def _tol(backend, ops=ALL_OPS):
    return max(backends.backends_for(op)[backend].tolerances[torch.float32][0] for op in ops)


def _loss(model, imgs, labels):
    return nn.functional.cross_entropy(model(imgs), labels)


def _assert_grads_close(a, b, tol):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, atol=tol, rtol=tol, msg=name)


def _data(seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g)


@pytest.mark.parametrize("kw", [{}, dict(qk_norm=True, init_values=0.5)], ids=["plain", "qknorm_layerscale"])
def test_patched_matches_unpatched_outputs_loss_and_every_gradient(kw):
    ref, fused = _pair(**kw)
    report = apply_fastmask(fused, backend="torch")
    assert not report.left_alone
    assert {what.split(" ->")[0] for _, what in report.patched} >= {"attention", "fc1 bias + GELU"}
    assert any("one chain" in what for _, what in report.patched)
    imgs, labels = _data()
    tol = _tol("torch")
    torch.testing.assert_close(fused.forward_features(imgs), ref.forward_features(imgs), atol=tol, rtol=tol)
    loss_f, loss_r = _loss(fused, imgs, labels), _loss(ref, imgs, labels)
    torch.testing.assert_close(loss_f, loss_r, atol=tol, rtol=tol)
    loss_f.backward()
    loss_r.backward()
    _assert_grads_close(fused, ref, 10 * tol)


def test_training_steps_follow_the_same_loss_trajectory():
    """drop_path > 0 in training: the chain draws its random masks in timm's order, so seeded runs match."""
    ref, fused = _pair(drop_path_rate=0.2)
    apply_fastmask(fused, backend="torch")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, fused)]
    tol = _tol("torch")
    trajectory = {"ref": [], "fused": []}
    imgs, labels = _data(seed=10)  # one batch, fitted step after step
    for step in range(4):
        for name, model, opt in (("ref", ref, opts[0]), ("fused", fused, opts[1])):
            torch.manual_seed(100 + step)
            loss = _loss(model, imgs, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            trajectory[name].append(loss.item())
    assert trajectory["ref"][-1] < trajectory["ref"][0]  # it trains, so the comparison means something
    torch.testing.assert_close(torch.tensor(trajectory["fused"]), torch.tensor(trajectory["ref"]),
                               atol=10 * tol, rtol=10 * tol)
    for (name, pf), pr in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pf, pr, atol=100 * tol, rtol=100 * tol, msg=name)


def test_revert_gives_back_the_original_forward_bitwise():
    ref, model = _pair()
    imgs, _ = _data()
    expected = ref(imgs)
    apply_fastmask(model, backend="torch")
    assert sum(is_patched(m) for m in model.modules()) == 7  # 2 x (Attention, Mlp, Block) + the blocks chain
    model(imgs).sum().backward()
    assert revert_fastmask(model) == 7
    assert not any(is_patched(m) or "forward" in m.__dict__ for m in model.modules())
    assert torch.equal(model(imgs), expected)
    assert revert_fastmask(model) == 0


def test_state_dict_round_trips_both_ways():
    ref, fused = _pair()
    apply_fastmask(fused, backend="torch")
    assert list(fused.state_dict()) == list(ref.state_dict())
    imgs, _ = _data()
    other = _vit(seed=7)  # different weights
    other.load_state_dict(fused.state_dict())  # patched -> unpatched
    assert torch.equal(other(imgs), ref(imgs))
    patched_other = _vit(seed=8)
    apply_fastmask(patched_other, backend="torch")
    patched_other.load_state_dict(ref.state_dict())  # unpatched -> patched
    assert torch.equal(patched_other(imgs), fused(imgs))
    for clone in (copy.deepcopy(fused), _save_load(fused)):  # whole-model copies stay patched and correct
        assert is_patched(clone.blocks) and clone.blocks.forward.args[0] is clone.blocks
        assert torch.equal(clone(imgs), fused(imgs))


def _save_load(model):
    import io

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_unsupported_parts_are_left_alone_and_reported():
    from timm.layers import RmsNorm

    ref, model = _pair(act_layer=nn.ReLU, norm_layer=RmsNorm)
    with pytest.warns(UserWarning, match="keep their original forward"):
        report = apply_fastmask(model, backend="torch")
    reasons = dict(report.left_alone)
    assert "activation ReLU is not exact GELU" in reasons["blocks.0.mlp"]
    assert "not a LayerNorm" in reasons["blocks.1"]
    assert not any(is_patched(m) for m in (model.blocks, model.blocks[0], model.blocks[1].mlp))
    assert is_patched(model.blocks[0].attn)
    imgs, _ = _data()
    torch.testing.assert_close(model(imgs), ref(imgs), atol=_tol("torch"), rtol=_tol("torch"))


def test_attention_dropout_in_training_runs_timms_attention():
    ref, model = _pair(attn_drop_rate=0.3)
    report = apply_fastmask(model, ops=("attention",), backend="torch")
    assert any("attention dropout" in f for f in report.fallbacks)
    ref.train(), model.train()
    imgs, _ = _data()
    torch.manual_seed(3)
    expected = ref(imgs)
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="attention dropout > 0 in training"):
        got = model(imgs)
    assert torch.equal(got, expected)  # timm's own forward ran, with the same dropout draws
    ref.eval(), model.eval()
    torch.testing.assert_close(model(imgs), ref(imgs), atol=_tol("torch"), rtol=_tol("torch"))


def test_forward_visible_is_the_official_mae_encoder():
    ref, fused = _pair()
    apply_fastmask(fused, backend="torch")
    imgs, _ = _data()
    B, L, K = imgs.shape[0], 16, 5
    ids_keep = torch.rand(B, L, generator=torch.Generator().manual_seed(4)).argsort(dim=1)[:, :K]
    # official MAE forward_encoder on the unpatched timm modules: embed, add pos, gather, cls, blocks, norm
    x = ref.patch_embed(imgs) + ref.pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = torch.cat([(ref.cls_token + ref.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
    expected = ref.norm(ref.blocks(x))
    got = forward_visible(fused, imgs, ids_keep, backend="torch")
    assert got.shape == (B, 1 + K, TINY["embed_dim"])
    tol = _tol("torch", ALL_OPS + ("patch_embed_visible",))
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    g = torch.randn_like(got)
    (got * g).sum().backward()
    (expected * g).sum().backward()
    _assert_grads_close(fused, ref, 10 * tol)
    with pytest.raises(ValueError, match="imgs must be"):
        forward_visible(fused, imgs[:, :, :16], ids_keep)


def test_bad_arguments_are_one_clear_error():
    model = _vit()
    with pytest.raises(ValueError, match=r"unknown ops \['rope'\].*unknown backend 'fast'"):
        apply_fastmask(model, ops=("attention", "rope"), backend="fast")
    assert not any(is_patched(m) for m in model.modules())
    apply_fastmask(model)
    with pytest.raises(ValueError, match="already patched"):
        apply_fastmask(model)
    with pytest.raises(TypeError, match="no timm Attention, Mlp or Block"):
        apply_fastmask(nn.Sequential(nn.Linear(2, 2)))


def test_import_without_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    monkeypatch.delitem(sys.modules, "fastmask.integrations.timm")
    with pytest.raises(ImportError, match=r"pip install 'fastmask\[timm\]'"):
        importlib.import_module("fastmask.integrations.timm")


@pytest.mark.skipif("cpu" not in backends.backends_for("attention")["triton"].devices
                    and not torch.cuda.is_available(), reason="no GPU and TRITON_INTERPRET is not 1")
def test_triton_backend_matches_unpatched():
    """Every op through the Triton kernels (the interpreter on the CPU) at a tiny size."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref, fused = (m.to(device) for m in _pair(img_size=16, embed_dim=32, depth=1, num_heads=2))
    apply_fastmask(fused, backend="triton")
    imgs = torch.randn(2, 3, 16, 16, device=device)
    out_f, out_r = fused(imgs), ref(imgs)
    tol = _tol("triton")
    torch.testing.assert_close(out_f, out_r, atol=tol, rtol=tol)
    g = torch.randn_like(out_f)
    (out_f * g).sum().backward()
    (out_r * g).sum().backward()
    _assert_grads_close(fused, ref, 10 * tol)


def test_auto_on_the_cpu_keeps_timms_own_code_where_only_the_reference_would_run():
    """On the CPU `auto` resolves add_layer_norm and bias_gelu to the reference, so the patched Blocks and
    Mlps run timm's own forwards, and attention lands on SDPA as timm's does: the same bits."""
    ref, model = _pair()
    apply_fastmask(model)
    imgs, _ = _data()
    assert torch.equal(model(imgs), ref(imgs))


def test_bench_integration_cli_times_both_paths(tmp_path, capsys):
    import json

    from fastmask.cli import main

    out = tmp_path / "timm.json"
    argv = ["bench", "--integration", "timm", "--model", "tiny", "--img-size", "32", "--patch-size", "16",
            "--batch-size", "2", "--warmup", "0", "--repeats", "2", "--out", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    paths = r["paths"]
    assert set(paths) == {"unpatched", "patched"} and all(len(p["step_s_times"]) == 2 for p in paths.values())
    assert r["ratios"]["speedup_patched_vs_unpatched"] == pytest.approx(
        paths["unpatched"]["step_s_median"] / paths["patched"]["step_s_median"])
    assert "blocks as one chain" in r["patch_report"] and r["versions"]["timm"]
    assert r["shapes"]["patches"] == 4 and r["device"]["type"] == "cpu"
    capsys.readouterr()
    assert main(["bench", "--integration", "timm", "--model", "gigantic"]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert "model must be one of" in err and "Traceback" not in err
