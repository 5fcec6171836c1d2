"""benchmarks/finetune_surgery.py: the mixed encoder holds exactly the named parameters from the other
start, and a prefix that names nothing fails before any training."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import fastmask.eval.load as load
from fastmask.eval.load import load_encoder, resolve_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_surgery.py"
spec = importlib.util.spec_from_file_location("finetune_surgery", SCRIPT)
surgery = importlib.util.module_from_spec(spec)
spec.loader.exec_module(surgery)


@pytest.fixture
def run(tmp_path):
    cfg = resolve_config(None, recipe="mae_tiny", overrides=["data.img_size=32"])
    encoder, _ = load_encoder(None, cfg=cfg)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))                    # "trained": differs from the init everywhere
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    return tmp_path / "encoder.pt", cfg


@pytest.mark.parametrize("transplant", [False, True])
def test_mixed_encoder_takes_exactly_the_named_parameters_from_the_other_start(run, transplant):
    weights, cfg = run
    trained = dict(load_encoder(weights, cfg=cfg)[0].named_parameters())
    random_init = dict(load_encoder(None, cfg=cfg)[0].named_parameters())
    prefixes = ("patch_embed", "blocks.0.")
    encoder, moved = surgery.mixed_encoder(weights, cfg, prefixes, transplant)
    assert moved and all(n.startswith(prefixes) for n in moved)
    assert "blocks.0.attn.qkv.weight" in moved and "blocks.10.attn.qkv.weight" not in moved
    for name, p in encoder.named_parameters():
        named = name.startswith(prefixes)
        expect = trained[name] if named == transplant else random_init[name]
        torch.testing.assert_close(p, expect, rtol=0, atol=0)
        assert p.requires_grad == random_init[name].requires_grad  # as load_encoder hands it out


def test_random_start_is_the_whole_init_without_reading_the_run(run, tmp_path):
    weights, cfg = run
    random_init = dict(load_encoder(None, cfg=cfg)[0].named_parameters())
    encoder, moved = surgery.mixed_encoder(tmp_path / "no_such_run", cfg, (), transplant=True)
    assert moved == []
    for name, p in encoder.named_parameters():
        torch.testing.assert_close(p, random_init[name], rtol=0, atol=0)


def test_unknown_prefix_fails_before_training(run, monkeypatch, tmp_path):
    weights, cfg = run
    monkeypatch.setattr(load, "resolve_config", lambda path: cfg)
    monkeypatch.setattr(surgery.learning, "finetune_encoder", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit):
        surgery.main([str(weights), "--reset", "patch_embed,no_such_part", "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "o.json").exists()


def test_main_writes_the_fine_tuning_of_the_mix(run, monkeypatch, tmp_path):
    weights, cfg = run
    monkeypatch.setattr(load, "resolve_config", lambda path: cfg)
    seen = []
    monkeypatch.setattr(surgery.learning, "finetune_encoder",
                        lambda enc, size, data, seed, pool: seen.append((size, seed, pool))
                        or {"probes": [1]})
    out = tmp_path / "o.json"
    assert surgery.main([str(weights), "--transplant", "cls_token", "--pool", "cls", "--seed", "2",
                         "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert seen == [(32, 2, "cls")] and r["moved"] == ["cls_token"] and r["finetune"] == {"probes": [1]}
    assert r["start"] == "random init, cls_token from trained"
