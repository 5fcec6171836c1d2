"""The generated shapes set: deterministic per (seed, split, index), labelled by the shape alone,
cached atomically, and readable by the file loaders as `data.dataset=shapes`."""
from __future__ import annotations

import numpy as np
import pytest

from fastmask.data import shapes


def test_images_are_deterministic_per_split_and_index():
    a = shapes.shapes_image(0, "test", 7)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, shapes.shapes_image(0, "test", 7))        # same key, same image
    assert not np.array_equal(a, shapes.shapes_image(0, "train", 7))   # splits draw disjoint streams
    assert not np.array_equal(a, shapes.shapes_image(1, "test", 7))    # and seeds
    assert not np.array_equal(a, shapes.shapes_image(0, "test", 17))   # same class, another image
    assert a.std() > 20                                                 # a picture, not a flat field
    assert shapes.shapes_image(0, "test", 3, size=40).shape == (40, 40, 3)


def test_the_shape_mask_marks_the_labelled_shape():
    """Inside the mask the image is the shape's one colour (plus the pixel noise, std <= 0.04); just
    outside it, it is not. Diagnostics use the mask to see where a method looks."""
    for index in range(8):
        img, m = shapes.shapes_image_and_mask(0, "pretrain", index)
        assert np.array_equal(img, shapes.shapes_image(0, "pretrain", index))
        assert m.shape == (64, 64) and m.dtype == np.float32 and 0.02 < m.mean() < 0.6
        x = img.astype(np.float32) / 255
        inside, edge = x[m > 0.999], x[(m < 0.001) & (np.abs(np.gradient(m)).sum(0) > 0)]
        assert inside.std(0).max() < 0.06                                # one flat colour
        fg = inside.mean(0)
        assert np.linalg.norm(edge - fg, axis=1).mean() > 0.2            # what it covers differs


def test_pixels_do_not_give_the_class_away():
    """Colours, backgrounds and clutter are drawn independently of the label, so a k-NN on raw
    pixels stays near chance (10%; measured 9-16% over three seeds at this size). A generator
    that coloured, placed or backed the shapes by class would score far higher."""
    import torch

    from fastmask.eval.features import to_model_input
    from fastmask.eval.knn import knn_accuracy

    xtr, ytr = shapes.shapes_set("train", 400, 32, cache=False)
    xte, yte = shapes.shapes_set("test", 200, 32, cache=False)
    assert np.array_equal(np.bincount(ytr), [40] * len(shapes.CLASSES))
    acc = knn_accuracy(to_model_input(xtr, 32).flatten(1), torch.as_tensor(ytr),
                       to_model_input(xte, 32).flatten(1), torch.as_tensor(yte), k=20, num_classes=10)
    assert acc < 0.25


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="split must be one of"):
        shapes.shapes_image(0, "val", 0)
    with pytest.raises(ValueError, match="size must be >= 16"):
        shapes.shapes_image(0, "test", 0, size=8)


def test_labelled_sets_are_cached_in_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_CACHE", str(tmp_path))
    shapes.shapes_set.cache_clear()
    imgs, labels = shapes.shapes_set("test", 12, 32)
    files = list(tmp_path.glob("shapes-test-*.npy"))
    assert len(files) == 1 and f"v{shapes.VERSION}" in files[0].name
    assert np.array_equal(np.load(files[0]), imgs)
    assert np.array_equal(imgs[5], shapes.shapes_image(0, "test", 5, 32))
    assert labels.tolist() == [i % 10 for i in range(12)]
    shapes.shapes_set.cache_clear()


def test_loader_reads_the_unlabelled_split_as_data_dataset_shapes(tmp_path, monkeypatch):
    from fastmask.data import build_loader
    from fastmask.engine.config import ConfigError, DataConfig, load_config

    monkeypatch.setenv("FASTMASK_CACHE", str(tmp_path))
    monkeypatch.setattr(shapes, "PRETRAIN_COUNT", 24)
    cfg = DataConfig(loader="torch", dataset="shapes", img_size=32, batch_size=8, num_workers=0,
                     min_scale=1.0, hflip=False)
    loader = build_loader(cfg, seed=0)
    assert loader.num_samples == 24 and loader.batches_per_epoch == 3
    root = next(tmp_path.glob("shapes-pretrain-24x64-*"))
    assert len(list((root / "images").glob("*.jpg"))) == 24
    x = next(iter(loader.epoch(0)))
    assert x.shape == (8, 3, 32, 32) and x.std() > 0.3
    assert load_config("mae_tiny", ["data.dataset=shapes"]).data.dataset == "shapes"
    with pytest.raises(ConfigError, match="data.dataset must be photos|shapes"):
        load_config("mae_tiny", ["data.dataset=cifar"])
