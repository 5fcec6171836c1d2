"""benchmarks/independent_simclr.py: its NT-Xent, written from the SimCLR paper, agrees with fastmask's
(two implementations, one loss), --init-from starts timm's ViT from exactly a run's initial weights, and
bad --finetune-seeds fail before the pretraining."""
import importlib.util
from pathlib import Path

import pytest
import torch

import fastmask.eval.load as load
from fastmask.eval.load import load_encoder, resolve_config
from fastmask.objectives.infonce import nt_xent

pytest.importorskip("timm")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "independent_simclr.py"
spec = importlib.util.spec_from_file_location("independent_simclr", SCRIPT)
simclr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(simclr)


@pytest.mark.parametrize("n,d,t", [(7, 5, 0.2), (3, 16, 0.5)])
def test_its_nt_xent_matches_fastmask(n, d, t):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    torch.testing.assert_close(simclr.simclr_loss(z1, z2, t), nt_xent(z1, z2, t))
    aligned = simclr.simclr_loss(z1, z1 + 1e-3 * z2, t)  # pairs nearly equal: far below random pairs
    assert aligned < simclr.simclr_loss(z1, z2, t)


def test_init_from_takes_the_runs_initial_weights(monkeypatch, tmp_path):
    vit = ["model=vit_tiny_patch16"]
    cfg = resolve_config(None, recipe="adios_vit_tiny", overrides=[*vit, "data.img_size=64"])
    monkeypatch.setattr(load, "resolve_config", lambda path: cfg)
    want = load_encoder(None, cfg=cfg)[0].state_dict()
    got = simclr.backbone(tmp_path).state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    other = resolve_config(None, recipe="adios_vit_tiny", overrides=[*vit, "data.img_size=32"])
    monkeypatch.setattr(load, "resolve_config", lambda path: other)
    with pytest.raises(ValueError, match="trains at 32 px"):
        simclr.backbone(tmp_path)


@pytest.mark.parametrize("seeds", ["a", "-1", ","])
def test_bad_seeds_fail_before_pretraining(monkeypatch, tmp_path, seeds):
    monkeypatch.setattr(simclr, "pretrain", lambda *a, **k: pytest.fail("pretrained"))
    with pytest.raises(SystemExit):
        simclr.main(["--finetune-seeds", seeds, "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "o.json").exists()
