"""`fastmask pretrain`: clean one-line errors before any training, and the default run end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmask.cli import main


@pytest.mark.parametrize("args,needle", [
    (["model=vit_nope"], "unknown ViT model 'vit_nope'"),
    (["method=nope"], "unknown method 'nope'"),
    (["data.img_size=100"], "not divisible by patch size 16"),
    (["mask_ratio=1.5"], "mask_ratio must be in (0, 1)"),
    (["engine.zero_stag=1"], "engine.zero_stag"),
    (["method_args.decoder_dept=3"], "method_args.decoder_dept"),
    (["--config", "mae_nope"], "unknown config 'mae_nope'"),
    (["engine.precision=fp16"], "fp16 needs a CUDA GPU"),
    (["data.root=/nonexistent/folder"], "/nonexistent/folder"),
])
def test_bad_input_is_one_clean_line(args, needle, capsys, tmp_path):
    rc = main(["pretrain", "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("fastmask pretrain: error:") and needle in err
    assert "Traceback" not in err and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_print_config(capsys):
    assert main(["pretrain", "--print-config", "model=vit_small_patch16", "--steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "model: vit_small_patch16" in out and "steps: 7" in out


def _fastmask(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "fastmask.cli", "pretrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_bad_input_exits_nonzero_without_traceback_in_a_fresh_process(tmp_path):
    proc = _fastmask("data.img_size=100", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not divisible by patch size" in proc.stderr


@pytest.mark.slow
def test_default_run_learns_and_resumes(tmp_path):
    """The default recipe (MAE ViT-Tiny, embedded photos, CPU fp32) at batch 16: 20 steps, stopped at 10
    and resumed by running the same command again."""
    out = tmp_path / "run"
    first = _fastmask("--steps", "20", "--out", str(out), "data.batch_size=16", "engine.stop_at=10", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done: step 10/20" in first.stdout
    second = _fastmask("--steps", "20", "--out", str(out), "data.batch_size=16", "--export",
                       str(tmp_path / "enc.pth"), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "done: step 20/20, resumed at step 10" in second.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all({"step", "loss", "lr", "imgs_per_s", "epoch", "mem_gb"} <= set(r) for r in rows)
    assert rows[-1]["loss"] < 0.85 * rows[0]["loss"]
    assert (out / "config.yaml").is_file() and (tmp_path / "enc.pth").is_file()


def test_deepspeed_local_rank_before_the_subcommand_goes_to_the_environment(monkeypatch):
    from fastmask.cli import _take_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _take_local_rank(["--local_rank=3", "pretrain", "--steps", "2"]) == ["pretrain", "--steps", "2"]
    import os
    assert os.environ["LOCAL_RANK"] == "3"
