"""End-to-end: each ViT-side method trains a tiny model for a few dozen steps on the embedded photo
set on the CPU with plain AdamW; the loss falls and the embeddings do not collapse.

Collapse check: per-dimension std over a held-out batch of the L2-normalized encoder features
(cls token of `method.encoder().forward_features`), times sqrt(D). Measured over three seeds:
healthy runs 0.58-0.64 (ExtreMA), 0.68-0.81 (RelaxMIM C-MAE), 0.65-0.71 (MST), about their
random-init level; ExtreMA with momentum 0 (teacher = student), which collapses, 0.19-0.20 with its
target std 0.008-0.009 (healthy 0.063-0.068). The thresholds sit between.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastmask.data import ViewSpec
from fastmask.data.embedded import embedded_images
from fastmask.draws import Draws
from fastmask.eval.features import to_model_input
from fastmask.methods import get_method
from fastmask.methods.views import ViewAugment, gaussian_blur
from fastmask.models import MODELS, VisionTransformer, register_model

IMG = 32
STEPS = 30
BATCH = 32
MICRO = "test_vit_micro_patch8"  # 2 blocks, 64 wide, 16 patches at 32 px: keeps each run a few seconds
DIM = 64

if MICRO not in MODELS:
    @register_model(name=MICRO)
    def _micro(**kw):
        return VisionTransformer(**{"patch_size": 8, "embed_dim": DIM, "depth": 2, "num_heads": 4, **kw})


@pytest.fixture(scope="module")
def data():
    x = to_model_input(embedded_images(count=160, size=IMG), IMG)
    return x[:128], x[128:]


def _embed_std(method, x):
    with torch.no_grad():
        enc = method.encoder()
        was = enc.training
        enc.eval()
        f = enc.forward_features(x)[:, 0]
        enc.train(was)
    return F.normalize(f.float(), dim=-1).std(dim=0).mean().item()


def _train(method, data, steps=STEPS, lr=1e-3, seed=0):
    train, held = data
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(method.param_groups(0.05), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    losses, metrics = [], []
    method.train()
    for step in range(steps):
        idx = torch.randperm(train.shape[0], generator=g)[:BATCH]
        out = method(train[idx])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.on_step_end(step + 1, steps)
        assert all(torch.isfinite(v).all() for v in out.values())
        losses.append(out["loss"].item())
        metrics.append({k: v.item() for k, v in out.items()})
    return losses, metrics, _embed_std(method, held)


def _assert_learns(losses, std, dim, drop=0.05):
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first * (1 - drop), f"loss did not fall: first {first:.4f} last {last:.4f} ({losses})"
    assert std > 0.35 / dim ** 0.5, \
        f"embeddings collapsed: per-dim std {std:.5f} (x sqrt(D) = {std * dim ** 0.5:.3f})"


@pytest.mark.slow
def test_extrema_learns_without_collapse(data):
    m = get_method("extrema")(model=MICRO, img_size=IMG, mask_ratio=0.75, masking="multi", num_masks=4,
                              proj_hidden_dim=256, proj_dim=64, pred_hidden_dim=256, momentum=0.99,
                              drop_path_rate=0.0)
    losses, metrics, std = _train(m, data)
    _assert_learns(losses, std, DIM)
    assert metrics[0]["visible_ratio"] == pytest.approx(0.25)
    assert metrics[-1]["momentum"] > 0.99                      # cosine schedule moved towards 1
    assert metrics[-1]["target_std"] > 0.03                    # healthy 0.063-0.068, collapsing 0.008-0.009


def test_extrema_views_share_the_crop_unless_told(data):
    """The paper's views share one crop and differ in colour only; `shared_crop=False` (an ablation)
    crops each view on its own. With the colour off the difference between the views is geometry."""
    kw = dict(model=MICRO, img_size=IMG, num_masks=4, mask_ratio=0.75, proj_hidden_dim=32, proj_dim=16,
              pred_hidden_dim=32)
    imgs = data[0][:16]
    assert get_method("extrema")(color_aug=False, **kw).augment is None              # x1 = x2
    x1, x2 = get_method("extrema")(color_aug=False, shared_crop=False, **kw).augment.two_views(
        imgs, draws=Draws(torch.arange(16), seed=3))
    moved = (x1 - x2).flatten(1).abs().amax(dim=1)
    assert (moved > 0.5).float().mean() > 0.9, moved                                 # the geometry differs
    # the shared crop with colour on: each view is a per-image colour map of the same pixels, so the
    # views' grey levels stay rank-correlated pixel by pixel
    y1, y2 = get_method("extrema")(**kw).augment.two_views(imgs, draws=Draws(torch.arange(16), seed=3))

    def grey(v):  # [B, 3, H, W] -> [B, H*W]: each image's grey levels about its mean
        return (v - v.mean((2, 3), True)).mean(1).flatten(1)

    shared = F.cosine_similarity(grey(y1), grey(y2), dim=1)
    apart = F.cosine_similarity(grey(x1), grey(x2), dim=1)
    assert shared.median() > 0.8 and apart.median() < shared.median() - 0.2, (shared, apart)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(similarity="infonce", target="stopgrad", level="token",
                                     negatives="batch"),
                                dict(similarity="infonce", target="ema", level="image", masking="block"),
                                dict(similarity="pixel", masking="attention"),
                                dict(similarity="infonce", target="shared", negatives="image"),
                                dict(similarity="rmae", target="stopgrad")],
                         ids=["cmae-token-stopgrad", "cmae-image-ema-block", "pixel-attention",
                              "cmae-shared-image-neg", "rmae-stopgrad"])
def test_relaxmim_learns_without_collapse(data, kw):
    kw = dict(kw)
    masking = kw.pop("masking", "random")
    m = get_method("relaxmim")(model=MICRO, img_size=IMG, mask_ratio=0.75, masking=masking,
                               proj_hidden_dim=256, proj_dim=64, decoder_embed_dim=64, decoder_depth=1,
                               decoder_num_heads=4, **kw)
    losses, metrics, std = _train(m, data)
    _assert_learns(losses, std, DIM)
    assert metrics[0]["mask_ratio"] == pytest.approx(0.75)
    if kw["similarity"] == "rmae":
        # the full branch learns to reconstruct the pixels (its term fell to 0.40-0.44x in 30 steps over 5
        # inits); the relaxed term need not fall in 30 steps (0.28 -> 0.30 in one init, 0.44 -> 0.33 in
        # another): its target g(f(x)) moves as the full branch learns
        first, last = (sum(r["ae"] for r in rows) / 4 for rows in (metrics[:4], metrics[-4:]))
        assert last < 0.8 * first, f"ae: first {first:.4f} last {last:.4f}"


@pytest.mark.slow
def test_mae_with_block_masking_learns(data):
    # MAE builds its encoder from a ViT size name: ViT-Tiny/16 at 48 px (9 patches), fewer steps.
    x = to_model_input(embedded_images(count=160, size=48), 48)
    mae = get_method("mae")(model="vit_tiny_patch16", img_size=48, mask_ratio=0.5, masking="block",
                            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    mae.masker.min_num_patches = 2  # BEiT's 16-patch minimum block does not fit a 3x3 grid
    losses, metrics, std = _train(mae, (x[:128], x[128:]), steps=15)
    _assert_learns(losses, std, 192)
    assert metrics[0]["mask_ratio"] == pytest.approx(5 / 9)  # K = int(9 * 0.5) = 4 visible


@pytest.mark.slow
def test_mst_learns_without_collapse(data):
    torch.manual_seed(0)  # the initial weights: not whatever state earlier tests left the global RNG in
    m = get_method("mst")(model=MICRO, img_size=IMG, masking="attention", out_dim=256,
                          head_hidden_dim=128, bottleneck_dim=32, decoder_width=16, momentum=0.99,
                          drop_path_rate=0.0, mask_rho=0.5, mask_prob=0.3, local_crops_number=2,
                          local_crop_size=16)
    losses, metrics, std = _train(m, data, lr=5e-4)
    _assert_learns(losses, std, DIM)
    rec = [r["rec"] for r in metrics]
    assert sum(rec[-4:]) < sum(rec[:4])                        # the image decoder learns
    assert 0.0 < metrics[-1]["mask_ratio"] < 0.5               # Bernoulli over the low-attention half
    # the teacher collapsed neither to one prototype (entropy 0) nor to uniform (ln 256 = 5.5): measured
    # 1.4-2.1 over these 30 steps (seed 0)
    assert 0.7 < metrics[-1]["teacher_entropy"] < 0.6 * math.log(256)


_SMALL = {
    "extrema": dict(num_masks=3, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, drop_path_rate=0.0),
    "relaxmim": dict(proj_hidden_dim=32, proj_dim=16, decoder_embed_dim=32, decoder_depth=1,
                     decoder_num_heads=4),
    "mst": dict(out_dim=32, head_hidden_dim=32, bottleneck_dim=8, decoder_width=8, drop_path_rate=0.0,
                local_crops_number=2, local_crop_size=16, freeze_last_layer=0),
}
_PAIRS = [("extrema", "multi"), ("extrema", "random"), ("extrema", "block"),
          ("relaxmim", "random"), ("relaxmim", "block"), ("relaxmim", "attention"),
          ("mst", "attention"), ("mst", "random"), ("mst", "block")]


@pytest.mark.parametrize("name,masking", _PAIRS, ids=[f"{a}-{b}" for a, b in _PAIRS])
def test_method_pairs_with_generator(name, masking):
    torch.manual_seed(0)
    m = get_method(name)(model=MICRO, img_size=IMG, mask_ratio=0.75, masking=masking, **_SMALL[name])
    x = torch.randn(4, 3, IMG, IMG)
    out = m(x)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None] == []
    assert all(p.grad is None for n, p in m.named_parameters() if n.startswith("teacher."))
    m.on_step_end(1, 4)


@pytest.mark.parametrize("name", ["extrema", "relaxmim", "mst"])
def test_method_state_roundtrip_resumes_draws(name):
    masking = {"extrema": "multi", "relaxmim": "random", "mst": "attention"}[name]
    make = lambda seed: get_method(name)(model=MICRO, img_size=IMG, mask_ratio=0.75, masking=masking,
                                         seed=seed, **_SMALL[name])
    x = torch.randn(4, 3, IMG, IMG)
    a = make(0)
    a(x)
    a.on_step_end(1, 4)
    state = a.state_dict()
    assert any(k.endswith("_extra_state") for k in state)
    b = make(1)
    b.load_state_dict(state)
    torch.testing.assert_close(a(x)["loss"], b(x)["loss"])  # same weights, same next masks and views


def test_method_errors():
    with pytest.raises(ValueError, match="masking=attention"):
        get_method("extrema")(model=MICRO, img_size=IMG, masking="attention")
    with pytest.raises(ValueError, match="similarity"):
        get_method("relaxmim")(model=MICRO, img_size=IMG, similarity="cosine")
    with pytest.raises(ValueError, match="similarity=mae is now spelled similarity=pixel"):
        get_method("relaxmim")(model=MICRO, img_size=IMG, similarity="mae")
    with pytest.raises(ValueError, match="ae_weight"):
        get_method("relaxmim")(model=MICRO, img_size=IMG, similarity="rmae", ae_weight=-1.0)
    with pytest.raises(ValueError, match="disjoint masks"):
        get_method("extrema")(model=MICRO, img_size=IMG, mask_ratio=0.5, num_masks=5)
    with pytest.raises(ValueError, match="rec_loss"):
        get_method("mst")(model=MICRO, img_size=IMG, rec_loss="ssim")


# ---------------------------------------------------------------- MST: multi-crop, DINO's augmentations
def _mst(**kw):
    torch.manual_seed(0)
    return get_method("mst")(model=MICRO, img_size=IMG, masking="attention", **{**_SMALL["mst"], **kw})


def test_mst_multi_crop_locals_go_through_the_student_only():
    m = _mst(local_crops_number=3)
    assert m.view_specs() == [ViewSpec(IMG, (0.4, 1.0))] * 2 + [ViewSpec(16, (0.05, 0.4))] * 3
    seen = {"teacher": [], "student": []}
    for who in seen:
        getattr(m, who)["backbone"].patch_embed.register_forward_hook(
            lambda _m, args, _o, who=who: seen[who].append(tuple(args[0].shape)))
    views = [torch.randn(4, 3, IMG, IMG), torch.randn(4, 3, IMG, IMG)] + [torch.randn(4, 3, 16, 16)] * 3
    out = m(views)
    assert seen["teacher"] == [(8, 3, IMG, IMG)]                          # the 2 global views only
    assert seen["student"] == [(8, 3, IMG, IMG), (12, 3, 16, 16)]         # globals (masked), then the locals
    assert torch.isfinite(out["loss"])
    # DINO's per-view probabilities: blur 1.0 / 0.1 / 0.5, solarization 0.2 on global 2 only
    assert [(a.blur_p, a.solarize_p, a.crop_scale) for a in m._augment] == \
        [(1.0, 0.0, None), (0.1, 0.2, None)] + [(0.5, 0.0, None)] * 3
    with pytest.raises(ValueError, match="expects 5 views"):
        m(views[:4])
    with pytest.raises(ValueError, match=r"view 4 must be \[4, 3, 16, 16\]"):
        m(views[:4] + [torch.randn(4, 3, 24, 24)])


def test_mst_freezes_the_last_layer_for_epochs_and_warms_the_teacher_temperature_per_epoch():
    m = _mst(freeze_last_layer=2, warmup_teacher_temp_epochs=3, teacher_temp=0.07)
    m.set_epoch_length(3)
    x = torch.randn(2, 3, IMG, IMG)
    grads, temps = [], []
    for step in range(8):
        m.zero_grad()
        m(x)["loss"].backward()
        grads.append(m.student["head"].last_layer.weight_v.grad is not None)
        temps.append(m.dino_loss.teacher_temp_at(m.epoch))
        m.on_step_end(step + 1, 8)
    assert grads == [False] * 6 + [True] * 2                  # 2 epochs of 3 steps
    assert temps == pytest.approx([0.04] * 3 + [0.055] * 3 + [0.07] * 2)


def test_gaussian_blur_matches_a_dense_per_sample_convolution():
    """Separable grouped blur against each sample's 2-D Gaussian kernel applied alone (edges replicated);
    odd sizes, an image smaller than the kernel, samples switched off left bit-identical."""
    g = torch.Generator().manual_seed(0)
    for H, W in ((13, 21), (5, 7)):
        x = torch.rand(5, 3, H, W, generator=g)
        sigma = torch.tensor([0.1, 0.7, 1.3, 2.0, 1.0])
        on = torch.tensor([True, True, True, True, False])
        got = gaussian_blur(x, sigma, on, 2.0)
        r = 6
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        for b in range(4):
            k = torch.exp(-t ** 2 / (2 * sigma[b].double() ** 2))
            k2 = torch.outer(k, k) / k.sum() ** 2
            xp = F.pad(x[b:b + 1].double(), (r, r, r, r), mode="replicate")
            ref = F.conv2d(xp, k2.expand(3, 1, -1, -1), groups=3)[0]
            torch.testing.assert_close(got[b].double(), ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[4], x[4])
        assert (got[3] - x[3]).abs().mean() > 5 * (got[0] - x[0]).abs().mean()  # sigma 2 blurs, 0.1 barely


def test_view_blur_is_drawn_per_sample_with_its_probability():
    aug = ViewAugment(crop_scale=None, jitter_p=0.0, gray_p=0.0, blur_p=0.5)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.rand(400, 3, 16, 16, generator=torch.Generator().manual_seed(1)) - mean) / std  # in [0, 1]
    changed = (aug(x, draws=Draws(torch.arange(400) * 7919, seed=3)) - x).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert 0.42 < changed.float().mean().item() < 0.58                 # 200 +- 3 sigma of Binomial(400, 0.5)
    never = ViewAugment(crop_scale=None, jitter_p=0.0, gray_p=0.0)
    torch.testing.assert_close(never(x, draws=Draws(torch.arange(400), seed=3)), x, rtol=0, atol=1e-5)


def test_mst_trains_through_the_engine_on_loader_views(monkeypatch):
    """`fastmask pretrain --config mst_tiny` at 32 px: the loader cuts the 2 + 2 views, the engine tells
    the method its epoch length and moves the decay groups' weight decay along DINO's cosine."""
    from fastmask.engine import trainer
    from fastmask.engine.config import load_config
    from fastmask.engine.schedule import weight_decay_at
    from fastmask.methods import build_method

    cfg = load_config("mst_tiny", ["data.img_size=32", "data.batch_size=4", "data.num_workers=0",
                                   "method_args.local_crop_size=16", "engine.steps=3", "engine.log_every=1"])
    built, record = {}, []
    make_opt = trainer.build_optimizer
    monkeypatch.setattr(trainer, "build_optimizer",
                        lambda *a, **k: built.setdefault("opt", make_opt(*a, **k)))

    def factory(c):
        m = build_method(c)
        inputs = []
        m.register_forward_pre_hook(lambda _m, args: inputs.append([tuple(v.shape) for v in args[0]]))
        step_end = m.on_step_end

        def on_step_end(step, total):
            record.append([g["weight_decay"] for g in built["opt"].param_groups])
            step_end(step, total)
        m.on_step_end = on_step_end
        built["method"], built["inputs"] = m, inputs
        return m

    result = trainer.pretrain(cfg, out=None, method_factory=factory, progress=False)
    assert result.step == 3 and all(torch.isfinite(torch.tensor(l)) for _, l in result.losses)
    m = built["method"]
    assert m.steps_per_epoch == 512 // 4                               # the embedded set's 512 images
    assert built["inputs"][0] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert record == [[weight_decay_at(s, 3, 0.04, 0.4), 0.0] for s in range(3)]
    assert record[2][0] == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
