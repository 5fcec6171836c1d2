"""benchmarks/adios_occluder_coverage.py's measure: a slot that is the shape hides all of it and none of
the background; slots blind to the shape hide the shape and the background alike."""
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "adios_occluder_coverage.py"
spec = importlib.util.spec_from_file_location("adios_occluder_coverage", SCRIPT)
cov = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cov)


def _shapes(b=5, s=12):
    shape = torch.zeros(b, s, s)
    for i in range(b):
        shape[i, i:i + 4, 2 + i:7 + i] = 1.0
    return shape


def test_a_slot_on_the_shape_hides_it_all():
    shape = _shapes()
    soft = torch.stack([1 - shape, shape], 1)          # slot 1 is the shape, slot 0 the rest
    out = cov.coverage(soft, shape)
    assert out["shape_hidden"] == pytest.approx(1.0) and out["background_hidden"] == pytest.approx(0.0)
    assert out["area"][1] == pytest.approx(shape.mean().item())


def test_slots_blind_to_the_shape_hide_it_like_the_background():
    shape = _shapes()
    soft = torch.full((5, 2, 12, 12), 0.5)                # each slot half of every pixel
    out = cov.coverage(soft, shape)
    assert out["shape_hidden"] == pytest.approx(0.5) and out["background_hidden"] == pytest.approx(0.5)
