"""ADIOS: the U-Net occluder, the adversarial mask generator (gradient reversal, penalty, token form),
the ResNet-18 backbone, and the method trained on the embedded photos for each SSL objective,
backbone and mode."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastmask.draws import Draws
from fastmask.masking import build_masker
from fastmask.masking.adversarial import (AdversarialMasking, apply_pixel_mask, entropy_penalty, grad_reverse,
                                          mask_areas, masked_copies, occluder_penalty, patch_occupancy,
                                          pick_slots, sparsity_penalty, token_masking_from_scores)
from fastmask.methods.adios import ADIOS
from fastmask.methods.views import IMAGENET_MEAN, IMAGENET_STD, ViewAugment
from fastmask.models import create_model
from fastmask.models.resnet import resnet18
from fastmask.models.unet import Occluder, UNet, num_unet_blocks


def _rand_imgs(B: int, S: int, seed: int = 0) -> torch.Tensor:
    """Normalized images of valid pixels ([0, 1] before normalization)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (torch.rand(B, 3, S, S, generator=g) - mean) / std


# ---------------------------------------------------------------------------------------------- U-Net
@pytest.mark.parametrize("S,nb,norm", [(16, 3, "none"), (32, 4, "gn"), (64, 5, "in"), (96, 5, "gn")])
def test_unet_shapes_and_masks_partition(S, nb, norm):
    assert num_unet_blocks(S) == nb
    occ = Occluder(S, num_masks=5, fbase=8, norm=norm)
    assert occ.unet.num_blocks == nb and occ.unet.s == S // 2 ** (nb - 1)
    x = _rand_imgs(3, S)
    feats = occ.unet(x)
    assert feats.shape == (3, 8, S, S)
    m = occ(x)
    assert m.shape == (3, 5, S, S)
    assert (m >= 0).all() and (m <= 1).all()
    torch.testing.assert_close(m.sum(dim=1), torch.ones(3, S, S), atol=1e-5, rtol=0)
    assert (m[0] - m[1]).abs().max() > 1e-4  # depends on the image


def test_unet_channels_follow_adios_table():
    u = UNet(224, fbase=32, norm="in")
    c = 32
    assert u.num_blocks == 6 and u.s == 7
    assert [b[0].out_channels for b in u.down] == [c, c, c, 2 * c, 2 * c, 2 * c]
    assert [b[0].in_channels for b in u.up] == [4 * c, 4 * c, 4 * c, 2 * c, 2 * c, 2 * c]
    assert [b[0].out_channels for b in u.up] == [2 * c, 2 * c, c, c, c, c]
    assert all(b[0].bias is None for b in u.down)  # no conv bias before a norm
    assert u.mlp[1].in_features == 2 * c * 7 * 7 and u.mlp[-2].out_features == 2 * c * 7 * 7


def test_unet_bad_inputs():
    with pytest.raises(ValueError, match="norm must be one of"):
        UNet(32, norm="bn")
    with pytest.raises(ValueError, match="not divisible"):
        UNet(36)  # int(log2(36) - 1) = 4 blocks: three halvings need a multiple of 8
    with pytest.raises(ValueError, match="need >= 3"):
        UNet(8)
    with pytest.raises(ValueError, match="built for"):
        Occluder(32, fbase=8, norm="gn")(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="num_masks"):
        Occluder(32, num_masks=0)


# ---------------------------------------------------------------------------------------------- ResNet
def test_resnet18_matches_torchvision_layout():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = tv.models.resnet18()
    net = resnet18(small_stem=False)
    missing, unexpected = net.load_state_dict(ref.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"]
    ref.fc = torch.nn.Identity()
    net.eval(), ref.eval()
    x = _rand_imgs(2, 40)
    torch.testing.assert_close(net(x), ref(x))


def test_resnet18_small_stem_and_tokens():
    small = create_model("resnet18", img_size=32)  # auto: small stem at <= 64 px
    assert small.small_stem and not create_model("resnet18", img_size=96).small_stem
    x = _rand_imgs(2, 24)
    tok = small.forward_features(x)
    assert tok.shape == (2, 1 + 4 * 4, 512)  # the stem pads by 2 (ADIOS): 26 px -> 13 -> 7 -> 4x4 map
    torch.testing.assert_close(tok[:, 0], small(x))
    torch.testing.assert_close(tok[:, 0], tok[:, 1:].mean(1))
    assert resnet18(small_stem=False).forward_features(_rand_imgs(2, 33)).shape == (2, 1 + 2 * 2, 512)


def test_batchnorm_trains_under_a_bf16_cast():
    """DeepSpeed's bf16 mode casts parameters, not buffers: ResNet and head BatchNorms still run (fp32
    statistics, fp32 running averages, bf16 output), close to the fp32 layers, with gradients."""
    torch.manual_seed(0)
    net32 = resnet18(small_stem=True, width=8)
    net16 = copy.deepcopy(net32)
    for p in net16.parameters():
        p.data = p.data.bfloat16()
    x = _rand_imgs(4, 16)
    y32, y16 = net32(x), net16(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and net16.bn1.running_mean.dtype == torch.float32
    assert ((y16.float() - y32).norm() / y32.norm()) < 0.05
    torch.testing.assert_close(net16.bn1.running_mean, net32.bn1.running_mean, rtol=0.05, atol=1e-2)
    assert net16.bn1.num_batches_tracked == 1
    y16.float().sum().backward()
    assert net16.bn1.weight.grad.dtype == torch.bfloat16 and net16.conv1.weight.grad.abs().sum() > 0
    from fastmask.models.heads import MLPHead
    head = MLPHead(8, 16, 8, num_layers=3, norm="bn", act="relu", last_norm=True)
    for p in head.parameters():
        p.data = p.data.bfloat16()
    assert head(torch.randn(4, 8).bfloat16()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- generator
def test_grad_reverse_flips_gradient_against_manual():
    torch.manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64)
    y = grad_reverse(x)
    assert torch.equal(y, x)
    (y * w).sin().sum().backward()
    torch.testing.assert_close(x.grad, -(w * (x * w).cos()).detach())  # manual d/dx sin(xw) = w cos(xw)
    x.grad = None
    (grad_reverse(x, 0.5) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, -x.detach())


def test_penalties_match_hand_formula():
    areas = torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]], dtype=torch.float64)
    alpha = 0.9
    hand = alpha * sum(sum(1 / (math.sin(math.pi * areas[b, k].item()) + 1e-10) for b in range(2)) / 2
                       for k in range(3))
    torch.testing.assert_close(sparsity_penalty(areas, alpha), torch.tensor(hand, dtype=torch.float32))
    ent = 0.0
    for b in range(2):
        e = [math.exp(a) for a in areas[b].tolist()]
        p = [v / sum(e) for v in e]
        ent += -sum(pi * math.log(pi) for pi in p)
    torch.testing.assert_close(entropy_penalty(areas, 0.7), torch.tensor(0.7 * ent, dtype=torch.float32))
    # The sparsity term is smallest at half coverage and explodes for empty / full slots.
    assert sparsity_penalty(torch.tensor([[0.5]]), 1.0) < sparsity_penalty(torch.tensor([[0.2]]), 1.0)
    assert sparsity_penalty(torch.tensor([[0.0]]), 1.0) > 1e9


def test_penalty_over_two_views_sums_each_views_batch_mean():
    """SimSiam-ADIOS occludes both views: the sparsity term is each (view, slot)'s batch mean, summed (not a
    mean over the 2B stacked rows), the entropy's softmax runs over a sample's 2N areas (ADIOS-s: per
    view)."""
    torch.manual_seed(0)
    masks = torch.rand(6, 3, 4, 4).softmax(1)              # 2 views x 3 images, 3 slots
    a = masks.double().mean(dim=(2, 3))
    v1, v2 = a[:3], a[3:]
    f = lambda s: 1 / (torch.sin(math.pi * s) + 1e-10)  # noqa: E731
    sparsity = 0.5 * (f(v1).mean(0).sum() + f(v2).mean(0).sum())
    neg_h = lambda x: (x.softmax(1) * x.log_softmax(1)).sum()  # noqa: E731
    pen, areas = occluder_penalty(masks, 0.5, 0.2, views=2)
    torch.testing.assert_close(areas, torch.cat([v1, v2], 1).float())
    torch.testing.assert_close(pen.double(), sparsity - 0.2 * neg_h(torch.cat([v1, v2], 1)), rtol=1e-5,
                               atol=1e-6)
    pen_s, _ = occluder_penalty(masks, 0.5, 0.2, views=2, joint_entropy=False)
    torch.testing.assert_close(pen_s.double(), sparsity - 0.2 * (neg_h(v1) + neg_h(v2)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pen, pen_s) and not torch.allclose(pen, occluder_penalty(masks, 0.5, 0.2)[0])
    with pytest.raises(ValueError, match="not 4 views"):
        occluder_penalty(masks, 0.5, views=4)


def test_occluder_penalty_uses_pixel_areas():
    torch.manual_seed(0)
    masks = torch.rand(4, 3, 8, 8).softmax(1)
    pen, areas = occluder_penalty(masks, 0.5, 0.2)
    torch.testing.assert_close(areas, masks.mean(dim=(2, 3)))
    torch.testing.assert_close(pen, sparsity_penalty(areas, 0.5) + entropy_penalty(areas, 0.2))
    torch.testing.assert_close(mask_areas(masks).sum(1), torch.ones(4))


def test_adversarial_masks_partition_and_apply():
    torch.manual_seed(0)
    gen = AdversarialMasking(occluder=Occluder(32, num_masks=4, fbase=8, norm="gn"))
    x = _rand_imgs(5, 32)
    m = gen.pixel_masks(x)
    torch.testing.assert_close(m.sum(1), torch.ones(5, 32, 32), atol=1e-5, rtol=0)
    # Hiding every slot in turn and adding the pieces back gives (N - 1) copies of the image.
    parts = masked_copies(x, m.transpose(0, 1)).unflatten(0, (4, 5))
    torch.testing.assert_close(parts.sum(0), 3 * x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[2], apply_pixel_mask(x, m[:, 2]))
    one, slot = pick_slots(m, torch.Generator().manual_seed(1))
    torch.testing.assert_close(one, m[torch.arange(5), slot])
    with pytest.raises(ValueError, match="same B, H, W"):
        apply_pixel_mask(x, m[:, 0, :16])


def test_token_masks_exact_ratio_hide_most_occupied():
    torch.manual_seed(0)
    scores = torch.rand(3, 16)
    ids_keep, ids_restore, mask = token_masking_from_scores(scores, 0.75)
    assert ids_keep.shape == (3, 4) and (mask.sum(1) == 12).all()
    for b in range(3):  # the kept patches are exactly the 4 lowest scores
        assert set(ids_keep[b].tolist()) == set(scores[b].argsort()[:4].tolist())
        assert (mask[b, ids_keep[b]] == 0).all()
    torch.testing.assert_close(torch.argsort(ids_restore, 1)[:, :4], ids_keep)
    mpx = torch.zeros(1, 8, 8)
    mpx[0, :4, :4] = 1.0  # slot covers the top-left patch of a 2x2 grid of 4 px patches
    torch.testing.assert_close(patch_occupancy(mpx, 4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_adversarial_registry_token_form_trains_occluder():
    torch.manual_seed(0)
    masker = build_masker("adversarial", mask_ratio=0.75, img_size=32, num_masks=3, fbase=8, norm="gn")
    x = _rand_imgs(4, 32)
    g = torch.Generator().manual_seed(0)
    masks = masker(4, (4, 4), generator=g, imgs=x)
    assert masks.ids_keep.shape == (4, 4) and (masks.mask.sum(1) == 12).all()
    assert any(not torch.equal(masks.mask[0], masks.mask[b]) for b in range(1, 4))  # per-sample masks
    # The soft occlusion of the kept pixels carries a reversed gradient into the occluder.
    (masker.aux["imgs_masked"] ** 2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in masker.occluder.parameters())
    with pytest.raises(ValueError, match="needs imgs"):
        masker(4, (4, 4))


def test_view_augment_identity_and_randomness():
    x = _rand_imgs(4, 32)
    ident = ViewAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, jitter_p=0.0, gray_p=0.0)
    torch.testing.assert_close(ident(x, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=1e-5)
    aug = ViewAugment()
    g = torch.Generator().manual_seed(0)
    v1, v2 = aug.two_views(x, g)
    assert v1.shape == x.shape and (v1 - v2).abs().mean() > 0.05
    torch.testing.assert_close(aug(x, torch.Generator().manual_seed(3)),
                               aug(x, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="crop_scale"):
        ViewAugment(crop_scale=(0.0, 1.0))


# ---------------------------------------------------------------------------------------------- method
def _args(ssl: str, mode: str, model: str, **kw) -> ADIOS.Args:
    return ADIOS.Args(ssl=ssl, mode=mode, num_masks=kw.pop("num_masks", 2), mask_fbase=8, unet_norm="gn",
                      proj_hidden_dim=128, proj_output_dim=64, pred_hidden_dim=64, small_stem=False,
                      backbone_args={"depth": 2} if model.startswith("vit") else {"width": 16}, **kw)


def _grads(m: ADIOS, x: torch.Tensor) -> dict[str, torch.Tensor]:
    m.zero_grad()
    m(x)["loss"].backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_alternating_phases_train_disjoint_parameters():
    """Alternating: the engine's loss reaches the encoder and heads only (masks detached) and the engine's
    groups leave the occluder out; `post_step` then moves the occluder only, by its own optimizer, on the
    micro-batches the forwards kept (and consumes them)."""
    torch.manual_seed(0)
    m = ADIOS("vit_tiny_patch16", 32, _args("simsiam", "alternating", "vit"), optimizer="sgd")
    groups = m.param_groups(1e-4)
    engine_params = {id(p) for g in groups for p in g["params"]}
    occ = list(m.masker.parameters())
    assert not engine_params & {id(p) for p in occ}
    assert {id(p) for p in m.occluder_opt.params} == {id(p) for p in occ}
    assert engine_params | {id(p) for p in occ} == {id(p) for p in m.parameters() if p.requires_grad}
    m(_rand_imgs(4, 32))["loss"].backward()
    m(_rand_imgs(4, 32, seed=1))["loss"].backward()  # two micro-batches
    assert all(p.grad is None for p in occ) and m.online.backbone.blocks[0].attn.qkv.weight.grad is not None
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.post_step(0.1)
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("masker.") for n in moved)
    assert len(moved) > len(occ) // 2 and not m._pending and all(p.grad is None for p in occ)
    m.post_step(0.1)  # nothing kept: no step
    assert all(torch.equal(p, before[n]) or n in moved for n, p in m.named_parameters())


def test_simultaneous_occluder_gradient_is_reversed_ssl_plus_penalty():
    """Manual check of the one-pass game: the occluder's gradient equals d(penalty)/dphi - d(ssl)/dphi, with
    the SSL loss recomputed from the same views and masks."""
    torch.manual_seed(0)
    m = ADIOS("vit_tiny_patch16", 32, _args("simclr", "simultaneous", "vit"))
    x = _rand_imgs(6, 32)
    occ = [p for p in m.masker.parameters()]
    keys = torch.arange(x.shape[0])
    g_method = torch.autograd.grad(m(x, keys=keys)["loss"], occ)
    d = m._stream.draws(x.shape[0], x.device, keys)  # the same keys replay the same views
    x1, x2 = m.augment.two_views(x, draws=d.child("views"))
    masks = m.masker.pixel_masks(x2)
    ssl = m._ssl(x1, x2, masks.transpose(0, 1))
    pen = m.masker.penalty(masks)[0]
    g_ssl = torch.autograd.grad(ssl, occ, retain_graph=True)
    g_pen = torch.autograd.grad(pen, occ)
    for a, s, p in zip(g_method, g_ssl, g_pen):
        torch.testing.assert_close(a, p - s, atol=1e-5, rtol=1e-4)
    assert max(s.abs().max() for s in g_ssl) > 0


def test_param_groups_lr_scale_and_config_errors():
    m = ADIOS("vit_tiny_patch16", 32, _args("simsiam", "simultaneous", "vit", mask_lr=3e-4), lr=1e-3,
              optimizer="lars")
    groups = m.param_groups(0.05)
    occ = [g for g in groups if g.get("name") == "occluder"]
    assert occ and all(g["lr_scale"] == pytest.approx(0.3) for g in occ)
    assert all("lr_scale" not in g for g in groups if g.get("name") != "occluder")
    # The official static_lr: the SimSiam predictor keeps the base lr (an unscheduled group).
    pred = [g for g in groups if g.get("name") == "predictor"]
    assert {id(p) for g in pred for p in g["params"]} == {id(p) for p in m.predictor.parameters()}
    assert all(g["scheduled"] is False for g in pred) \
        and all("scheduled" not in g for g in groups if g not in pred)
    # Weight decay on >= 2-D tensors only (LARS: pos_embed and cls_token too, as the official timm ViT).
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert id(m.online.backbone.pos_embed) in decayed and id(m.online.backbone.norm.weight) not in decayed
    assert m.online.backbone.pos_embed.requires_grad  # learned, as the official timm ViT
    n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_train  # teacher left out
    alt = ADIOS("vit_tiny_patch16", 32, _args("byol", "alternating", "vit", mask_lr=3e-4), lr=1e-3)
    alt.param_groups(0.05)
    assert all(g["lr_scale"] == pytest.approx(0.3) for g in alt.occluder_opt._groups)
    assert {g["weight_decay"] for g in alt.occluder_opt._groups} == {0.0, 0.05}
    with pytest.raises(ValueError, match="mask_lr needs a positive engine.lr"):
        ADIOS("vit_tiny_patch16", 32, _args("simclr", "alternating", "vit", mask_lr=1e-3))
    with pytest.raises(ValueError, match="ssl must be one of.*mode must be one of"):
        ADIOS("vit_tiny_patch16", 32, _args("moco", "both", "vit"))
    with pytest.raises(ValueError, match=r"imgs must be one float batch \[B, 3, 32, 32\] or its two views"):
        ADIOS("vit_tiny_patch16", 32, _args("simclr", "alternating", "vit"))(torch.randn(2, 3, 48, 48))


def test_freeze_patch_embed_keeps_the_patch_projection_at_its_init():
    torch.manual_seed(0)
    m = ADIOS("vit_tiny_patch16", 32, _args("simclr", "simultaneous", "vit", freeze_patch_embed=True),
              optimizer="sgd")
    proj = m.online.backbone.patch_embed.proj
    in_groups = {id(p) for g in m.param_groups(0.0) for p in g["params"]}
    assert not {id(proj.weight), id(proj.bias)} & in_groups
    assert id(m.online.backbone.blocks[0].attn.qkv.weight) in in_groups
    grads = _grads(m, _rand_imgs(4, 32))
    assert not any(n.endswith("patch_embed.proj.weight") for n in grads)
    assert grads["online.backbone.blocks.0.attn.qkv.weight"].abs().max() > 0
    with pytest.raises(ValueError, match="freeze_patch_embed is a ViT option"):
        ADIOS("resnet18", 32, _args("simclr", "simultaneous", "resnet18", freeze_patch_embed=True))


def test_views_come_cut_by_the_loader_or_from_one_batch():
    """The method asks the loader for two crops of the original image (view_specs) and colours them on the
    device; one batch tensor gets both crops cut here instead. Bad inputs: one line."""
    from fastmask.data import ViewSpec

    m = ADIOS("vit_tiny_patch16", 32, _args("simclr", "alternating", "vit", crop_min_scale=0.3, jitter_p=0.0,
                                           gray_p=0.0, blur_p=0.0))
    assert m.view_specs() == [ViewSpec(32, (0.3, 1.0))] * 2
    x1, x2 = _rand_imgs(4, 32), _rand_imgs(4, 32, seed=1)
    d = Draws(torch.arange(4))
    v1, v2 = m._views([x1, x2], d)
    torch.testing.assert_close(v1, x1, atol=1e-5, rtol=1e-5)  # colour off: the loader's crops as they came
    torch.testing.assert_close(v2, x2, atol=1e-5, rtol=1e-5)
    c1, c2 = m._views(x1, Draws(torch.arange(4)))             # one batch: two different crops of it
    assert (c1 - x1).abs().mean() > 0.05 and (c1 - c2).abs().mean() > 0.05
    out = m([x1, x2], keys=torch.arange(4))
    assert torch.isfinite(out["loss"])
    coloured = ADIOS("vit_tiny_patch16", 32, _args("simclr", "alternating", "vit", jitter_p=1.0, blur_p=0.0))
    w1, w2 = coloured._views([x1, x1], Draws(torch.arange(4)))  # one crop twice: each view its own jitter
    assert (w1 - x1).abs().mean() > 0.01 and (w1 - w2).abs().mean() > 0.01
    for bad in ([x1], [x1, x2, x1], [x1, x2[:3]], [x1, torch.randn(4, 3, 16, 16)]):
        with pytest.raises(ValueError, match="imgs must be one float batch"):
            m(bad)


def test_single_mask_picks_one_slot_per_sample_for_both_views():
    """ADIOS-s: one slot per sample, uniform, the same on both SimSiam views, from the per-sample draws."""
    m = ADIOS("vit_tiny_patch16", 32, _args("simsiam", "alternating", "vit", single_mask=True, num_masks=4))
    masks = torch.rand(2 * 64, 4, 2, 2)
    d = Draws(torch.arange(64))
    sel = m._select(masks, d)
    slot = Draws(torch.arange(64)).randint(4)
    assert sel.shape == (1, 128, 2, 2)
    torch.testing.assert_close(sel[0, :64], masks[torch.arange(64), slot])
    torch.testing.assert_close(sel[0, 64:], masks[64 + torch.arange(64), slot])
    assert set(slot.tolist()) == {0, 1, 2, 3}


def test_config_recipes_build_and_zero3_alternating_refused(tmp_path):
    from fastmask.engine.config import ConfigError, load_config
    from fastmask.engine.trainer import pretrain
    from fastmask.methods import build_method

    cfg = load_config("adios_tiny")
    m = build_method(cfg)
    assert isinstance(m, ADIOS) and m.args.mode == "alternating" \
        and ADIOS.supported_zero_stages(m.args) == (0, 1, 2)
    for recipe, ssl, opt in (("adios_resnet18", "simclr", "lars"), ("adios_vit_tiny", "byol", "lars"),
                             ("adios_simsiam_resnet18", "simsiam", "lars")):
        r = load_config(recipe)
        assert (r.method, r.method_args["ssl"], r.engine.optimizer) == ("adios", ssl, opt)
    simsiam = build_method(load_config("adios_simsiam_resnet18", ["data.img_size=32"]))
    assert simsiam.masker.occluder.unet.num_blocks == 4 and not simsiam.args.use_symmetry_mask
    assert "ZeRO-3" in ADIOS.zero_stage_problem(m.args, 3) and ADIOS.zero_stage_problem(m.args, 2) is None
    with pytest.raises(ConfigError, match="ZeRO-3 partitions"):  # refused before any training work
        pretrain(load_config("adios_tiny", ["engine.zero_stage=3"]), out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    sim = build_method(load_config("adios_tiny", ["engine.zero_stage=3", "method_args.mode=simultaneous"]))
    assert ADIOS.zero_stage_problem(sim.args, 3) is None
    with pytest.raises(ValueError, match="masking=adversarial"):
        build_method(load_config("adios_tiny", ["masking=random"]))


def test_visualize_panels():
    m = ADIOS("vit_tiny_patch16", 32, _args("simclr", "simultaneous", "vit", num_masks=3))
    panels = m.visualize(_rand_imgs(2, 32))
    assert list(panels)[:3] == ["original", "mask 0", "hide 0"] and len(panels) == 7
    torch.testing.assert_close(sum(panels[f"mask {k}"] for k in range(3)), torch.ones(2, 32, 32), atol=1e-5,
                               rtol=0)


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    from fastmask.data.embedded import embedded_images
    from fastmask.eval.features import to_model_input

    return to_model_input(embedded_images(count=128, size=32), 32)


def _clean_loss(m: ADIOS, v1: torch.Tensor, v2: torch.Tensor) -> float:
    """The SSL loss with nothing hidden on fixed views: the encoder's objective, free of the adversary."""
    B = v1.shape[0]
    rows = 2 * B if m.args.ssl == "simsiam" else B
    with torch.no_grad():
        return m._ssl(v1, v2, torch.zeros(1, rows, 32, 32)).item()


def _train(photos, model, ssl, mode, steps=20, **kw):
    torch.manual_seed(0)
    m = ADIOS(model, 32, _args(ssl, mode, model, **kw), seed=0)
    # lr 3e-4: at 1e-3 the ViT's clean SimCLR loss rose on 4 of 4 seeds within 20 steps (too hot for batch 8);
    # at 3e-4 every objective x backbone falls on seeds 0-3.
    opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": 0.0} for g in m.param_groups(0.0)],
                            lr=3e-4)
    # Fixed evaluation views, several pairs: one pair's clean loss moves by ~0.2 with the draw alone.
    views = [m.augment.two_views(photos[:32], torch.Generator().manual_seed(123 + i)) for i in range(4)]
    before = sum(_clean_loss(m, v1, v2) for v1, v2 in views) / len(views)
    g = torch.Generator().manual_seed(0)
    outs = []
    for step in range(steps):
        idx = torch.randint(0, len(photos), (8,), generator=g)
        out = m(photos[idx])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        m.post_step(3e-4)  # alternating: the occluder's own step (AdamW, the method's default kind)
        m.on_step_end(step + 1, steps)
        outs.append({k: v.item() for k, v in out.items()})
    after = sum(_clean_loss(m, v1, v2) for v1, v2 in views) / len(views)
    m.eval()
    with torch.no_grad():
        feats = F.normalize(m.online.features(photos[:64]), dim=1)
    return before, after, feats.std(dim=0).mean().item(), outs


# Each SSL objective on each backbone, one mode per backbone (the modes differ only in the occluder's
# update, which tests/test_oracle_adios.py pins down). Keeps the file within CI's budget.
@pytest.mark.slow
@pytest.mark.parametrize("model,mode", [("resnet18", "alternating"), ("vit_tiny_patch16", "simultaneous")])
@pytest.mark.parametrize("ssl", ["simclr", "byol", "simsiam"])
def test_trains_without_collapse(photos, model, ssl, mode):
    before, after, std, outs = _train(photos, model, ssl, mode)
    assert all(math.isfinite(o["loss"]) for o in outs)
    assert after < before, f"clean-view SSL loss did not fall: {before:.4f} -> {after:.4f}"
    # Healthy runs measure 0.047-0.058 here (all six cases); a collapsing encoder falls to about a
    # third of its healthy level (measured on ExtreMA, tests/test_methods_vit.py).
    assert std > 0.025, f"collapsed: per-dim std of normalized features {std:.4f}"
    # The sparsity penalty pulls every slot toward 1/N of the image, away from empty: the smallest
    # slot grows over the run (measured in all six cases, e.g. 0.414 -> 0.454 for ViT + BYOL, which
    # without the penalty shrinks, 0.414 -> 0.408). A softmax's areas in (0, 1) prove nothing.
    assert outs[-1]["mask_area_min"] > outs[0]["mask_area_min"], [o["mask_area_min"] for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize("model,ssl,mode", [("resnet18", "simclr", "simultaneous"),
                                            ("vit_tiny_patch16", "byol", "alternating")])
def test_adios_s_trains(photos, model, ssl, mode):
    before, after, std, outs = _train(photos, model, ssl, mode, single_mask=True, num_masks=3)
    assert after < before and std > 0.01


# ---------------------------------------------------------------------------------------------- engine
ENGINE_RUN = ["method=adios", "model=resnet18", "masking=adversarial", "data.loader=torch",
              "data.img_size=32", "data.batch_size=4", "data.num_workers=0", "engine.log_every=1",
              "engine.optimizer=sgd", "engine.lr=0.05", "engine.warmup_steps=1", "engine.weight_decay=1e-4",
              "method_args.ssl=simclr", "method_args.num_masks=2", "method_args.mask_fbase=8",
              "method_args.unet_norm=gn", "method_args.mask_lr=0.2", "method_args.proj_hidden_dim=32",
              "method_args.proj_output_dim=16", "method_args.small_stem=false",
              "method_args.backbone_args={width: 8}"]


def _run(out, *overrides):
    from fastmask.engine.config import load_config
    from fastmask.engine.trainer import pretrain
    from fastmask.methods import build_method

    made, inputs = [], []

    def factory(cfg):
        m = build_method(cfg)
        m.register_forward_pre_hook(lambda _m, args: inputs.append([tuple(v.shape) for v in args[0]]))
        made.append(m)
        return m

    result = pretrain(load_config(None, [*ENGINE_RUN, *overrides]), out=out, progress=False,
                      method_factory=factory)
    assert inputs and all(views == [(4, 3, 32, 32)] * 2 for views in inputs)  # the loader cut both views
    return result, made[0]


@pytest.mark.slow
def test_alternating_run_stopped_and_resumed_equals_uninterrupted(tmp_path):
    """The occluder's own optimizer (SGD momentum buffers) is saved with the DeepSpeed checkpoint: a run
    stopped after 2 of 4 steps and resumed takes exactly the uninterrupted run's steps, every weight and
    the occluder's optimizer state equal."""
    full, m_full = _run(tmp_path / "a", "engine.steps=4")
    half, _ = _run(tmp_path / "b", "engine.steps=4", "engine.stop_at=2")
    rest, m_rest = _run(tmp_path / "b", "engine.steps=4")
    assert half.step == 2 and rest.resumed_from == 2
    assert [x for x in half.losses + rest.losses] == full.losses  # exact, fp32 on CPU
    a, b = m_full.state_dict(), m_rest.state_dict()
    assert a.keys() == b.keys() and "occluder_opt._extra_state" in a
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
    bufs_a = a["occluder_opt._extra_state"]["optimizer"]["state"]
    bufs_b = b["occluder_opt._extra_state"]["optimizer"]["state"]
    assert bufs_a.keys() == bufs_b.keys() and len(bufs_a) == len(m_full.occluder_opt.params)
    assert all(torch.equal(bufs_a[i]["momentum_buffer"], bufs_b[i]["momentum_buffer"]) for i in bufs_a)
    assert any(bufs_a[i]["momentum_buffer"].any() for i in bufs_a)
