"""The DALI loader on real JPEG files (the embedded sets written into a temp folder), CPU pipeline.

Files: 61 photo crops (128 px, folder `photos/`) + 19 digits (32 px, folders `0/`..`9/`) = 80 JPEGs.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmask.data.embedded import write_image_folder
from fastmask.data.files import CorruptImageError, list_image_files
from fastmask.engine.config import DataConfig

HAVE_DALI = importlib.util.find_spec("nvidia") is not None \
    and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAVE_DALI,
                                reason="nvidia.dali is not importable (pip install fastmask[dali])")
pytestmark = pytest.mark.dali

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])
N_FILES = 80


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Validation cache in a temp folder, so tests never touch ~/.cache."""
    d = tmp_path_factory.mktemp("fastmask-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTMASK_CACHE", str(d))
        yield d


@pytest.fixture(scope="module")
def root(tmp_path_factory, cache):
    r = tmp_path_factory.mktemp("jpegs")
    write_image_folder(r, count=61)
    write_image_folder(r, labeled=True, count=19)
    assert len(list_image_files(r)) == N_FILES
    return r


def cfg(root, **kw) -> DataConfig:
    base = dict(root=str(root), img_size=37, batch_size=8, min_scale=0.2, hflip=True, dali_threads=2,
                loader="dali")
    return DataConfig(**{**base, **kw})


def make(data_cfg, rank=0, world=1, seed=0, views=None):
    from fastmask.data.dali import DaliLoader

    return DaliLoader(data_cfg, rank, world, seed, "cpu", views=views)


def pil_reference(path: str, size: int, flip: bool) -> torch.Tensor:
    """Whole image, bicubic resize, normalized -> [3, size, size] (what min_scale=1 gives on squares)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
    x = (x - MEAN[:, None, None]) / STD[:, None, None]
    return x.flip(-1) if flip else x


@needs_dali
def test_shapes_dtype_and_normalized_range(root):
    loader = make(cfg(root))
    assert loader.batches_per_epoch == N_FILES // 8 == len(loader)
    batches = list(loader.epoch(0))
    assert len(batches) == loader.batches_per_epoch
    for b in batches:
        assert b.shape == (8, 3, 37, 37) and b.dtype == torch.float32 and b.device.type == "cpu"
    x = torch.cat(batches)
    assert torch.isfinite(x).all()
    assert not torch.equal(batches[0], batches[1])  # the iterator does not hand out one reused buffer
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    per_c = x.transpose(0, 1).reshape(3, -1)
    assert (per_c.min(1).values >= lo - 1e-4).all() and (per_c.max(1).values <= hi + 1e-4).all()
    # Per-channel statistics of the normalized crops agree with those of the decoded files.
    from PIL import Image
    pix = np.concatenate([np.asarray(Image.open(f).convert("RGB")).reshape(-1, 3) / 255.0
                          for f in loader.files])
    want_mean = (torch.from_numpy(pix.mean(0)).float() - MEAN) / STD
    want_std = torch.from_numpy(pix.std(0)).float() / STD
    torch.testing.assert_close(per_c.mean(1), want_mean, atol=0.15, rtol=0)
    torch.testing.assert_close(per_c.std(1), want_std, atol=0.15, rtol=0.1)


@needs_dali
def test_two_ranks_get_disjoint_shards_covering_the_set(root):
    c = cfg(root, min_scale=1.0, img_size=24)
    r0, r1 = make(c, 0, 2, seed=3), make(c, 1, 2, seed=3)
    assert r0.batches_per_epoch == r1.batches_per_epoch == N_FILES // 2 // 8
    for epoch in (0, 1):
        f0, f1 = r0.epoch_files(epoch), r1.epoch_files(epoch)
        assert not set(f0) & set(f1)
        assert sorted(f0 + f1) == sorted(r0.files)  # 80 = 2 ranks x 5 batches x 8: nothing dropped
    assert r0.epoch_files(0) != r0.epoch_files(1)  # reshuffled every epoch
    # The pixels each rank yields are the images of its own files, in order, flipped as drawn
    # (all images are square, so min_scale=1 crops the whole image).
    for loader in (r0, r1):
        got = torch.cat(list(loader.epoch(1)))
        _, flips = loader.epoch_params(1)
        want = torch.stack([pil_reference(f, 24, bool(fl)) for f, fl in zip(loader.epoch_files(1), flips)])
        err = (got - want).abs().mean(dim=(1, 2, 3))
        assert err.max() < 0.03, err  # ~0.007 here: decoder and resize filter differ a little from PIL
        assert flips.min() == 0 and flips.max() == 1


@needs_dali
def test_next_epoch_built_ahead_yields_the_same_batches(root):
    c = cfg(root, img_size=21, batch_size=16)
    loader = make(c, seed=8)
    e0 = list(loader.epoch(0))
    assert loader._pending is not None and loader._pending[0] == 1  # built while epoch 0 ended
    e1 = list(loader.epoch(1))  # takes the prebuilt pipeline
    fresh = make(c, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(e1, fresh.epoch(1)))
    assert all(torch.equal(a, b) for a, b in zip(e0, fresh.epoch(0)))
    # A different request than the one built ahead drops it and still gets the right batches.
    list(loader.epoch(1))
    e5 = list(loader.epoch(5, start=1))
    assert all(torch.equal(a, b) for a, b in zip(e5, list(fresh.epoch(5))[1:])) and len(e5) == 4


@needs_dali
def test_random_crops_land_where_drawn(root):
    """Each output is the drawn window (x0, y0, w, h) of its file, resized and flipped as drawn."""
    from PIL import Image

    loader = make(cfg(root, img_size=33, min_scale=0.08), seed=4)
    got = torch.cat(list(loader.epoch(0)))[:24]
    windows, flips = loader.epoch_params(0)
    errs, swapped = [], []
    for k, f in enumerate(loader.epoch_files(0)[:24]):
        x0, y0, w, h = (int(v) for v in windows[k])
        with Image.open(f) as im:
            im = im.convert("RGB")
            ref = [im.resize((33, 33), Image.BICUBIC, box=box) for box in
                   ((x0, y0, x0 + w, y0 + h), (y0, x0, y0 + h, x0 + w))]  # as drawn; axes swapped
        for out, r in zip((errs, swapped), ref):
            x = (torch.from_numpy(np.asarray(r).copy()).permute(2, 0, 1).float() / 255
                 - MEAN[:, None, None]) / STD[:, None, None]
            out.append((got[k] - (x.flip(-1) if flips[k] else x)).abs().mean().item())
    errs, swapped = np.array(errs), np.array(swapped)
    assert errs.max() < 0.03, errs  # DALI and PIL agree to ~0.005 here; a wrong window is > 0.1
    moved = np.abs(windows[:24, 0] - windows[:24, 1]) + np.abs(windows[:24, 2] - windows[:24, 3]) > 8
    assert (swapped[moved] > 2 * errs[moved]).mean() > 0.8  # the check can tell the axes apart


@needs_dali
def test_dali_and_torch_loaders_walk_the_same_files_in_the_same_order(root):
    from fastmask.data.torch_loader import TorchLoader

    for rank in (0, 1):
        c = cfg(root, batch_size=6, num_workers=0)
        d, t = make(c, rank, 2, seed=1), TorchLoader(c, rank, 2, 1, "cpu")
        assert d.batches_per_epoch == t.batches_per_epoch
        assert np.array_equal(d.epoch_indices(3), t.epoch_indices(3))
        assert np.array_equal(d.sample_keys(3), t.sample_keys(3))  # the same draws for the same sample


@needs_dali
def test_uneven_split_drops_the_tail_equally_on_every_rank(root):
    c = cfg(root, batch_size=7)
    loaders = [make(c, r, 3) for r in range(3)]
    assert all(lo.batches_per_epoch == N_FILES // (7 * 3) == 3 for lo in loaders)  # 80 -> 3 x 21, 17 left out
    shards = [set(lo.epoch_files(2)) for lo in loaders]
    assert all(len(s) == 21 for s in shards) and not (shards[0] & shards[1] or shards[1] & shards[2])
    batches = list(loaders[2].epoch(2))
    assert [b.shape[0] for b in batches] == [7, 7, 7]


@needs_dali
def test_start_resumes_bit_exactly_and_seeds_decide(root):
    c = cfg(root, img_size=29)
    loader = make(c, seed=5)
    full = list(loader.epoch(3))
    resumed = list(loader.epoch(3, start=4))
    assert len(resumed) == loader.batches_per_epoch - 4
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a, b)
    assert list(loader.epoch(3, start=loader.batches_per_epoch)) == []
    with pytest.raises(ValueError, match="start"):
        loader.epoch(3, start=loader.batches_per_epoch + 1)
    again = list(make(c, seed=5).epoch(3))
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    other = list(make(c, seed=6).epoch(3))
    assert not torch.equal(full[0], other[0])


@needs_dali
def test_a_step_sees_the_same_samples_and_crops_whatever_the_rank_count(root):
    one = make(cfg(root, batch_size=8), 0, 1, seed=2)
    two = [make(cfg(root, batch_size=4), r, 2, seed=2) for r in (0, 1)]
    assert one.batches_per_epoch == two[0].batches_per_epoch == 10
    b1 = list(one.epoch(4))
    b2 = [list(lo.epoch(4)) for lo in two]
    for t in (0, 7):
        assert torch.equal(b1[t], torch.cat([b2[0][t], b2[1][t]]))


def test_augment_params_depend_only_on_the_sample():
    from fastmask.data.dali import augment_params, keyed_uniforms

    sizes = np.array([[640, 427], [97, 131], [128, 128], [500, 375]])
    idx = np.array([11, 3, 7, 42])
    w, f = augment_params(9, 2, idx, sizes, 0.2, True)
    perm = [2, 0, 3, 1]
    w2, f2 = augment_params(9, 2, idx[perm], sizes[perm], 0.2, True)
    assert np.array_equal(w[perm], w2) and np.array_equal(f[perm], f2)
    assert not np.array_equal(augment_params(9, 3, idx, sizes, 0.2, True)[0], w)  # new epoch, new crops
    assert not augment_params(9, 2, idx, sizes, 0.2, False)[1].any()
    u = keyed_uniforms(0, 0, np.arange(20000), 4)
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12 ** -0.5) < 0.01 and 0 <= u.min() and u.max() < 1
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03


def test_rrc_windows_follow_torchvision_semantics():
    from fastmask.data.dali import rrc_windows

    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(1, 700, 4000), rng.integers(1, 700, 4000)], 1)
    sizes[:5] = [[1, 1], [1000, 3], [3, 1000], [640, 427], [97, 97]]
    win = rrc_windows(sizes, np.random.default_rng(1), scale=(0.2, 1.0))
    x0, y0, w, h = win.T.astype(np.int64)
    W, H = sizes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (w >= 1).all() and (h >= 1).all()
    assert (x0 + w <= W).all() and (y0 + h <= H).all()
    # Images big enough for rounding not to matter, of an aspect the crops can have: area and aspect
    # stay in range (elongated images may fall back to a center crop smaller than min_scale).
    big = (W >= 50) & (H >= 50) & (W / H >= 0.75) & (W / H <= 4 / 3)
    area = (w * h / (W * H))[big]
    aspect = (w / h)[big]
    assert area.min() > 0.2 * 0.9 and area.max() <= 1.0
    assert aspect.min() > 0.75 * 0.95 and aspect.max() < 4 / 3 * 1.05
    assert area.mean() > 0.45 and area.std() > 0.15  # spread over the range, not stuck at a fallback
    # Extreme aspect: no draw fits -> the center crop with aspect clamped to 4/3 (or 3/4).
    assert list(win[1]) == [498, 0, 4, 3] and list(win[2]) == [0, 498, 3, 4]


@needs_dali
def test_file_list_with_relative_paths_and_labels(root, tmp_path):
    files = list_image_files(root)[:20]
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{os.path.relpath(f, tmp_path)} {i % 3}\n" for i, f in enumerate(files)))
    loader = make(cfg(lst, batch_size=6))
    assert loader.files == files and loader.batches_per_epoch == 3
    assert sum(b.shape[0] for b in loader.epoch(0)) == 18


@pytest.fixture()
def corrupt_root(root, tmp_path):
    r = tmp_path / "corrupt"
    shutil.copytree(root, r)
    truncated, garbage = r / "photos" / "00003.jpg", r / "3" / "00003.jpg"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    return r, {str(truncated), str(garbage)}


@needs_dali
def test_corrupt_files_skip_reports_each_path_and_the_epoch_completes(corrupt_root):
    r, bad = corrupt_root
    with pytest.warns(UserWarning, match="skipping 2 of 80") as rec:
        loader = make(cfg(r, on_corrupt="skip", batch_size=13))
    message = str(rec[0].message)
    assert all(p in message for p in bad)
    assert {p for p, _ in loader.skipped} == bad and not bad & set(loader.files)
    assert loader.batches_per_epoch == 78 // 13
    assert len(list(loader.epoch(0))) == 6
    # The second time the validation comes from the cache and says the same.
    with pytest.warns(UserWarning, match="skipping 2 of 80"):
        assert make(cfg(r, on_corrupt="skip", batch_size=13)).files == loader.files


@needs_dali
def test_corrupt_files_fail_before_iteration_naming_them(corrupt_root):
    r, bad = corrupt_root
    with pytest.raises(CorruptImageError, match="on_corrupt=fail") as e:
        make(cfg(r, on_corrupt="fail"))
    assert all(p in str(e.value) for p in bad)


@needs_dali
def test_changed_file_is_validated_again(root, tmp_path):
    r = tmp_path / "copy"
    shutil.copytree(root, r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(cfg(r))  # clean: no warning, cache written
    victim = r / "7" / "00007.jpg"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.warns(UserWarning, match=str(victim)):
        make(cfg(r))


@needs_dali
def test_too_few_images_for_one_batch_is_a_clear_error(root):
    with pytest.raises(ValueError, match="do not fill one global batch"):
        make(cfg(root, batch_size=41), 0, 2)


def test_missing_dali_is_a_clear_error_before_any_work(monkeypatch, tmp_path):
    from fastmask.data import dali

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` raise ImportError
    missing = DataConfig(root=str(tmp_path / "does-not-exist"))
    with pytest.raises(ImportError, match=r"pip install fastmask\[dali\]"):
        dali.DaliLoader(missing, 0, 1, 0, "cpu")


@pytest.mark.slow
@needs_dali
def test_pretrain_with_dali_trains_end_to_end(root, cache, tmp_path):
    """`fastmask pretrain data.loader=dali --steps 5` on CPU (default recipe: MAE ViT-Tiny), in a subprocess
    because DeepSpeed initializes process-wide state."""
    import json
    import subprocess

    if importlib.util.find_spec("fastmask.engine.pretrain") is None:
        pytest.skip("the engine (fastmask.engine.pretrain) is not in the tree yet")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastmask.cli", "pretrain", "data.loader=dali", f"data.root={root}",
           "data.batch_size=8", "data.img_size=32", "engine.log_every=1", "--steps", "5", "--out", str(out)]
    env = {**os.environ, "FASTMASK_CACHE": str(cache)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import yaml
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["loader"] == "dali"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) for r in rows)


@needs_dali
def test_loader_bench_runs_both_loaders_side_by_side(root, tmp_path, capsys):
    import argparse

    from fastmask.bench.loader import add_loader_arguments, run_loader_bench

    parser = argparse.ArgumentParser()
    add_loader_arguments(parser)
    out = tmp_path / "lb.json"
    args = parser.parse_args(["--root", str(root), "--img-size", "32", "--batch-size", "8", "--threads", "1",
                              "--workers", "0", "--device", "cpu", "--warmup", "1", "--batches", "2",
                              "--repeats", "2", "--out", str(out)])
    res = run_loader_bench(args)
    assert set(res["results"]) == {"dali", "torch"}
    for r in res["results"].values():
        assert r["shape"] == [8, 3, 32, 32] and r["dtype"] == "float32" and len(r["runs_images_per_s"]) == 2
        assert r["images_per_s"] > 0
    assert res["ratio_dali_over_torch"] > 0 and res["versions"]["nvidia-dali"]
    assert "DALI / torch" in capsys.readouterr().out
    import json
    assert json.loads(out.read_text())["device"] == "cpu"


@needs_dali
@pytest.mark.parametrize("on_corrupt,pos", [("skip", 23), ("skip", 1), ("fail", 23)])
def test_file_broken_after_the_check_is_named_and_handled_mid_epoch(root, tmp_path, on_corrupt, pos):
    r = tmp_path / "later"
    shutil.copytree(root, r)
    loader = make(cfg(r, on_corrupt=on_corrupt, batch_size=10))
    victim = loader.epoch_files(0)[pos]  # in batch pos // 10
    st = os.stat(victim)
    # Same size and mtime: the validation cache cannot notice; only DALI's decoder can.
    Path(victim).write_bytes(np.random.default_rng(1).integers(0, 256, st.st_size, dtype=np.uint8).tobytes())
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    if on_corrupt == "fail":
        with pytest.raises(CorruptImageError, match=victim):
            list(loader.epoch(0))
        return
    with pytest.warns(UserWarning, match=victim):
        batches = list(loader.epoch(0))
    assert [b.shape[0] for b in batches] == [10] * loader.batches_per_epoch
    assert victim in {p for p, _ in loader.skipped}
    ok = list(make(cfg(root, batch_size=10)).epoch(0))  # the same epoch from the intact files
    assert torch.equal(batches[-1], ok[-1])
    hit = pos // 10
    assert torch.equal(batches[hit][:pos % 10], ok[hit][:pos % 10]) and not torch.equal(batches[hit], ok[hit])


def _views():
    from fastmask.data import ViewSpec

    return [ViewSpec(24, (0.3, 1.0)), ViewSpec(24, (0.3, 1.0)), ViewSpec(12, (0.05, 0.4), hflip=False)]


@needs_dali
def test_views_are_cut_from_the_original_where_drawn_as_the_torch_loader_cuts_them(root):
    """Each view is its window of the full-resolution file (the torch loader's windows, PIL's pixels to
    DALI's resampling error), not a piece of an already-resized crop."""
    from fastmask.data.torch_loader import TorchLoader

    c = cfg(root, img_size=16, batch_size=8, num_workers=0)
    dali, pil = make(c, seed=4, views=_views()), TorchLoader(c, 0, 1, 4, "cpu", views=_views())
    got, ref = next(iter(dali.epoch(2))), next(iter(pil.epoch(2)))
    assert [tuple(v.shape) for v in got] == [(8, 3, 24, 24), (8, 3, 24, 24), (8, 3, 12, 12)]
    assert dali.epoch_files(2)[:8] == [pil._files[i] for i in pil.epoch_indices(2)[0]]
    windows, flips = dali.epoch_params(2)
    assert windows.shape == (N_FILES // 8 * 8, 3, 4) and flips.shape == (N_FILES // 8 * 8, 3)
    for v in range(3):
        err = (got[v] - ref[v]).abs().mean(dim=(1, 2, 3))
        assert err.max() < 0.03, err                                   # DALI vs PIL on the same window
        assert (got[v] - ref[v].roll(1, 0)).abs().mean() > 0.1         # and the check tells samples apart
    assert not flips[:, 2].any() and flips[:, :2].any()


@needs_dali
def test_views_resume_bit_exactly(root):
    c = cfg(root, img_size=16)
    loader = make(c, seed=5, views=_views())
    full = list(loader.epoch(1))
    resumed = list(loader.epoch(1, start=7))
    assert len(resumed) == loader.batches_per_epoch - 7 == 3
    for a, b in zip(full[7:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
