"""benchmarks/learning.py's fine-tuning evaluation (--finetune): it starts from the run's own encoder (its
random init only when asked), and it trains the encoder and head end to end on the pool it names."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastmask.data import shapes
from fastmask.eval.load import load_encoder, resolve_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"
spec = importlib.util.spec_from_file_location("learning", SCRIPT)
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)

TINY = {"steps": 3, "batch_size": 8, "lr": 1e-3, "train_images": 32, "probe_at": [2, 3]}


def _data(n_train=40, n_test=30):
    xtr, ytr = shapes.shapes_set("train", n_train, cache=False)
    xte, yte = shapes.shapes_set("test", n_test, cache=False)
    return xtr, ytr, xte, yte, shapes.CLASSES


def test_finetune_starts_from_the_runs_encoder(tmp_path, monkeypatch):
    cfg = resolve_config(None, recipe="mae_tiny", overrides=["data.img_size=32"])
    encoder, _ = load_encoder(None, cfg=cfg)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))                    # weights no random init of cfg has
    weights = tmp_path / "encoder.pt"
    torch.save(encoder.state_dict(), weights)
    seen = []
    monkeypatch.setattr(learning, "train_with_labels",
                        lambda vit, head, data, size, c, pool: seen.append((vit, head, size, pool)) or [])
    out = learning.finetune(weights, cfg, _data())
    assert out["probes"] == [] and out["pool"] == learning.FINETUNE["pool"]
    vit, head, size, pool = seen[0]
    assert size == 32 and pool == "mean" and head.out_features == len(shapes.CLASSES)
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(vit.state_dict()[name], value, rtol=0, atol=0)
    learning.finetune(None, cfg, _data())                   # the baseline: the run's random init
    random_init, _ = load_encoder(None, cfg=cfg)
    torch.testing.assert_close(seen[1][0].state_dict()["blocks.0.attn.qkv.weight"],
                               random_init.state_dict()["blocks.0.attn.qkv.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_train_with_labels_trains_encoder_and_head_and_probes_on_schedule(pool):
    cfg = resolve_config(None, recipe="mae_tiny", overrides=["data.img_size=32"])
    vit, _ = load_encoder(None, cfg=cfg)
    head = torch.nn.Linear(vit.embed_dim, len(shapes.CLASSES))
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    head_before = head.weight.detach().clone()
    probes = learning.train_with_labels(vit, head, _data(), 32, TINY, pool)
    assert [p["step"] for p in probes] == TINY["probe_at"]
    for p in probes:
        assert 0.0 <= p["test_accuracy"] <= 1.0 and 0.0 <= p[f"knn_{pool}"] <= 1.0
    moved = [k for k, v in vit.state_dict().items() if not torch.equal(v, before[k])]
    assert "blocks.0.attn.qkv.weight" in moved and "patch_embed.proj.weight" in moved
    assert not torch.equal(head.weight, head_before)


def test_finetune_cache_shares_one_random_init_run_and_only_for_equal_weights(tmp_path, monkeypatch):
    cfg = resolve_config(None, recipe="mae_tiny", overrides=["data.img_size=32"])
    calls = []
    monkeypatch.setattr(learning, "train_with_labels",
                        lambda vit, head, data, size, c, pool: calls.append(vit) or [{"step": len(calls)}])
    cache: dict = {}
    first = learning.finetune(None, cfg, _data(), cache)
    again = learning.finetune(None, cfg, _data(), cache)    # the same random init: not trained twice
    assert len(calls) == 1 and again == first
    encoder, _ = load_encoder(None, cfg=cfg)
    with torch.no_grad():
        next(encoder.parameters()).view(-1)[0] += 1e-3      # one value differs: another init
    weights = tmp_path / "encoder.pt"
    torch.save(encoder.state_dict(), weights)
    other = learning.finetune(weights, cfg, _data(), cache)
    assert len(calls) == 2 and other["probes"] == [{"step": 2}]


@pytest.mark.parametrize("method", learning.METHODS)
def test_finetune_trains_the_encoder_each_method_hands_out(method, monkeypatch):
    # ExtreMA and MST evaluate their teacher, whose weights are frozen for the EMA: fine-tuning must
    # unfreeze them, or it trains the head alone on fixed features (a linear probe, mislabelled); 64 px as
    # learning.py runs them (ExtreMA keeps no patch of 4 at 32 px)
    cfg = resolve_config(None, recipe=f"{method}_tiny",
                         overrides=[f"model={learning.MODEL}", "data.img_size=64", "data.root=null"])
    seen = []
    real = learning.train_with_labels
    monkeypatch.setattr(learning, "train_with_labels",
                        lambda vit, *a: seen.append((vit, {k: v.clone() for k, v in vit.state_dict().items()})
                                                    ) or real(vit, *a))
    monkeypatch.setattr(learning, "FINETUNE", {**TINY, "pool": "mean"})
    learning.finetune(None, cfg, _data())
    vit, before = seen[0]
    moved = [k for k, v in vit.state_dict().items() if not torch.equal(v, before[k])]
    for name in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight"):  # ExtreMA's ViT is "vit." inside
        assert any(k.endswith(name) for k in moved), (name, moved)


def test_train_with_labels_seed_sets_the_draws_and_repeats_exactly():
    cfg = resolve_config(None, recipe="mae_tiny", overrides=["data.img_size=32"])

    def trained(seed):
        vit, _ = load_encoder(None, cfg=cfg)
        head = torch.nn.Linear(vit.embed_dim, len(shapes.CLASSES))
        learning.train_with_labels(vit, head, _data(), 32, {**TINY, "probe_at": [], "seed": seed}, "mean")
        return vit.state_dict()["blocks.0.attn.qkv.weight"]

    torch.testing.assert_close(trained(0), trained(0), rtol=0, atol=0)
    assert not torch.equal(trained(0), trained(1))


def test_main_keeps_finetune_seeds_across_runs_of_the_same_pretraining(tmp_path, monkeypatch):
    import fastmask.eval.features as features
    import fastmask.eval.load as load

    found = {"steps": 10, "weights": "w1", "loss": 0.5}               # what evaluate finds in the run
    monkeypatch.setattr(features, "shapes_labeled_set", _data)
    monkeypatch.setattr(load, "resolve_config", lambda run: None)
    monkeypatch.setattr(learning, "pretrain", lambda *a, **k: 0.0)
    probe = {"cls": {"knn": 0.1, "linear": 0.1}, "mean": {"knn": 0.1, "linear": 0.1}}
    monkeypatch.setattr(learning, "evaluate", lambda method, run, n, data, extra=(): {
        "steps": found["steps"], "overrides": [], "loss_first": 1.0, "loss_last": found["loss"],
        "weights": found["weights"], "trained": probe, "random_init": probe})
    monkeypatch.setattr(learning, "finetune", lambda run, cfg, data, cache=None, seed=0:
                        {"seed": seed, "from": "random" if run is None else "trained"})
    out = tmp_path / "r.json"
    base = ["--methods", "mae", "--work", str(tmp_path / "w"), "--out", str(out)]

    def read():
        return json.loads(out.read_text())["results"]["mae"]

    assert learning.main([*base, "--finetune"]) == 0
    assert read()["finetune"]["trained"] == {"seed": 0, "from": "trained"}
    assert "finetune_replicates" not in read()
    assert learning.main([*base, "--finetune", "--finetune-seeds", "2,1"]) == 0
    r = read()
    assert r["finetune"]["random_init"] == {"seed": 0, "from": "random"}         # seed 0 kept
    assert [e["seed"] for e in r["finetune_replicates"]] == [1, 2]
    assert r["finetune_replicates"][1]["random_init"] == {"seed": 2, "from": "random"}
    doc = json.loads(out.read_text())                          # what another tool added to the file
    doc["checkpoint_probes"] = {"step_10": 0.2}
    doc["results"]["mae"]["note"] = "kept"
    out.write_text(json.dumps(doc))
    assert learning.main(base) == 0                                             # evaluated again only
    assert read()["finetune_replicates"] == r["finetune_replicates"]
    assert read()["note"] == "kept"
    assert json.loads(out.read_text())["checkpoint_probes"] == {"step_10": 0.2}
    found["weights"] = "w2"                       # the same recipe and steps trained again, other weights
    assert learning.main(base) == 0
    assert "finetune" not in read() and "finetune_replicates" not in read()
    assert learning.main([*base, "--finetune"]) == 0
    found["steps"], found["weights"] = 20, "w3"              # another pretraining
    assert learning.main(base) == 0
    assert "finetune" not in read()
    # an entry written before the digest was recorded: the same weights only where its figures all match
    doc = json.loads(out.read_text())
    doc["results"]["mae"] = {**{k: v for k, v in read().items() if k != "weights"}, "finetune": {"seed": 0}}
    out.write_text(json.dumps(doc))
    assert learning.main(base) == 0 and read()["finetune"] == {"seed": 0}
    doc["results"]["mae"]["loss_last"] = 0.4
    out.write_text(json.dumps(doc))
    assert learning.main(base) == 0 and "finetune" not in read()
    with pytest.raises(SystemExit):
        learning.main([*base, "--finetune", "--finetune-seeds", "a"])
