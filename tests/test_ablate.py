"""The ablation benchmark (`fastmask.bench.ablate`): a tiny CPU run writes a valid JSON with the official
rows, the fastmask model rows and the engine row measured, every GPU-only row skipped with its reason,
one change per row; per-op backend routing."""
from __future__ import annotations

import json
import os
import statistics

import pytest
import torch

from fastmask import ops
from fastmask.bench import ablate
from fastmask.bench.ablate import AblateArgs, OpBackends, plan_rows, run_ablation


@pytest.fixture
def one_thread():
    # The CI machine has 2 shared cores; two spinning torch threads under load are many times slower.
    n = torch.get_num_threads()
    yield 1
    torch.set_num_threads(n)


def test_ablation_cpu_tiny_writes_json(tmp_path, one_thread):
    # compile and strong not requested: inductor's CPU compile takes minutes (the real ablation runs them).
    args = AblateArgs(model="vit_tiny_patch16", img_size=64, batch_size=4, recipe="mae_tiny", device="cpu",
                      warmup=1, repeats=2, threads=one_thread, num_inputs=2,
                      rows=tuple(r for r in ablate.ROW_KINDS if r not in ("compile", "strong")))
    result = run_ablation(args, log=lambda s: None)
    path = ablate.save_json(result, tmp_path / "ablate.json")
    data = json.loads(path.read_text())

    assert data["benchmark"] == "ablation" and data["device"]["type"] == "cpu"
    assert data["versions"]["torch"] == torch.__version__ and data["args"]["dtype"] == "fp32"
    assert data["shapes"]["patches"] == 16 and data["shapes"]["visible"] == 4
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["official", "no_host_sync", "no_grad_norm", "fused_adamw", "fastmask_model",
                          "fused_ops", "attn_sdpa", "attn_triton", "attn_xformers", "fused_ln_gelu",
                          "compile", "cuda_graphs", "fastmask", "strong"]

    measured = [n for n, r in rows.items() if r["status"] == "measured"]
    assert measured == ["official", "no_host_sync", "no_grad_norm", "fused_adamw", "fastmask_model",
                        "attn_sdpa", "fastmask"]
    official = rows["official"]["step_s_times"]
    for n in measured:
        r = rows[n]
        assert r["step_s_median"] > 0 and len(r["step_s_times"]) == 2 and r["first_step_s"] > 0
        assert r["images_per_s"] == pytest.approx(4 / r["step_s_median"])
        assert r["tflops"] == pytest.approx(data["flops_per_step"] / r["step_s_median"] / 1e12)
        assert r["mfu"] is None  # no known peak for a CPU
        up = r["speedup_vs_official"]
        assert up["median_ratio"] == pytest.approx(rows["official"]["step_s_median"] / r["step_s_median"])
        assert up["per_round_median"] == pytest.approx(
            statistics.median(o / x for o, x in zip(official, r["step_s_times"])))
    # Each row's own effect is measured against its base; a skipped base hands over to the row before it.
    assert rows["no_grad_norm"]["measured_base"] == "no_host_sync"
    assert rows["attn_sdpa"]["base"] == "fused_ops" and rows["attn_sdpa"]["measured_base"] == "fastmask_model"
    b, x = rows["fastmask_model"]["step_s_times"], rows["attn_sdpa"]["step_s_times"]
    assert rows["attn_sdpa"]["speedup_vs_base"]["per_round_median"] == pytest.approx(
        statistics.median(p / q for p, q in zip(b, x)))
    assert rows["fastmask_model"]["ops"] == {op: "torch" for op in ablate.OPS}
    assert rows["attn_sdpa"]["ops"]["attention"] == "sdpa"
    assert rows["fastmask"]["kind"] == "engine" and rows["fastmask"]["speedup_vs_base"] is None

    skipped = {n: r["reason"] for n, r in rows.items() if r["status"] == "skipped"}
    triton_reason = ablate.INTERPRETER_REASON if os.environ.get("TRITON_INTERPRET") == "1" else "device cpu"
    for n in ("fused_ops", "attn_triton", "fused_ln_gelu"):
        assert triton_reason in skipped[n], (n, skipped[n])
    assert "xformers" in skipped["attn_xformers"] or "device cpu" in skipped["attn_xformers"]
    assert "CUDA graphs need a CUDA device" in skipped["cuda_graphs"]
    assert skipped["compile"] == "not requested (--rows)"
    assert "fused patch embed/scatter/loss unavailable" in rows["attn_sdpa"]["note"]
    assert data["fastmask_vs_strong"] is None  # strong was not run
    assert data["fastmask_vs_official"] == rows["fastmask"]["speedup_vs_official"]
    assert ablate.format_table(data).splitlines()[-2].startswith("fastmask vs strong: not measured")


def test_every_official_row_changes_one_knob_and_names_it():
    rows = {r.name: r for r in plan_rows(torch.device("cpu"))}
    chain = ["official", "no_host_sync", "no_grad_norm", "fused_adamw"]
    assert rows["official"].official == {"host_sync": True, "grad_norm": True, "optimizer": "default"}
    for before, after in zip(chain, chain[1:]):
        assert rows[after].base == before and rows[after].changed
        changed = {k for k in rows[after].official if rows[after].official[k] != rows[before].official[k]}
        assert len(changed) == 1, (after, changed)
    # The model row changes only the model: it starts from the fused-AdamW row, with every op on torch.
    assert rows["fastmask_model"].base == "fused_adamw" and rows["fastmask_model"].kind == "direct"
    assert rows["fastmask"].kind == "engine" and rows["strong"].kind == "strong"


def test_plan_rows_for_a_gpu_uses_fused_backends():
    # Planning needs no GPU: the records say what a CUDA device would run.
    rows = {r.name: r for r in plan_rows(torch.device("cuda"), attention="sdpa")}
    assert not rows["fused_ops"].skip and not rows["attn_sdpa"].skip and not rows["cuda_graphs"].skip
    assert set(rows["fused_ops"].ops[op] for op in ablate.FUSED_MEMORY_OPS) <= {"cuda", "triton"}
    assert rows["fused_ln_gelu"].ops["add_layer_norm"] == "triton" \
        and rows["fused_ln_gelu"].base == "attn_sdpa"
    assert rows["compile"].ops["attention"] == "sdpa"
    assert rows["cuda_graphs"].compile_mode == "reduce-overhead"
    assert rows["official"].ops is None and rows["fastmask_model"].ops["attention"] == "torch"


def test_op_backends_routes_named_ops_only():
    q = torch.randn(2, 3, 7, 16)
    x, w, b = torch.randn(2, 5, 24), torch.randn(24), torch.randn(24)
    assert ops.select("attention", "torch", q=q, k=q, v=q, scale=None).name == "torch"
    with OpBackends({"attention": "sdpa"}):
        assert ops.select("attention", "torch", q=q, k=q, v=q, scale=None).name == "sdpa"
        out = ops.attention(q, q, q, backend="torch")  # the op module's own select is routed too
        assert ops.select("add_layer_norm", "torch", x=x, residual=x, weight=w, bias=b).name == "torch"
    assert ops.select("attention", "torch", q=q, k=q, v=q, scale=None).name == "torch"
    torch.testing.assert_close(out, ops.reference.attention(q, q, q), atol=1e-5, rtol=1e-5)
    with pytest.raises(ops.BackendUnavailable, match="xformers"), OpBackends({"attention": "xformers"}):
        ops.attention(q, q, q)
    with pytest.raises(ValueError, match="backend names"):
        OpBackends({"attention": "nope"})


def test_validate_rejects_bad_args():
    with pytest.raises(ValueError, match="rows must be"):
        ablate.validate(AblateArgs(rows=("official", "warp_drive")))
    with pytest.raises(ValueError, match="attention must be"):
        ablate.validate(AblateArgs(attention="flash9"))


def test_fastmask_bench_ablate_cli_writes_the_table(tmp_path, one_thread):
    from fastmask.cli import main

    out = tmp_path / "cli.json"
    rc = main(["bench", "--ablate", "--model", "vit_tiny_patch16", "--img-size", "32", "--batch-size", "2",
               "--config", "mae_tiny", "--device", "cpu", "--warmup", "1", "--repeats", "1", "--threads", "1",
               "--num-inputs", "1", "--rows", "official,fastmask_model", "--no-memory", "--out", str(out)])
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["official"]["status"] == rows["fastmask_model"]["status"] == "measured"
    assert rows["fastmask_model"]["step_s_median"] > 0 and rows["fastmask_model"]["images_per_s"] > 0
    assert rows["fastmask_model"]["measured_base"] == "official"  # its chain back, past the rows not run
