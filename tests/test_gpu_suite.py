"""benchmarks/gpu_suite.py: the dry run (every stage at tiny shapes on the CPU) passes and writes the JSON
documented in benchmarks/README.md; a failing stage is recorded without losing the others; the JSON is
on disk while a stage runs; ptxas's register/spill lines parse; op rows get their ceiling share."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_passes_every_stage_and_writes_the_schema(tmp_path):
    # A fresh process, as on the lent machine: it must not import deepspeed, which is not there.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert data["schema_version"] == 1 and data["dry_run"] is True and data["deepspeed_imported"] is False
    assert list(data["stages"]) == ["env", "correctness", "ops", "step", "summary"]
    assert all(s["status"] == "ok" and s["seconds"] >= 0 for s in data["stages"].values())

    env_r = data["stages"]["env"]["result"]
    assert env_r["copy"]["gbps_read_plus_write"] > 0 and env_r["matmul"]["tflops"] > 0

    corr = data["stages"]["correctness"]["result"]
    assert set(corr["counts"]) <= {"ok", "declined"} and corr["counts"]["ok"] >= 40, corr["counts"]
    ops_seen = {(r["op"], r["impl"]) for r in corr["records"] if r["status"] == "ok"}
    assert {("attention", "sdpa:math"), ("patch_scatter", "torch"), ("bias_gelu", "torch")} <= ops_seen
    assert len(corr["adversarial_lse"]) >= 3 and all(r["nan_inf_total"] in (0, None)
                                                     for r in corr["adversarial_lse"])
    strided = next(r for r in corr["records"]
                   if r["part"].startswith("encoder (strided") and r["impl"] == "torch")
    assert strided["grads"]["q"]["ok"] and strided["outputs"][0]["max_abs_err"] < 1e-4

    ops_rows = [r for r in data["stages"]["ops"]["result"]["rows"] if "ms" in r]
    assert ops_rows and all("ratio_to_best_other" in r for r in ops_rows)
    assert any("pct_of_copy_ceiling" in r for r in ops_rows)
    assert (tmp_path / "ops.json").exists()

    step = data["stages"]["step"]["result"]
    paths = step["side_by_side"]["paths"]
    assert set(paths) == {"fastmask", "official", "strong"}
    assert "WITHOUT DeepSpeed" in paths["fastmask"]["what"] and "NOT compiled" in paths["strong"]["what"]
    assert "speedup_fastmask_vs_strong_per_round_median" in step["side_by_side"]["ratios"]
    prof = step["profile"]
    assert 1 <= len(prof["top"]) <= 20 and 0 <= prof["copy_cast_share"] <= 1 \
        and prof["gpu_idle_share"] is None
    summary = (tmp_path / "summary.md").read_text()
    assert "## Correctness" in summary and "## Ops" in summary and "## Step" in summary


def test_a_failing_stage_is_recorded_and_the_json_is_on_disk_while_a_stage_runs(tmp_path):
    gs = _suite_module()
    plan = gs.Plan.make(dry_run=True, ops_compile=False)
    suite = gs.Suite(tmp_path, type("A", (), {"dry_run": True})(), plan)
    seen = {}

    def first():
        seen["during"] = json.loads(suite.path.read_text())["stages"]["first"]["status"]
        raise ValueError("boom")

    suite.run("first", first, log=lambda s: None)
    suite.run("second", lambda: {"x": 1}, log=lambda s: None)
    data = json.loads(suite.path.read_text())
    assert seen["during"] == "running"
    assert data["stages"]["first"]["status"] == "failed" \
        and "ValueError: boom" in data["stages"]["first"]["error"]
    assert data["stages"]["second"] == {**data["stages"]["second"], "status": "ok", "result": {"x": 1}}
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no half-written file left behind


def test_ptxas_table_and_op_row_annotation():
    gs = _suite_module()
    log = """ptxas info    : Compiling entry function '_Z13gather_kernelPKfPf' for 'sm_90'
ptxas info    : Function properties for _Z13gather_kernelPKfPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 384 bytes cmem[0]
ptxas info    : Compiling entry function '_Z4lossPf' for 'sm_90'
ptxas info    : Used 96 registers, used 1 barriers"""
    assert gs.ptxas_table(log) == [
        {"kernel": "_Z13gather_kernelPKfPf", "arch": "sm_90", "spill_stores": 8, "spill_loads": 12,
         "registers": 40},
        {"kernel": "_Z4lossPf", "arch": "sm_90", "registers": 96}]
    rows = [dict(op="a", model="m", impl="torch", pass_="fwd", ms=2.0, **{"GB/s": 100.0}),
            dict(op="a", model="m", impl="triton", pass_="fwd", ms=1.0, **{"GB/s": 200.0}),
            dict(op="a", model="m", impl="cuda", skipped="no GPU")]
    out = gs.annotate_op_rows(rows, copy_gbps=400.0)
    assert out[0]["pct_of_copy_ceiling"] == 25.0 and out[1]["pct_of_copy_ceiling"] == 50.0
    assert out[0]["ratio_to_best_other"] == 0.5 and out[1]["ratio_to_best_other"] == 2.0
    assert "ratio_to_best_other" not in out[2]
