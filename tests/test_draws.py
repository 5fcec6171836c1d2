"""Per-sample keyed draws (fastmask.draws): a sample's random numbers depend on its key alone, so
masks and views do not change with the batch split, the rank or a resume."""
import dataclasses

import numpy as np
import pytest
import torch

from fastmask.draws import Draws, mix64
from fastmask.masking import build_masker


def _keys(*values):
    return torch.tensor(values, dtype=torch.int64)


def test_a_row_depends_only_on_its_key():
    keys = torch.arange(100, 116, dtype=torch.int64)
    full = Draws(keys, seed=7)
    a, b = full.uniform(5, 3), full.uniform(7)
    # the same samples in another batch, another order, another split: the same numbers per sample
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    part = Draws(keys[perm][:9], seed=7)
    assert torch.equal(part.uniform(5, 3), a[perm][:9])
    assert torch.equal(part.uniform(7), b[perm][:9])
    assert not torch.equal(a.flatten(1)[:, :7], b)             # successive calls differ
    assert not torch.equal(Draws(keys, seed=8).uniform(7), Draws(keys, seed=7).uniform(7))  # the seed matters


def test_uniforms_are_uniform_and_independent():
    u = Draws(torch.arange(20000, dtype=torch.int64), seed=1).uniform(64)
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 2e-3 and abs(u.var().item() - 1 / 12) < 1e-3
    hist = torch.histc(u, 50, 0, 1) / u.numel() * 50
    assert hist.min() > 0.97 and hist.max() < 1.03
    rows = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]   # neighbouring keys
    cols = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]
    assert abs(rows) < 5e-3 and abs(cols) < 5e-3
    n = Draws(torch.arange(20000, dtype=torch.int64)).normal(8)
    assert abs(n.mean().item()) < 0.01 and abs(n.std().item() - 1) < 0.01


def test_large_keys_do_not_overflow_and_stay_distinct():
    keys = _keys(0, 1, 2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**62 - 1, 2**62 - 2)
    u = Draws(keys).uniform(32)
    assert torch.isfinite(u).all() and 0 <= u.min() and u.max() < 1
    assert len({tuple(r.tolist()) for r in u}) == len(keys)


def test_child_streams_are_independent_of_each_other():
    keys = torch.arange(8, dtype=torch.int64)
    d1 = Draws(keys, 3)
    m1 = d1.child("mask").uniform(10)
    d2 = Draws(keys, 3)
    d2.child("views").uniform(12)        # another component draws first
    assert torch.equal(d2.child("mask").uniform(10), m1)
    assert not torch.equal(Draws(keys, 3).child("views").uniform(10), m1)


def test_repeat_lays_copies_out_like_tensor_repeat():
    keys = torch.arange(5, dtype=torch.int64)
    r = Draws(keys, 0).repeat(3).uniform(4)                        # [3*5, 4], row k*5 + b
    sub = Draws(keys[2:4], 0).repeat(3).uniform(4)
    assert r.shape == (15, 4)
    for k in range(3):
        assert torch.equal(sub[2 * k:2 * k + 2], r[5 * k + 2:5 * k + 4])
    assert len({tuple(x.tolist()) for x in r}) == 15


def test_randint_and_bernoulli_ranges():
    d = Draws(torch.arange(4000, dtype=torch.int64))
    r = d.randint(6, 3)
    assert r.min() == 0 and r.max() == 5 and torch.bincount(r.flatten()).min() > 1800
    assert abs(d.bernoulli(0.3, 10).float().mean().item() - 0.3) < 0.01


def test_from_generator_is_reproducible():
    a = Draws.from_generator(6, torch.Generator().manual_seed(4)).uniform(3)
    b = Draws.from_generator(6, torch.Generator().manual_seed(4)).uniform(3)
    assert torch.equal(a, b)
    assert mix64(1, 2) != mix64(2, 1) and mix64(1, 2) == mix64(1, 2)


@pytest.mark.parametrize("name,kw", [("random", {}), ("block", {"min_num_patches": 4}),
                                     ("multi", {"num_masks": 2})])
def test_masks_are_the_same_whatever_the_batch_split(name, kw):
    masker = build_masker(name, mask_ratio=0.75 if name != "multi" else 0.5, **kw)
    keys = torch.arange(1000, 1012, dtype=torch.int64)
    whole = masker(12, (6, 6), draws=Draws(keys, 5))
    halves = [masker(6, (6, 6), draws=Draws(k, 5)) for k in keys.split(6)]
    if name == "multi":  # rows m*B + b: compare per mask copy
        for m in range(2):
            got = torch.cat([h.mask[6 * m:6 * (m + 1)] for h in halves])
            assert torch.equal(got, whole.mask[12 * m:12 * (m + 1)])
    else:
        assert torch.equal(torch.cat([h.mask for h in halves]), whole.mask)
        assert torch.equal(torch.cat([h.ids_keep for h in halves]), whole.ids_keep)
    assert len({tuple(r.tolist()) for r in whole.mask}) > 1


def test_views_are_the_same_whatever_the_batch_split():
    from fastmask.methods.views import ViewAugment

    aug = ViewAugment(crop_scale=(0.3, 1.0), solarize_p=0.3)
    imgs = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    keys = torch.arange(8, dtype=torch.int64) * 97
    v1, v2 = aug.two_views(imgs, draws=Draws(keys, 1))
    parts = [aug.two_views(imgs[i:i + 4], draws=Draws(keys[i:i + 4], 1)) for i in (0, 4)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), v1, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), v2, rtol=0, atol=1e-6)
    assert not torch.allclose(v1, v2)


def test_extrema_loss_of_a_batch_is_the_mean_of_its_halves():
    """World-size invariance at the method level: a batch of 8 (one rank) and two batches of 4 (two
    ranks) with the same sample keys give the same masks and views, so the loss of the 8 is the
    mean of the two halves' losses (BYOL is a per-sample mean)."""
    from fastmask.methods.extrema import ExtreMA

    torch.manual_seed(0)
    m = ExtreMA(model="vit_tiny_patch16", img_size=32, mask_ratio=0.5, num_masks=2, proj_hidden_dim=32,
                proj_dim=16, pred_hidden_dim=32, drop_path_rate=0.0).eval()
    imgs = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    keys = torch.arange(40, 48, dtype=torch.int64)
    with torch.no_grad():
        whole = m(imgs, keys=keys)["loss"]
        halves = [m(imgs[i:i + 4], keys=keys[i:i + 4])["loss"] for i in (0, 4)]
        other = m(imgs, keys=keys + 8)["loss"]
    torch.testing.assert_close(whole, (halves[0] + halves[1]) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(whole, other)   # the keys do decide the draws


def test_loader_keys_are_world_size_invariant():
    from fastmask.data import build_loader
    from fastmask.engine.config import DataConfig

    cfg = DataConfig(img_size=32, batch_size=8, num_workers=0, loader="torch")
    one = build_loader(cfg, 0, 1, seed=3).sample_keys(2)                               # [T, 8]
    two = [build_loader(dataclasses.replace(cfg, batch_size=4), r, 2, seed=3).sample_keys(2) for r in (0, 1)]
    assert one.dtype == np.int64 and one.shape[1] == 8
    assert np.array_equal(np.concatenate(two, axis=1), one)
    n = build_loader(cfg, 0, 1, seed=3).num_samples
    assert (one // n == 2).all()                                                      # epoch * N + index
    assert len(np.unique(one)) == one.size
