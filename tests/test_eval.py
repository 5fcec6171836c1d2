"""fastmask eval: k-NN and linear probe on hand-made features, data splits and folders, checkpoint
loading, and the CLI end to end on a briefly trained MAE."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from fastmask.eval.features import (extract_features, fixed_split, image_folder_set, to_model_input)
from fastmask.eval.knn import knn_accuracy, knn_predict
from fastmask.eval.linear import LinearProbe, ProbeArgs, linear_probe_accuracy
from fastmask.eval.load import CheckpointError, load_encoder, read_state_dict, resolve_weights


def test_knn_weighted_vote_by_hand():
    # Train points on the unit circle; the test point at angle 0.
    ang = torch.tensor([0.1, 0.2, 1.4, 1.5, 1.6])
    # norms vary
    train = torch.stack([ang.cos(), ang.sin()], 1) * torch.tensor([[3.0], [0.5], [2.0], [1.0], [7.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    # k = 5: class 1 has three votes, but each weighs exp(cos/T) with cos ~ 0.17, 0.07, -0.03 against
    # exp(cos 0.1 / T), exp(cos 0.2 / T) for class 0: with T = 0.07 class 0 wins by far.
    assert knn_predict(train, labels, test, k=5, temperature=0.07).tolist() == [0]
    w0 = (torch.cos(ang[:2]) / 0.07).exp().sum()
    w1 = (torch.cos(ang[2:]) / 0.07).exp().sum()
    assert w0 > w1
    # A huge temperature makes it a plain majority vote: class 1.
    assert knn_predict(train, labels, test, k=5, temperature=1e6).tolist() == [1]
    # k = 1 is the nearest neighbour; k beyond N is capped.
    assert knn_predict(train, labels, torch.tensor([[0.0, 1.0]]), k=1).tolist() == [1]
    assert knn_predict(train, labels, test, k=50, temperature=0.07).tolist() == [0]


def test_knn_on_blobs_and_bad_input():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(7, 33, generator=g) * 3
    y = torch.randint(0, 7, (301,), generator=g)
    x = centers[y] + torch.randn(301, 33, generator=g)
    acc = knn_accuracy(x[:250], y[:250], x[250:], y[250:], k=11, num_classes=7)
    assert acc > 0.95
    with pytest.raises(ValueError, match="features must be"):
        knn_predict(x[:10], y[:10], x[:5, :7])
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(x[:10], y[:10], x[:5], k=0)


def test_linear_probe_learns_separable_classes_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 29, generator=g)
    x = torch.randn(600, 29, generator=g) * 4 + 10  # far from zero mean: BatchNorm handles it
    y = (x @ w.T).argmax(1)
    args = ProbeArgs(epochs=40, batch_size=64, lr=1e-2)
    acc = linear_probe_accuracy(x[:500], y[:500], x[500:], y[500:], 5, args)
    assert acc > 0.9
    assert linear_probe_accuracy(x[:500], y[:500], x[500:], y[500:], 5, args) == acc
    probe = LinearProbe(29, 5)
    assert not probe.norm.affine and probe.norm.eps == 1e-6


def test_fixed_split_is_stratified_disjoint_and_fixed():
    labels = np.repeat(np.arange(4), [10, 11, 5, 23])
    tr, te = fixed_split(labels, 0.2)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(labels)
    assert np.array_equal(np.bincount(labels[te]), [2, 2, 1, 5])
    tr2, te2 = fixed_split(labels, 0.2)
    assert np.array_equal(te, te2)
    with pytest.raises(ValueError):
        fixed_split(labels, 1.0)


def test_image_folder_set_reads_classes_and_names_bad_files(tmp_path):
    from fastmask.data.embedded import write_image_folder

    root = write_image_folder(tmp_path / "digits", labeled=True, count=40)
    imgs, labels, classes = image_folder_set(root, size=24)
    assert imgs.shape == (40, 24, 24, 3) and imgs.dtype == np.uint8
    assert classes == sorted(classes) and len(classes) == len(np.unique(labels))
    assert imgs.std() > 10  # real pictures, not blank
    (root / classes[0] / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        image_folder_set(root, size=24)


def test_to_model_input_normalizes_and_resizes():
    imgs = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    x = to_model_input(imgs, 32)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    white = to_model_input(np.full((1, 8, 8, 3), 255, np.uint8), 8)
    torch.testing.assert_close(white[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) /
                               torch.tensor([0.229, 0.224, 0.225]))
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(imgs.astype(np.float32), 32)


def test_extract_features_pools_and_restores_mode():
    from fastmask.models import create_model

    enc = create_model("vit_tiny_patch16", img_size=32).train()
    x = torch.randn(5, 3, 32, 32)
    cls = extract_features(enc, x, "cls", batch_size=2)
    mean = extract_features(enc, x, "mean", batch_size=3)
    with torch.no_grad():
        tokens = enc.eval().forward_features(x)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(mean, tokens[:, 1:].mean(1))
    both = extract_features(enc, x, ("cls", "mean"), batch_size=2)  # one pass, both pools
    assert isinstance(both, tuple) and len(both) == 2
    torch.testing.assert_close(both[0], cls)
    torch.testing.assert_close(both[1], mean)
    enc.train()
    extract_features(enc, x[:1])
    assert enc.training
    with pytest.raises(ValueError, match="pool"):
        extract_features(enc, x, "max")


TINY_OVERRIDES = ["model=vit_tiny_patch16", "data.img_size=32", "method_args.decoder_embed_dim=64",
                  "method_args.decoder_depth=1", "method_args.decoder_num_heads=4"]


@pytest.mark.slow
def test_eval_of_engine_run_folder(tmp_path):
    """`fastmask pretrain` a few dozen steps (DeepSpeed engine, embedded photos), then `fastmask eval`
    and `fastmask visualize` straight from the run folder. The CLI's numbers must be the k-NN and
    probe of the run's own weights, recomputed here; whether training helps is tests/test_learning.py's
    question (24 steps on photos do not move digits, which a random encoder already gets ~90% right)."""
    from fastmask.cli import main
    from fastmask.engine.export import consolidated_state_dict

    run = tmp_path / "run"
    assert main(["pretrain", "--config", "mae_tiny", "--steps", "24", "--out", str(run), "data.img_size=32",
                 "engine.checkpoint_every=0", "engine.log_every=8"]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--data", "digits", "--probe-epochs", "20", "--out",
                 str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["model"] == "vit_tiny_patch16" and r["img_size"] == 32 \
        and r["data"].startswith("embedded digits")
    enc, _ = load_encoder(run)
    state = consolidated_state_dict(run)
    torch.testing.assert_close(enc.state_dict()["blocks.0.attn.qkv.weight"],
                               state["blocks.0.attn.qkv.weight"])
    from fastmask.eval.cli import load_labeled

    xtr, ytr, xte, yte, _, _ = load_labeled("digits", 0.2)
    ftr, fte = extract_features(enc, to_model_input(xtr, 32)), extract_features(enc, to_model_input(xte, 32))
    ytr, yte = torch.as_tensor(ytr), torch.as_tensor(yte)
    assert r["knn_top1"] == knn_accuracy(ftr, ytr, fte, yte, k=20, temperature=0.07, num_classes=10)
    assert r["linear_top1"] == linear_probe_accuracy(ftr, ytr, fte, yte, 10, ProbeArgs(epochs=20))
    assert main(["visualize", "--checkpoint", str(run), "--images", "2", "--out",
                 str(tmp_path / "g.png")]) == 0


def test_load_encoder_errors_and_encoder_only_files(tmp_path):
    from fastmask.engine.config import load_config, to_dict
    from fastmask.models import create_model

    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_weights(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_weights(tmp_path / "empty")
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        read_state_dict(tmp_path / "bad.pt")
    # An exported encoder (timm names, DDP prefix) plus a config: loads into a plain ViT.
    enc = create_model("vit_tiny_patch16", img_size=32)
    folder = tmp_path / "enc"
    folder.mkdir()
    torch.save({"module." + k: v for k, v in enc.state_dict().items()}, folder / "encoder.pth")
    cfg = load_config(None, TINY_OVERRIDES)
    (folder / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg)))))
    loaded, cfg2 = load_encoder(folder)
    assert cfg2.model == "vit_tiny_patch16"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), enc.eval().forward_features(x))
    # Weights that do not fit the config say so.
    torch.save(create_model("vit_small_patch16", img_size=32).state_dict(), folder / "encoder.pth")
    with pytest.raises(CheckpointError,
                       match=r"do not fit.*shape mismatches .*cls_token: \(1, 1, 384\) vs \(1, 1, 192\)"):
        load_encoder(folder)


def test_eval_cli_random_init_with_folder_data(tmp_path, capsys):
    from fastmask.cli import main
    from fastmask.data.embedded import write_image_folder

    root = write_image_folder(tmp_path / "digits", labeled=True, count=120)
    out = tmp_path / "r.json"
    argv = ["eval", "--random-init", *sum((["--set", o] for o in TINY_OVERRIDES), []), "--data", str(root),
            "--data-size", "32", "--k", "5", "--probe-epochs", "5", "--out", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["checkpoint"] is None and r["test_size"] + r["train_size"] == 120
    assert 0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["linear_top1"] <= 1.0
    assert "k-NN@5" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["mae_tiny", "extrema_tiny", "adios_tiny"])
def test_method_checkpoints_are_not_mistaken_for_bare_encoders(recipe):
    """A method's state (any method: decoders, heads, teachers, occluders) is loaded as the whole
    method; only a state whose keys all belong to the bare encoder is an exported encoder."""
    from fastmask.engine.config import load_config
    from fastmask.eval.load import _is_encoder_only
    from fastmask.methods import build_method
    from fastmask.models import create_model

    cfg = load_config(recipe)
    assert not _is_encoder_only(build_method(cfg).state_dict(), cfg)
    assert _is_encoder_only(create_model(cfg.model, img_size=cfg.data.img_size).state_dict(), cfg)


@pytest.mark.parametrize("recipe", ["extrema_tiny", "mst_tiny", "mae_tiny"])
def test_load_encoder_hands_out_trainable_weights_even_of_a_teacher(recipe):
    """ExtreMA and MST evaluate their EMA teacher, which they keep frozen: the encoder load_encoder hands
    out must still train when fine-tuned (benchmarks/learning.py --finetune trained the head alone)."""
    from fastmask.eval.load import load_encoder, resolve_config

    encoder, _ = load_encoder(None, cfg=resolve_config(None, recipe=recipe))
    frozen = [n for n, p in encoder.named_parameters() if not p.requires_grad]
    assert [n.rsplit(".", 1)[-1] for n in frozen] == ["pos_embed"]  # fixed sin-cos, as in the student
    assert not encoder.training


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files and folders that are not what the commands need."""
    from fastmask.engine.config import load_config, to_dict
    from fastmask.models import create_model

    tmp_path = tmp_path_factory.mktemp("bad_inputs")
    (tmp_path / "notes.pth").write_text("not weights\n")
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "noconfig").mkdir()
    torch.save(create_model("vit_tiny_patch16", img_size=32).state_dict(), tmp_path / "noconfig" / "w.pth")
    (tmp_path / "enc").mkdir()
    torch.save(create_model("vit_tiny_patch16", img_size=32).state_dict(), tmp_path / "enc" / "encoder.pth")
    cfg = load_config(None, TINY_OVERRIDES)
    (tmp_path / "enc" / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg)))))
    return tmp_path


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--checkpoint", "{d}/missing"], "checkpoint {d}/missing does not exist"),
    (["eval", "--checkpoint", "{d}/notes.pth", "--config", "mae_tiny"], "is not a PyTorch weights file"),
    (["visualize", "--checkpoint", "{d}/photo.png", "--config", "mae_tiny", "--out", "{d}/g.png"],
     "is not a PyTorch weights file"),
    (["eval", "--checkpoint", "{d}/empty"], "holds no checkpoint"),
    (["eval", "--checkpoint", "{d}/noconfig/w.pth"], "no config.yaml beside"),
    (["visualize", "--checkpoint", "{d}/enc", "--out", "{d}/g.png"], "holds only encoder weights"),
    (["eval", "--random-init", "--config", "nope"], "unknown config 'nope'"),
    (["eval", "--random-init", "--config", "{d}/missing.yaml"], "does not exist"),
    (["eval", "--random-init", "--set", "engine.lr"], "not of the form key=value"),
    (["eval", "--random-init", "--set", "engine.lrr=1"], "engine.lrr"),
    (["eval", "--random-init", "engine.lr=fast"], "engine.lr must be a finite number"),
    (["visualize", "--random-init", "--set", "method=nope", "--out", "{d}/g.png"], "unknown method 'nope'"),
    (["visualize", "--random-init", "--set", "model=vit_nope", "--out", "{d}/g.png"], "unknown ViT model"),
    (["eval", "--random-init", "--data", "{d}/missing"], "--data {d}/missing is not a folder"),
    (["eval", "--random-init", "--k", "0", "--test-fraction", "1"],
     "--k must be >= 1, got 0; --test-fraction"),
    (["eval", "--random-init", "--out", "{d}/file/r.json"], "is a file, not a folder"),
    (["visualize", "--random-init", "--out", "{d}/empty"], "is a folder"),
    (["visualize", "--random-init", "--images", "0", "--out", "{d}/g.png"],
     "--images and --scale must be >= 1"),
    (["eval", "--random-init", "--device", "tpu:x"], "is not a device"),
])
def test_eval_and_visualize_input_errors_are_one_line(argv, needle, bad_inputs, capsys):
    from fastmask.cli import main

    d = str(bad_inputs)
    assert main([a.format(d=d) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fastmask {argv[0]}: error:") and needle.format(d=d) in err, err
    assert "\n" not in err and "Traceback" not in err
    assert not (bad_inputs / "g.png").exists()


def test_eval_prints_the_random_init_baseline_beside_every_result(tmp_path, capsys):
    """The baseline is the same model untrained (seeded with engine.seed): `--random-init` alone gives
    the same numbers as the baseline printed beside a checkpoint's."""
    from fastmask.cli import main
    from fastmask.data.embedded import write_image_folder
    from fastmask.engine.config import load_config, to_dict
    from fastmask.models import create_model

    root = write_image_folder(tmp_path / "digits", labeled=True, count=100)
    common = ["--data", str(root), "--data-size", "32", "--k", "5", "--probe-epochs", "3", "--batch-size",
              "50"]
    assert main(["eval", "--random-init", *sum((["--set", o] for o in TINY_OVERRIDES), []), *common,
                 "--out", str(tmp_path / "r0.json")]) == 0
    r0 = json.loads((tmp_path / "r0.json").read_text())
    assert r0["random_init"] == {"knn_top1": r0["knn_top1"], "linear_top1": r0["linear_top1"]}
    capsys.readouterr()
    torch.manual_seed(123)  # weights unlike the seeded baseline's
    folder = tmp_path / "enc"
    folder.mkdir()
    torch.save(create_model("vit_tiny_patch16", img_size=32).state_dict(), folder / "encoder.pth")
    cfg = load_config(None, TINY_OVERRIDES)
    (folder / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg)))))
    assert main(["eval", "--checkpoint", str(folder), *common, "--out", str(tmp_path / "r1.json")]) == 0
    r1 = json.loads((tmp_path / "r1.json").read_text())
    assert r1["random_init"] == r0["random_init"]
    line = capsys.readouterr().out.splitlines()[0]
    assert f"k-NN@5 {100 * r1['knn_top1']:.1f}% (random init {100 * r0['knn_top1']:.1f}%)" in line
    assert f"linear probe {100 * r1['linear_top1']:.1f}% (random init {100 * r0['linear_top1']:.1f}%)" in line
