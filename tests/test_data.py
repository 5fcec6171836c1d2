"""Loaders: the protocol, determinism and exact restart, disjoint rank shards, corrupt files, synthetic
data."""
import itertools
import warnings

import numpy as np
import pytest
import torch

from fastmask.data import Loader, ViewSpec, build_loader, resolve_loader_name
from fastmask.data.embedded import write_image_folder
from fastmask.data.files import CorruptImageError
from fastmask.data.synthetic import SyntheticLoader
from fastmask.data.torch_loader import TorchLoader
from fastmask.engine.config import DataConfig


def _cfg(**kw):
    base = dict(loader="torch", img_size=24, batch_size=5, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """23 JPEGs (a count that no batch divides) plus one garbage file and one truncated JPEG."""
    root = write_image_folder(tmp_path_factory.mktemp("imgs"), count=23)
    bad = root / "photos"
    (bad / "zz_garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    good = (bad / "00001.jpg").read_bytes()
    (bad / "zz_truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def test_embedded_batches_are_normalized_images():
    loader = build_loader(_cfg(img_size=33, batch_size=7), 0, 1, seed=0, device="cpu")
    assert isinstance(loader, TorchLoader) and isinstance(loader, Loader)
    assert loader.batches_per_epoch == 512 // 7
    batches = list(loader.epoch(0, start=loader.batches_per_epoch - 3))
    assert len(batches) == 3
    x = batches[0]
    assert x.shape == (7, 3, 33, 33) and x.dtype == torch.float32
    assert x.abs().sum() > 0 and x.std() > 0.3 and abs(x.mean()) < 1.5
    # Within the range ImageNet normalization of [0, 1] pixels gives.
    assert x.min() >= (0 - 0.485) / 0.229 - 1e-4 and x.max() <= (1 - 0.406) / 0.225 + 1e-4


def test_restart_at_a_batch_continues_exactly_and_epochs_differ():
    a = TorchLoader(_cfg(), seed=3)
    full = list(a.epoch(1))
    tail = list(TorchLoader(_cfg(num_workers=2), seed=3).epoch(1, start=len(full) - 4))
    assert len(tail) == 4
    for x, y in zip(full[-4:], tail):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    other = next(iter(a.epoch(2)))
    assert not torch.equal(full[0], other)
    assert not torch.equal(next(iter(TorchLoader(_cfg(), seed=4).epoch(1))), full[0])


def test_ranks_are_disjoint_and_their_union_is_the_one_rank_batch():
    one = TorchLoader(_cfg(batch_size=6), 0, 1, seed=1)
    two = [TorchLoader(_cfg(batch_size=3), r, 2, seed=1) for r in range(2)]
    assert two[0].batches_per_epoch == two[1].batches_per_epoch == one.batches_per_epoch
    idx = [t.epoch_indices(0) for t in two]
    assert not set(idx[0].ravel()) & set(idx[1].ravel())
    np.testing.assert_array_equal(np.concatenate(idx, axis=1), one.epoch_indices(0))
    b1 = next(iter(one.epoch(0)))
    b2 = torch.cat([next(iter(t.epoch(0))) for t in two])
    torch.testing.assert_close(b1, b2, rtol=0, atol=0)  # per-sample augmentation: same pixels


def test_drop_last_and_too_few_images(folder):
    cfg = _cfg(root=str(folder), batch_size=4, on_corrupt="skip")
    with pytest.warns(UserWarning):
        loader = TorchLoader(cfg, 1, 2)
    assert loader.num_samples == 23 and loader.batches_per_epoch == 23 // 8
    assert all(x.shape == (4, 3, 24, 24) for x in loader.epoch(0))
    with pytest.raises(ValueError, match="do not fill one global batch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        TorchLoader(_cfg(root=str(folder), batch_size=20, on_corrupt="skip"), 0, 2)


def test_corrupt_files_fail_before_training_naming_them(folder):
    with pytest.raises(CorruptImageError) as ei:
        build_loader(_cfg(root=str(folder), on_corrupt="fail"))
    assert "zz_garbage.jpg" in str(ei.value) and "zz_truncated.jpg" in str(ei.value)


def test_corrupt_files_skipped_with_a_warning_naming_them(folder):
    with pytest.warns(UserWarning) as record:
        loader = build_loader(_cfg(root=str(folder), on_corrupt="skip"))
    text = " ".join(str(w.message) for w in record)
    assert "zz_garbage.jpg" in text and "zz_truncated.jpg" in text
    assert sorted(p.rsplit("/", 1)[1] for p, _ in loader.skipped) == ["zz_garbage.jpg", "zz_truncated.jpg"]
    assert sum(1 for _ in loader.epoch(0)) == loader.batches_per_epoch == 4


def test_file_broken_after_the_check_is_skipped_mid_epoch(tmp_path):
    root = write_image_folder(tmp_path / "imgs", count=12)
    loader = TorchLoader(_cfg(root=str(root), batch_size=4, on_corrupt="skip"), seed=0)
    victim = loader._files[int(loader.epoch_indices(0)[1, 2])]
    with open(victim, "wb") as f:
        f.write(b"\xff\xd8broken")
    with pytest.warns(UserWarning, match=victim.rsplit("/", 1)[1]):
        batches = list(loader.epoch(0))
    assert len(batches) == 3 and all(b.shape == (4, 3, 24, 24) for b in batches)
    loader.cfg.on_corrupt = "fail"
    with pytest.raises(RuntimeError, match="cannot decode image"):
        list(loader.epoch(0))


def test_synthetic_loader():
    cfg = _cfg(loader="synthetic", img_size=40, batch_size=3, synthetic_size=30)
    loader = build_loader(cfg, 1, 2, seed=5)
    assert isinstance(loader, SyntheticLoader) and isinstance(loader, Loader)
    assert loader.batches_per_epoch == 5
    xs = list(loader.epoch(0))
    assert len(xs) == 5 and xs[0].shape == (3, 3, 40, 40) and xs[0].dtype == torch.float32
    assert xs[0].abs().min() >= 0 and xs[0].abs().sum() > 0 and 0.5 < xs[0].std() < 2.0
    assert not torch.equal(xs[0], xs[1])
    again = list(SyntheticLoader(cfg, 1, 2, seed=5).epoch(0, start=2))
    for x, y in zip(xs[2:], again):
        assert torch.equal(x, y)
    assert not torch.equal(xs[0], next(iter(SyntheticLoader(cfg, 0, 2, seed=5).epoch(0))))


def test_loader_name_resolution():
    assert resolve_loader_name("auto", "cpu") == "torch"
    assert resolve_loader_name("synthetic", "cpu") == "synthetic"
    with pytest.raises(ValueError, match="data.loader"):
        build_loader(_cfg(loader="nope"))
    with pytest.raises(ValueError, match="start must be in"):
        TorchLoader(_cfg()).epoch(0, start=10_000)


# ---------------------------------------------------------------- views cut from the full-resolution image
_VIEWS = [ViewSpec(24, (1.0, 1.0), ratio=(1.0, 1.0), hflip=False), ViewSpec(12, (0.05, 0.4))]


def _pil_view(path, window, size, flip) -> torch.Tensor:
    """The window (x0, y0, w, h) of the original file, bicubic to size, maybe flipped: uint8 [S, S, 3]."""
    from PIL import Image

    x0, y0, w, h = (int(v) for v in window)
    with Image.open(path) as im:
        out = im.convert("RGB").resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + w, y0 + h))
    x = torch.from_numpy(np.asarray(out).copy())
    return x.flip(1) if flip else x


def test_views_are_cut_from_the_original_image_where_drawn(folder):
    from fastmask.data.dali import view_params

    with pytest.warns(UserWarning):  # the folder's two corrupt files
        loader = TorchLoader(_cfg(root=str(folder), batch_size=4, img_size=16), seed=3, views=_VIEWS)
    batch = next(iter(loader.epoch(1)))
    assert [tuple(v.shape) for v in batch] == [(4, 3, 24, 24), (4, 3, 12, 12)]
    idx = loader.epoch_indices(1)[0]
    windows, flips = view_params(3, 1, idx, loader._sizes[idx], _VIEWS)
    assert windows.shape == (4, 2, 4) and flips.shape == (4, 2)
    assert (windows[:, 0, 2:] == loader._sizes[idx]).all()    # scale 1, ratio 1 on squares: the whole image
    assert (windows[:, 1, 2] * windows[:, 1, 3] < 0.45 * loader._sizes[idx].prod(1)).all()  # local: <= 40 %
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    for v, spec in enumerate(_VIEWS):
        ref = torch.stack([_pil_view(loader._files[i], windows[k, v], spec.size, flips[k, v])
                           for k, i in enumerate(idx)]).permute(0, 3, 1, 2).float()
        torch.testing.assert_close(batch[v], (ref - mean) / std, rtol=0, atol=1e-5)  # the same PIL ops: exact


def test_views_restart_exactly_and_a_global_batch_is_the_same_on_any_rank_count():
    one = TorchLoader(_cfg(batch_size=6), 0, 1, seed=1, views=_VIEWS)
    two = [TorchLoader(_cfg(batch_size=3), r, 2, seed=1, views=_VIEWS) for r in range(2)]
    full = list(itertools.islice(one.epoch(2), 3))
    other = TorchLoader(_cfg(batch_size=6, num_workers=2), 0, 1, seed=1, views=_VIEWS)  # worker processes
    tail = next(iter(other.epoch(2, start=2)))
    assert all(torch.equal(a, b) for a, b in zip(full[2], tail))
    halves = [next(iter(t.epoch(2))) for t in two]
    for v in range(len(_VIEWS)):
        assert torch.equal(full[0][v], torch.cat([halves[0][v], halves[1][v]]))
    assert not torch.equal(full[0][1], full[1][1])


def test_bad_view_specs_are_one_clear_error_before_any_work():
    with pytest.raises(ValueError, match=r"view 0: scale .* view 1: size"):
        TorchLoader(_cfg(), views=[ViewSpec(8, (0.5, 0.2)), ViewSpec(0, (0.1, 1.0))])
    with pytest.raises(ValueError, match="at least one ViewSpec"):
        build_loader(_cfg(), views=[])
