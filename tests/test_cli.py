"""`fastmask pretrain`: clean one-line errors before any training, and the default run end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
    first = _fastmask("--steps", "20", "--out", str(out), "data.batch_size=16", "engine.stop_at=10",
                      cwd=tmp_path)
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


# ---------------------------------------------------------------- issue 17: one line, never a traceback

TINY_RUN = ["data.img_size=32", "data.batch_size=4", "engine.log_every=1"]


def _one_error_line(capsys, command: str) -> str:
    """The error is the last line of stderr and the only one of fastmask's (DeepSpeed and torch may
    log their own start-up lines before it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines[-1].startswith(f"fastmask {command}: error:"), err
    assert sum(line.startswith("fastmask") for line in lines) == 1, err
    return lines[-1]


def test_overrides_are_taken_anywhere_on_the_line(capsys):
    """`key=value` before and after options (and around deepspeed's --local_rank), last one wins."""
    argv = ["pretrain", "--print-config", "data.batch_size=2", "--steps", "6", "engine.lr=1e-3", "--out", "D",
            "--local_rank=0", "data.batch_size=3", "--no-resume", "engine.warmup_steps=1E1"]
    assert main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["batch_size"] == 3 and cfg["engine"]["steps"] == 6
    assert cfg["engine"]["lr"] == 0.001 and cfg["engine"]["warmup_steps"] == 10
    # The same for the eval-side commands (--set and bare key=value mix, in line order).
    rc = main(["visualize", "--random-init", "--set", "model=vit_tiny_patch16", "--out", "x.png",
               "model=vit_nope"])
    assert rc == 2 and "unknown ViT model 'vit_nope'" in _one_error_line(capsys, "visualize")
    # A token that is no key=value is still argparse's error.
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--print-config", "engine.lr=1e-3", "--steps", "2", "stray"])
    assert e.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err


def test_out_under_a_file_and_export_onto_a_folder_fail_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["pretrain", "--out", str(tmp_path / "file" / "run"), *TINY_RUN]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys, "pretrain")
    (tmp_path / "enc").mkdir()
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--export", str(tmp_path / "enc"), *TINY_RUN]) == 2
    assert "--export" in _one_error_line(capsys, "pretrain")
    assert not run.exists() and not list(tmp_path.glob("**/*.tmp*"))  # refused before training


def test_read_only_run_folder_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """A run folder this process may not write. Root ignores permission bits (os.access says yes,
    and writes succeed), so as root the check's verdict is simulated; as another user the chmod
    alone decides."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    os.chmod(run, 0o555)
    try:
        if os.access(run, os.W_OK):  # root
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == run else real(p, mode))
        assert main(["pretrain", "--out", str(run), *TINY_RUN]) == 2
        assert f"folder {run} is not writable" in _one_error_line(capsys, "pretrain")
        assert (run / "config.yaml").read_text() == "{}\n"
    finally:
        os.chmod(run, 0o755)


def test_error_during_training_is_one_line_naming_the_kept_checkpoint(tmp_path, capsys, monkeypatch):
    """A disk that fills up at the second checkpoint: one line, and the first checkpoint is named."""
    import errno

    from fastmask.engine import checkpoint

    real_save = checkpoint.save

    def save(engine, out, step, *args, **kwargs):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out))
        return real_save(engine, out, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save)
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--steps", "3", "engine.checkpoint_every=1", *TINY_RUN]) == 2
    err = _one_error_line(capsys, "pretrain")
    assert "No space left on device" in err and str(run / "checkpoints" / "step_00000001") in err
    # The kept checkpoint exports; a failed export leaves no temporary file behind.
    from fastmask.engine import export

    def broken_save(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.torch, "save", broken_save)
    with pytest.raises(OSError):
        export.export_encoder(run, tmp_path / "enc.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bench_plot_without_matplotlib_fails_before_the_benchmark(tmp_path, capsys, monkeypatch):
    import fastmask.bench.step as step

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(step, "run_step_bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert main(["bench", "--plot", str(tmp_path / "p.png"), "--out", str(tmp_path / "r.json")]) == 2
    assert "--plot needs matplotlib" in _one_error_line(capsys, "bench")
    assert not list(tmp_path.iterdir())


def test_an_unexpected_exception_is_one_line_too(capsys, monkeypatch):
    import fastmask.info as info

    monkeypatch.setattr(info, "report", lambda: None.missing)
    assert main(["info"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastmask info: internal error: AttributeError") and "FASTMASK_DEBUG=1" in err
    assert "\n" not in err
    monkeypatch.setenv("FASTMASK_DEBUG", "1")
    with pytest.raises(AttributeError):
        main(["info"])


def test_ctrl_c_is_one_line_with_status_130(capsys, monkeypatch):
    import fastmask.info as info

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "report", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "fastmask info: interrupted"


def test_info_lists_every_registered_op(capsys):
    from fastmask import info
    from fastmask.ops import backends

    backends._load_optional_backends()
    assert set(info.OPS) == set(backends._REGISTRY)  # patch_embed_visible was missing
    assert main(["info", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["ops"]) == set(info.OPS) \
        and rep["ops"]["patch_embed_visible"]["cpu/float32"]["auto"] == "torch"
