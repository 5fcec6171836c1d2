"""`auto` on CUDA: the committed table of measured backend orders per GPU architecture, else the rule.

No GPU here: CUDA inputs are fake tensors (FakeTensorMode makes cuda tensors without a device) and the
architecture query is replaced; the records, the table reader and the selection are the real ones.
The table writer of benchmarks/bench_ops.py is checked against the same reader (round trip).
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastmask import ops
from fastmask.ops import backends

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh(monkeypatch):
    """Empty caches, an sm_90 GPU as far as auto can tell."""
    monkeypatch.setattr(backends, "_choices", {})
    monkeypatch.setattr(backends, "_table_state", {})
    monkeypatch.setattr(backends, "cuda_arch", lambda index=None: "sm_90")


def _gather_inputs():
    with FakeTensorMode():
        return dict(imgs=torch.empty(2, 3, 32, 32, device="cuda", dtype=torch.bfloat16),
                    ids_keep=torch.empty(2, 1, device="cuda", dtype=torch.int64), patch_size=16)


def _table(tmp_path, monkeypatch, archs):
    path = tmp_path / "auto_backends.json"
    path.write_text(json.dumps({"archs": archs}))
    monkeypatch.setenv(backends.AUTO_TABLE_ENV, str(path))
    return path


def test_committed_table_is_read_and_has_no_measured_entry_yet(fresh, monkeypatch):
    monkeypatch.delenv(backends.AUTO_TABLE_ENV, raising=False)
    assert backends.DEFAULT_AUTO_TABLE == ROOT / "benchmarks" / "results" / "auto_backends.json"
    archs, error = backends.load_auto_table()
    assert error is None and archs == {}
    decided = backends.decided_by("patch_gather", **_gather_inputs())
    assert decided.startswith("rule: the CUDA extension") and "no entry for patch_gather on sm_90" in decided


def test_rule_puts_cuda_before_triton_for_gather_and_loss(fresh, tmp_path, monkeypatch):
    _table(tmp_path, monkeypatch, {})
    inputs = _gather_inputs()
    assert [n for n, _ in ops.explain("patch_gather", **inputs)][:2] == ["cuda", "triton"]
    # the extension is not built here: cuda declines with its reason and auto takes triton
    reasons = dict(ops.explain("patch_gather", **inputs))["cuda"]
    assert reasons and ops.select("patch_gather", "auto", **inputs).name == "triton"
    assert [n for n, _ in ops.explain("patch_scatter", tokens=inputs["imgs"])][:2] == ["triton", "cuda"]


def test_measured_entry_decides_and_says_so(fresh, tmp_path, monkeypatch):
    entry = {"order": ["torch", "triton"],
             "figure": "vit_l bf16 batch 256 fwd+bwd: torch 1.0 ms, triton 2.0 ms",
             "source": "2027-01-01_h100_ops.json"}
    _table(tmp_path, monkeypatch, {"sm_90": {"patch_gather": entry}, "sm_80": {"norm_pix_loss": entry}})
    inputs = _gather_inputs()
    assert ops.select("patch_gather", "auto", **inputs).name == "torch"
    assert [n for n, _ in ops.explain("patch_gather", **inputs)] == ["torch", "triton", "cuda"]
    decided = backends.decided_by("patch_gather", **inputs)
    assert decided == f"measured on sm_90 (2027-01-01_h100_ops.json): {entry['figure']}"
    # another op, or another architecture's entry: the rule
    assert backends.decided_by("norm_pix_loss", pred=inputs["imgs"]).startswith("rule:")


def test_unreadable_table_falls_back_to_the_rule_with_the_reason(fresh, tmp_path, monkeypatch):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    monkeypatch.setenv(backends.AUTO_TABLE_ENV, str(path))
    inputs = _gather_inputs()
    assert ops.select("patch_gather", "auto", **inputs).name == "triton"
    assert "unreadable table" in backends.decided_by("patch_gather", **inputs)


def test_bench_ops_writes_what_auto_reads(fresh, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_ops", ROOT / "benchmarks" / "bench_ops.py")
    bench_ops = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_ops", bench_ops)  # its dataclasses look their module up
    spec.loader.exec_module(bench_ops)
    rows = [dict(op="patch_gather", model=m, impl=impl, pass_="fwd+bwd", ms=ms)
            for m, impl, ms in (("vit_b", "triton", 0.1), ("vit_b", "cuda", 0.3), ("vit_l", "triton", 0.4),
                                ("vit_l", "cuda", 0.2), ("vit_l", "torch", 0.9),
                                ("vit_l", "torch.compile", 0.5))]
    rows.append(dict(op="patch_gather", model="vit_l", impl="triton", pass_="fwd", ms=0.01))
    result = {"rows": rows, "meta": {"dtype": "bfloat16", "batch": 256}}
    entries = bench_ops.auto_table_entries(result, "run.json")
    assert entries["patch_gather"]["order"] == ["cuda", "triton", "torch"]  # vit_l, fwd+bwd, backends only
    assert "vit_l bfloat16 batch 256 fwd+bwd: cuda 0.200 ms" in entries["patch_gather"]["figure"]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"about": "kept", "archs": {"sm_80": {"x": {"order": ["torch"]}}}}))
    table = bench_ops.update_auto_table(str(path), "sm_90", entries)
    assert table["about"] == "kept" and set(table["archs"]) == {"sm_80", "sm_90"}
    monkeypatch.setenv(backends.AUTO_TABLE_ENV, str(path))
    assert backends.decided_by("patch_gather", **_gather_inputs()).startswith("measured on sm_90 (run.json)")


def test_info_shows_what_decided_each_choice():
    from fastmask import info

    rep = info.report()
    for op in info.OPS:
        entry = rep["ops"][op]["cpu/float32"]
        assert entry["decided_by"].startswith("rule: the cpu order ") and entry["auto"] in entry["decided_by"]
    assert "auto -> torch   (rule: the cpu order torch)" in info.format_report(rep)
