"""fastmask.integrations.transformers: a patched Hugging Face ViTMAE against the same model unpatched
(Liger-Kernel's convergence style: same weights, same inputs and `noise`; masks, logits, loss, every
gradient, a few optimizer steps), revert, state_dict round trips, the calls that run HF's own
forward, and what is left alone. Tiny models built from ViTMAEConfig (no download).

Tolerances come from the backend records (`fastmask.ops.backends`): the loosest fp32 tolerance of
the ops the patch uses, 10x for gradients (summed through every layer and the backward).
"""
import copy
import importlib
import sys

import pytest
import torch

pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel  # noqa: E402

from fastmask.integrations.transformers import (ALL_OPS, apply_fastmask, is_patched,  # noqa: E402
                                                revert_fastmask)
from fastmask.ops import backends  # noqa: E402

L = 16  # (32 / 8) ** 2 patches


def _config(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=32, patch_size=8, decoder_hidden_size=24, decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2, decoder_intermediate_size=48, norm_pix_loss=True,
                mask_ratio=0.75)
    return ViTMAEConfig(**{**base, **kw})


def _pair(cls=ViTMAEForPreTraining, **kw):
    """(unpatched, deep copy to patch): same weights, with random biases and mask token."""
    torch.manual_seed(0)
    ref = cls(_config(**kw))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "mask_token" in n:
                p.normal_(0, 0.1)
    return ref, copy.deepcopy(ref)


def _tol(backend, ops=ALL_OPS):
    return max(backends.backends_for(op)[backend].tolerances[torch.float32][0] for op in ops)


def _data(seed=1, batch=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.rand(batch, L, generator=g)


def _assert_grads_close(a, b, tol):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("norm_pix,ops,patched", [
    (True, ALL_OPS, {"", "vit", "vit.embeddings", "decoder"}),
    (False, ALL_OPS, {"", "vit", "vit.embeddings", "decoder"}),
    (True, ("bias_gelu", "patch_scatter"), {"vit", "decoder"}),  # the rest: HF's modules / the reference
], ids=["norm_pix", "plain_pix", "two_ops"])
def test_patched_matches_unpatched_masks_logits_loss_and_every_gradient(norm_pix, ops, patched):
    ref, fused = _pair(norm_pix_loss=norm_pix)
    report = apply_fastmask(fused, ops=ops, backend="torch")
    assert {name for name, _ in report.patched} == patched
    assert not report.left_alone
    imgs, noise = _data()
    out_f, out_r = fused(imgs, noise=noise), ref(imgs, noise=noise)
    assert torch.equal(out_f.mask, out_r.mask) and torch.equal(out_f.ids_restore, out_r.ids_restore)
    tol = _tol("torch")
    torch.testing.assert_close(out_f.logits, out_r.logits, atol=tol, rtol=tol)
    torch.testing.assert_close(out_f.loss, out_r.loss, atol=tol, rtol=tol)
    out_f.loss.backward()
    out_r.loss.backward()
    _assert_grads_close(fused, ref, 10 * tol)


def test_masks_follow_the_rng_when_noise_is_not_given():
    ref, fused = _pair()
    apply_fastmask(fused, backend="torch")
    imgs, _ = _data()
    torch.manual_seed(5)
    out_r = ref(imgs)
    torch.manual_seed(5)
    out_f = fused(imgs)
    assert torch.equal(out_f.ids_restore, out_r.ids_restore) and torch.equal(out_f.mask, out_r.mask)
    assert out_f.mask.sum().item() == imgs.shape[0] * (L - int(L * 0.25))
    torch.testing.assert_close(out_f.loss, out_r.loss, atol=_tol("torch"), rtol=_tol("torch"))


def test_training_steps_follow_the_same_loss_trajectory():
    """hidden dropout > 0 and gradient checkpointing on: the chain draws HF's dropout masks in HF's order."""
    ref, fused = _pair(hidden_dropout_prob=0.1)
    for m in (ref, fused):
        getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)()
        m.train()
    apply_fastmask(fused, backend="torch")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, fused)]
    imgs, noise = _data(seed=3)
    trajectory = {"ref": [], "fused": []}
    for step in range(4):
        for name, model, opt in (("ref", ref, opts[0]), ("fused", fused, opts[1])):
            torch.manual_seed(100 + step)
            loss = model(imgs, noise=noise).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            trajectory[name].append(loss.item())
    assert trajectory["ref"][-1] < trajectory["ref"][0]  # it trains, so the comparison means something
    tol = _tol("torch")
    torch.testing.assert_close(torch.tensor(trajectory["fused"]), torch.tensor(trajectory["ref"]),
                               atol=10 * tol, rtol=10 * tol)
    for (name, pf), pr in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pf, pr, atol=100 * tol, rtol=100 * tol, msg=name)


def test_vitmae_model_alone():
    ref, fused = _pair(cls=ViTMAEModel)
    report = apply_fastmask(fused, backend="torch")
    assert {name for name, _ in report.patched} == {"", "embeddings"}
    imgs, noise = _data()
    out_f, out_r = fused(imgs, noise=noise), ref(imgs, noise=noise)
    torch.testing.assert_close(out_f.last_hidden_state, out_r.last_hidden_state, atol=_tol("torch"),
                               rtol=_tol("torch"))
    tup = fused(imgs, noise=noise, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out_f.last_hidden_state)


def test_revert_gives_back_the_original_forward_bitwise():
    ref, model = _pair()
    imgs, noise = _data()
    expected = ref(imgs, noise=noise)
    apply_fastmask(model, backend="torch")
    model(imgs, noise=noise).loss.backward()
    assert revert_fastmask(model) == 4
    assert not any(is_patched(m) or "forward" in m.__dict__ for m in model.modules())
    out = model(imgs, noise=noise)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)


def test_state_dict_round_trips_both_ways():
    ref, fused = _pair()
    apply_fastmask(fused, backend="torch")
    assert list(fused.state_dict()) == list(ref.state_dict())
    imgs, noise = _data()
    other = ViTMAEForPreTraining(_config())  # other weights
    other.load_state_dict(fused.state_dict())  # patched -> unpatched
    assert torch.equal(other(imgs, noise=noise).logits, ref(imgs, noise=noise).logits)
    patched_other = ViTMAEForPreTraining(_config())
    apply_fastmask(patched_other, backend="torch")
    patched_other.load_state_dict(ref.state_dict())  # unpatched -> patched
    assert torch.equal(patched_other(imgs, noise=noise).logits, fused(imgs, noise=noise).logits)


def test_calls_the_fused_path_cannot_serve_run_hfs_forward():
    ref, fused = _pair()
    apply_fastmask(fused, backend="torch")
    imgs, noise = _data()
    with pytest.warns(UserWarning, match="output_hidden_states requested"):
        out = fused(imgs, noise=noise, output_hidden_states=True)
    expected = ref(imgs, noise=noise, output_hidden_states=True)
    assert len(out.hidden_states) == len(expected.hidden_states) == 3  # HF's own encoder ran
    for a, b in zip(out.hidden_states, expected.hidden_states):  # after the (still fused) embeddings
        torch.testing.assert_close(a, b, atol=_tol("torch"), rtol=_tol("torch"))
    big = torch.randn(1, 3, 48, 48)
    big_noise = torch.rand(1, 36)
    with pytest.warns(UserWarning, match="interpolate_pos_encoding=True"):
        out = fused(big, noise=big_noise, interpolate_pos_encoding=True)
    torch.testing.assert_close(out.loss, ref(big, noise=big_noise, interpolate_pos_encoding=True).loss,
                               atol=_tol("torch"), rtol=_tol("torch"))


def test_other_activation_is_left_alone_and_reported():
    ref, fused = _pair(hidden_act="relu")
    with pytest.warns(UserWarning, match="keep their original forward"):
        report = apply_fastmask(fused, backend="torch")
    reasons = dict(report.left_alone)
    assert reasons["vit.layers.mlp"] == "activation ReLU is not exact GELU"
    assert "bias_gelu" not in dict(report.patched)["vit"]
    imgs, noise = _data()
    torch.testing.assert_close(fused(imgs, noise=noise).loss, ref(imgs, noise=noise).loss, atol=_tol("torch"),
                               rtol=_tol("torch"))


def test_bad_arguments_are_one_clear_error():
    _, model = _pair()
    with pytest.raises(ValueError, match=r"unknown ops \['rope'\]"):
        apply_fastmask(model, ops=("rope",))
    apply_fastmask(model)
    with pytest.raises(ValueError, match="already patched"):
        apply_fastmask(model)
    with pytest.raises(TypeError, match="no ViTMAEModel"):
        apply_fastmask(torch.nn.Linear(2, 2))


def test_import_without_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "fastmask.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install 'fastmask\[hf\]'"):
        importlib.import_module("fastmask.integrations.transformers")


@pytest.mark.skipif("cpu" not in backends.backends_for("attention")["triton"].devices
                    and not torch.cuda.is_available(), reason="no GPU and TRITON_INTERPRET is not 1")
def test_triton_backend_matches_unpatched():
    """Every op through the Triton kernels (the interpreter on the CPU) at a tiny size."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref, fused = (m.to(device) for m in _pair(num_hidden_layers=1, image_size=16, hidden_size=16,
                                              decoder_hidden_size=16))
    apply_fastmask(fused, backend="triton")
    imgs, noise = torch.randn(2, 3, 16, 16, device=device), torch.rand(2, 4, device=device)
    out_f, out_r = fused(imgs, noise=noise), ref(imgs, noise=noise)
    tol = _tol("triton")
    torch.testing.assert_close(out_f.logits, out_r.logits, atol=tol, rtol=tol)
    torch.testing.assert_close(out_f.loss, out_r.loss, atol=tol, rtol=tol)
    out_f.loss.backward()
    out_r.loss.backward()
    _assert_grads_close(fused, ref, 10 * tol)


def test_bench_integration_cli_hf(tmp_path):
    import json

    from fastmask.cli import main

    out = tmp_path / "hf.json"
    argv = ["bench", "--integration", "hf", "--model", "tiny", "--img-size", "32", "--patch-size", "16",
            "--decoder-dim", "32", "--decoder-depth", "1", "--batch-size", "2", "--warmup", "0",
            "--repeats", "1", "--out", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r["paths"]) == {"unpatched", "patched"} and r["versions"]["transformers"]
    assert "norm_pix_loss" in r["patch_report"] and r["ratios"]["speedup_patched_vs_unpatched"] > 0
    assert "1 layers as one chain" in r["patch_report"]  # the decoder arguments reached the model
