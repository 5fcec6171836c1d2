"""fastmask bench: FLOP counts against hand counts and torch's own counter, the official and strong
baselines' numerics and steps, the engine step against `pretrain()`, the timing/memory helpers, and the
CLI end to end at a tiny size on the CPU."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastmask.bench import flops as F
from fastmask.bench.baseline_official import (Block, OfficialMAE, make_official_step, official_lr,
                                              sincos_pos_embed_2d)
from fastmask.bench.timing import saved_activation_bytes, time_calls, time_interleaved
from fastmask.ops import reference

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=3,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, mlp_ratio=4.0)


def test_block_flops_hand_count_vit_b():
    # One ViT-B block on MAE's visible tokens: N = 1 + 49 = 50 tokens, D = 768, MLP 4D = 3072.
    N, D, H = 50, 768, 3072
    qkv = 2 * N * D * (3 * D)        # 176,947,200
    qk = 2 * N * N * D               #   3,840,000  (12 heads x 2*50*50*64)
    pv = 2 * N * N * D               #   3,840,000
    proj = 2 * N * D * D             #  58,982,400
    fc1 = 2 * N * D * H              # 235,929,600
    fc2 = 2 * N * H * D              # 235,929,600
    hand = qkv + qk + pv + proj + fc1 + fc2
    assert hand == 715_468_800
    assert F.block_flops(N, D, 4.0) == hand
    assert F.block_attention_flops(N, D) == qk + pv


@pytest.mark.parametrize("tokens,dim,heads", [(17, 64, 4), (50, 80, 1), (197, 96, 6)])
def test_block_flops_match_torch_flop_counter(tokens, dim, heads):
    """torch's FlopCounterMode counts every matmul of the real block (2*M*N*K) independently."""
    blk = Block(dim, heads)
    x = torch.randn(2, tokens, dim)
    with FlopCounterMode(display=False) as fc:
        blk(x)
    assert fc.get_total_flops() == 2 * F.block_flops(tokens, dim)


def test_mae_forward_flops_match_flop_counter_of_baseline():
    """The whole official-style MAE forward (conv patch embed of all patches included)."""
    torch.manual_seed(0)
    shape = F.MAEShape(**TINY, mask_ratio=0.75)
    model = OfficialMAE(**TINY)
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(3, 3, 32, 32), 0.75)
    assert fc.get_total_flops() == 3 * F.mae_forward_flops(shape)["total"]
    all_model = OfficialMAE(**TINY, all_tokens=True)
    with FlopCounterMode(display=False) as fc:
        all_model(torch.randn(3, 3, 32, 32), 0.75)
    assert fc.get_total_flops() == 3 * F.mae_forward_flops(shape, all_tokens=True)["total"]


def test_performance_md_figures():
    """docs/performance.md's table: 58.7 / 124.5 / 291 train GFLOP per image for MAE B/16, L/16, H/14."""
    b = F.MAEShape()
    l = F.MAEShape(embed_dim=1024, depth=24, num_heads=16)
    h = F.MAEShape(patch_size=14, embed_dim=1280, depth=32, num_heads=16)
    assert round(F.mae_train_flops(b) / 1e9, 1) == 58.7
    assert round(F.mae_train_flops(l) / 1e9, 1) == 124.5
    assert round(F.mae_train_flops(h) / 1e9) == 291
    # The encoder on all tokens costs ~4x more (197 vs 50 tokens) for ViT-L.
    enc = F.mae_forward_flops(l)["encoder"], F.mae_forward_flops(l, all_tokens=True)["encoder"]
    assert 3.9 < enc[1] / enc[0] < 4.1


def test_peak_table_and_mfu():
    assert F.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert F.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert F.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert F.peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    assert F.mfu(989e12 * 0.5, 1.0, 989.0) == pytest.approx(0.5)
    assert F.mfu(1e12, 1.0, None) is None


def test_baseline_loss_matches_reference_and_masks():
    torch.manual_seed(1)
    model = OfficialMAE(**{**TINY, "img_size": 40})  # 5x5 = 25 patches, odd
    imgs = torch.randn(3, 3, 40, 40)
    loss, pred, mask = model(imgs, 0.6)
    assert pred.shape == (3, 25, 8 * 8 * 3)
    assert torch.equal(mask.sum(1), torch.full((3,), 25.0 - int(25 * 0.4)))
    torch.testing.assert_close(loss, reference.norm_pix_loss(pred, imgs, mask, 8))
    assert torch.equal(model.patchify(imgs), reference.patchify(imgs, 8))


def test_baseline_sincos_matches_fastmask_models():
    from fastmask.models import sincos_2d

    ours = sincos_pos_embed_2d(64, 5, cls_token=True)[0]
    theirs = sincos_2d(64, (5, 5), cls_token=True)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-6)


def test_official_train_step_lowers_loss_with_the_default_optimizer():
    torch.manual_seed(0)
    model = OfficialMAE(**TINY)
    step = make_official_step(model, torch.float32, lr=1e-3)
    x = torch.randn(4, 3, 32, 32)
    losses = [float(step(x)) for _ in range(15)]
    assert losses[-1] < losses[0]
    # torch's own choice for the device: neither fused nor foreach asked for
    assert step.optimizer.defaults["fused"] is None and step.optimizer.defaults["foreach"] is None
    groups = step.optimizer.param_groups  # timm's add_weight_decay: the 3-D tokens are decayed
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.cls_token) in decayed and id(model.mask_token) in decayed
    assert id(model.norm.weight) not in decayed and not model.pos_embed.requires_grad


def test_official_lr_is_warmup_then_half_cosine():
    lrs = [official_lr(i, 20, 1.0, warmup_its=5, min_lr=0.1) for i in range(21)]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(0.2) and lrs[5] == pytest.approx(1.0)
    assert lrs[20] == pytest.approx(0.1) \
        and lrs[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_official_step_syncs_the_host_each_step_and_its_ablation_knobs_remove_it():
    from test_no_host_sync import HostSyncRecorder

    def syncs(**knobs):
        torch.manual_seed(0)
        step = make_official_step(OfficialMAE(**TINY), torch.float32, **knobs)
        x = torch.randn(2, 3, 32, 32)
        step(x)  # lazy optimizer state outside the recorded step
        with HostSyncRecorder() as rec:
            step(x)
        return [op for op, _ in rec.found]

    assert "_local_scalar_dense" in syncs()  # loss.item(), as the official loop
    assert syncs(host_sync=False, grad_norm=False, optimizer="fused") == []


def test_strong_model_computes_the_official_loss_and_its_step_has_no_host_sync():
    pytest.importorskip("timm")  # the strong baseline needs timm (an optional extra)
    from test_no_host_sync import HostSyncRecorder

    from fastmask.bench.baseline_strong import build_strong_model, make_strong_step, uses_sdpa

    torch.manual_seed(0)
    official = OfficialMAE(**TINY)
    model = build_strong_model(**TINY)
    assert uses_sdpa(model)
    model.load_state_dict(official.state_dict(), strict=True)  # the same names: weights move unchanged
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    torch.testing.assert_close(model(imgs, 0.75, noise)[0], official(imgs, 0.75, noise)[0], rtol=1e-5,
                               atol=1e-6)

    # inductor's CPU compile: minutes (bench only)
    step = make_strong_step(model, torch.float32, compile=False)
    assert step.optimizer.defaults["fused"] is True and step.compiled is None
    losses = [step(imgs, noise) for _ in range(3)]
    with HostSyncRecorder() as rec:
        losses.append(step(imgs, noise))
    assert rec.found == [] and float(losses[-1]) < float(losses[0])


# ADIOS-SimSiam alternating: the occluder's own step (post_step) and the predictor's unscheduled lr group.
ADIOS_SMALL = ["method_args.ssl=simsiam", "method_args.num_masks=2", "method_args.proj_hidden_dim=32",
               "method_args.proj_output_dim=16", "method_args.pred_hidden_dim=16", "method_args.num_blocks=3",
               "method_args.backbone_args={width: 16}", "engine.optimizer=sgd"]


@pytest.mark.parametrize("recipe,extra", [("mae_tiny", ["method_args.decoder_depth=1"]),
                                          ("adios_tiny", ADIOS_SMALL)])
def test_engine_step_equals_pretrain_on_the_same_images(recipe, extra):
    """The bench's fastmask path is `fastmask pretrain`'s step: same weights, masks, lr and losses."""
    from fastmask.bench.engine_step import make_engine_step
    from fastmask.engine.config import load_config
    from fastmask.engine.trainer import pretrain
    from fastmask.methods import build_method

    cfg = load_config(recipe, ["data.img_size=32", "data.batch_size=4", "data.loader=synthetic",
                               "engine.steps=4", "engine.warmup_steps=2", "engine.log_every=4", *extra])
    seen = {"imgs": [], "keys": [], "loss": []}

    def factory(c):
        method = build_method(c)
        forward = method.forward

        def recorded(imgs, keys=None):
            out = forward(imgs, keys=keys)
            seen["imgs"].append(imgs.clone())
            seen["keys"].append(keys.clone())
            seen["loss"].append(float(out["loss"].detach()))
            return out

        method.forward = recorded
        return method

    pretrain(cfg, out=None, method_factory=factory, progress=False)
    torch.manual_seed(cfg.engine.seed)  # pretrain seeds so before building the method
    step = make_engine_step(cfg, build_method(cfg))
    assert step.precision == "fp32" and (recipe != "mae_tiny" or step.optimizer.defaults["fused"] is True)
    ours = [float(step(x, keys)) for x, keys in zip(seen["imgs"], seen["keys"])]
    assert len(ours) == 4 and ours == seen["loss"]
    # Without keys the step makes the loader's own (epoch 0, one rank): the same masks again.
    torch.manual_seed(cfg.engine.seed)
    step = make_engine_step(cfg, build_method(cfg))
    assert [float(step(x)) for x in seen["imgs"]] == seen["loss"]


def test_time_calls_rotates_inputs():
    seen = []
    t = time_calls(seen.append, [0, 1, 2], "cpu", warmup=2, repeats=4)
    assert seen == [0, 1, 2, 0, 1, 2]
    assert t.repeats == 4 and len(t.times_s) == 4 and t.min_s <= t.median_s <= t.max_s
    calls = {"a": [], "b": []}
    out = time_interleaved({k: v.append for k, v in calls.items()}, [5, 6, 7], "cpu", warmup=1, repeats=2)
    assert calls == {"a": [5, 6, 7], "b": [5, 6, 7]}
    assert set(out) == {"a", "b"}
    with pytest.raises(ValueError):
        time_calls(seen.append, [], "cpu")


def test_saved_activation_bytes_counts_activations_not_weights():
    lin = torch.nn.Linear(37, 53)
    x = torch.randn(11, 37, requires_grad=True)
    # linear saves x (a leaf requiring grad: the input) and the weight; sin saves its input y.
    n = saved_activation_bytes(lambda: torch.sin(lin(x)).sum(), lin)
    assert n == 11 * 53 * 4
    x2 = torch.randn(11, 37)
    n2 = saved_activation_bytes(lambda: torch.sin(lin(x2)).sum(), lin)
    assert n2 == 11 * 37 * 4 + 11 * 53 * 4


def _bench_argv(tmp_path, *extra):
    return ["bench", "--model", "vit_tiny_patch16", "--img-size", "48", "--batch-size", "3",
            "--warmup", "1", "--repeats", "2", "--threads", "1",
            "--set", "method_args.decoder_embed_dim=32", "--set", "method_args.decoder_depth=1",
            "--set", "method_args.decoder_num_heads=4", "--out", str(tmp_path / "step.json"), *extra]


def test_bench_cli_writes_json_with_every_path(tmp_path):
    pytest.importorskip("timm")
    from fastmask.cli import main

    # The strong baseline uncompiled: inductor's CPU compile takes minutes (the bench's default compiles).
    assert main(_bench_argv(tmp_path, "--ablation", "--no-strong-compile", "--plot",
                            str(tmp_path / "step.png"))) == 0
    r = json.loads((tmp_path / "step.json").read_text())
    assert set(r["paths"]) == {"fastmask", "official", "strong", "fastmask_all_tokens", "official_all_tokens"}
    assert r["skipped"] == {}
    shape = F.MAEShape(img_size=48, patch_size=16, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=32,
                       decoder_depth=1, decoder_num_heads=4)
    for name, p in r["paths"].items():
        assert p["step_s_median"] > 0 and len(p["step_s_times"]) == 2
        assert p["images_per_s"] == pytest.approx(3 / p["step_s_median"])
        assert p["flops_per_step"] == F.mae_train_flops(shape, 3, all_tokens=name.endswith("all_tokens"))
        assert p["tflops"] == pytest.approx(p["flops_per_step"] / p["step_s_median"] / 1e12)
        assert p["mfu"] is None  # no peak on the CPU unless given
        assert p["saved_activation_bytes"] > 0
    paths, ratios = r["paths"], r["ratios"]
    assert "DeepSpeed engine" in paths["fastmask"]["what"] and "fused=True" in paths["fastmask"]["optimizer"]
    assert "loss.item()" in paths["official"]["what"] and paths["official"]["optimizer"] == "AdamW()"
    assert "NOT compiled" in paths["strong"]["what"] and "fused=True" in paths["strong"]["optimizer"]
    for base in ("official", "strong"):
        assert ratios[f"speedup_fastmask_vs_{base}"] == pytest.approx(
            paths[base]["step_s_median"] / paths["fastmask"]["step_s_median"])
        rounds = zip(paths[base]["step_s_times"], paths["fastmask"]["step_s_times"])
        assert ratios[f"speedup_fastmask_vs_{base}_per_round_median"] == pytest.approx(
            statistics.median(b / f for b, f in rounds))
    assert ratios["all_tokens_over_visible_official"] == pytest.approx(
        paths["official_all_tokens"]["step_s_median"] / paths["official"]["step_s_median"])
    assert "all_tokens_over_visible_fastmask" in ratios \
        and "speedup_fastmask_vs_official_all_tokens" in ratios
    # The all-token encoder holds more activations than the visible-only one, on both implementations.
    for impl in ("fastmask", "official"):
        assert paths[impl + "_all_tokens"]["saved_activation_bytes"] > paths[impl]["saved_activation_bytes"]
    assert r["shapes"]["patches"] == 9 and r["shapes"]["visible"] == 2
    assert r["args"]["dtype"] == "fp32" and r["device"]["type"] == "cpu"
    assert r["versions"]["torch"] == torch.__version__
    assert {"python", "triton", "fastmask_git"} <= set(r["versions"])
    png = (tmp_path / "step.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_peak_gives_mfu_and_no_baseline(tmp_path):
    from fastmask.cli import main

    assert main(_bench_argv(tmp_path, "--baseline", "none", "--fastmask-step", "direct", "--peak-tflops",
                            "1.5")) == 0
    r = json.loads((tmp_path / "step.json").read_text())
    assert set(r["paths"]) == {"fastmask"} and r["ratios"] == {}
    p = r["paths"]["fastmask"]
    assert p["mfu"] == pytest.approx(p["tflops"] / 1.5)
    assert "WITHOUT DeepSpeed" in p["what"]


def test_bench_rejects_bad_arguments_before_work(tmp_path):
    from fastmask.bench.step import StepBenchArgs, run_step_bench

    with pytest.raises(ValueError, match="baseline must be"):
        run_step_bench(StepBenchArgs(baseline="nope"))
    with pytest.raises(ValueError, match="baselines are MAE"):
        run_step_bench(StepBenchArgs(method="extrema"))
    with pytest.raises(ValueError, match="mask_ratio"):
        run_step_bench(StepBenchArgs(mask_ratio=1.0))
    with pytest.raises(ValueError, match="fastmask_step must be"):
        run_step_bench(StepBenchArgs(fastmask_step="warp"))
