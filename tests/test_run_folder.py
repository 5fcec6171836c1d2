"""A run folder that never loses work (issue 17): each test reproduces one of the issue's commands.

- item 1: a manual rollback resumes the newest complete checkpoint, found by scanning, and deletes
  nothing it did not write; `engine.resume_from` leaves an abandoned future aside, not deleted;
- `--no-resume` moves the old run aside, so keep_last holds for the folder;
- item 2: a second run on a locked folder is refused naming the holder; a dead holder's lock is no obstacle;
- item 3: exploded weights are not a good checkpoint (the issue's engine.lr=1000000.0 run), and
  resuming with a small lr from the one named trains;
- item 4: SIGTERM saves a checkpoint at the next step and exits 143 (sent to a subprocess this test started);
- item 6: a changed config is compared with the checkpoint's before anything is written;
- item 10: without a TTY a plain line per logged step; the run folder holds ds_config.json.
TinyMethod runs in this process where only the engine matters; `fastmask pretrain` (through
fastmask.cli.main, or a subprocess for the signal) where the command line does.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_helpers import TinyMethod, tiny_config, tiny_factory
from fastmask.cli import main
from fastmask.engine import checkpoint as ckpt
from fastmask.engine.config import Config, ConfigError, to_dict
from fastmask.engine.config_diff import RULES, flatten
from fastmask.engine.runlock import RunLock, RunLockedError
from fastmask.engine.signals import StopOnSignal
from fastmask.engine.trainer import pretrain

HERE = Path(__file__).parent


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _rows(out: Path) -> list[dict]:
    return [r for r in _lines(out / "metrics.jsonl") if "event" not in r]


def _tags(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step_"))


def _tiny(out: Path, *overrides: str, steps: int, factory=None):
    return pretrain(tiny_config(*overrides, steps=steps), out=out, method_factory=factory or tiny_factory(),
                    progress=False)


def test_manual_rollback_resumes_the_newest_complete_checkpoint_and_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "R"
    _tiny(out, "engine.checkpoint_every=1", "engine.stop_at=5", steps=8)
    first_rows = (out / "metrics.jsonl").read_text().splitlines()
    assert _tags(out / "checkpoints") == ["step_00000004", "step_00000005"]
    # the rollback: `latest` names a missing folder
    shutil.rmtree(out / "checkpoints" / "step_00000005")
    capsys.readouterr()
    rest = _tiny(out, "engine.checkpoint_every=1", steps=8)
    err = capsys.readouterr().err
    assert rest.resumed_from == 4 and rest.step == 8
    assert (f"resuming from {out / 'checkpoints' / 'step_00000004'} at step 4 (checkpoints/latest names "
            "step_00000005, which is missing") in err
    # metrics.jsonl was trimmed to step 4, not rewritten; the dropped line is kept in the archive.
    assert (out / "metrics.jsonl").read_text().splitlines()[:4] == first_rows[:4]
    assert [r["step"] for r in _rows(out)] == list(range(1, 9))
    archived = list((out / "archive").glob("*-after-step-4/metrics.jsonl"))
    assert len(archived) == 1 and [r["step"] for r in _lines(archived[0])] == [5]
    assert _tags(out / "checkpoints") == ["step_00000007", "step_00000008"]
    # Item 10 (no TTY under pytest): one plain line per logged step, the bar's fields.
    line = r"^step 8/8 \| loss \d+\.\d{4} \| lr \S+ \| \S+ img/s \| \S+ s/step \| \S+ elapsed, \S+ left$"
    assert re.search(line, err, re.M)
    # The DeepSpeed config the run used.
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"]["stage"] == 0


def test_resume_from_an_earlier_checkpoint_moves_the_abandoned_future_aside(tmp_path, capsys):
    out, keep = tmp_path / "R", ("engine.checkpoint_every=1", "engine.keep_last=3")
    _tiny(out, *keep, steps=6)
    future = json.loads((out / "checkpoints" / "step_00000006" / ckpt.STATE_FILE).read_text())
    rest = _tiny(out, *keep, "engine.resume_from=4", steps=6)
    assert rest.resumed_from == 4 and "(engine.resume_from=4)" in capsys.readouterr().err
    moved = list((out / "archive").glob("*-after-step-4"))
    assert len(moved) == 1 and _tags(moved[0] / "checkpoints") == ["step_00000005", "step_00000006"]
    assert json.loads((moved[0] / "checkpoints" / "step_00000006" / ckpt.STATE_FILE).read_text()) == future
    assert [r["step"] for r in _lines(moved[0] / "metrics.jsonl")] == [5, 6]
    assert _tags(out / "checkpoints") == ["step_00000004", "step_00000005", "step_00000006"]
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5, 6]
    # A checkpoint folder anywhere (here the abandoned step 6): this folder's own run moves aside.
    again = _tiny(out, *keep, f"engine.resume_from={moved[0] / 'checkpoints' / 'step_00000006'}", steps=7)
    assert again.resumed_from == 6 and _tags(out / "checkpoints") == ["step_00000007"]
    previous = list((out / "archive").glob("*-previous-run"))
    assert len(previous) == 1
    assert _tags(previous[0] / "checkpoints") == ["step_00000004", "step_00000005", "step_00000006"]
    with pytest.raises(ConfigError, match=r"engine.resume_from=3: .* is not a complete checkpoint \(complete "
                                          r"checkpoints in .*: 7\)"):
        _tiny(out, "engine.resume_from=3", steps=8)


def test_no_resume_moves_the_previous_run_aside_so_keep_last_holds(tmp_path, capsys):
    out = tmp_path / "R"
    for _ in range(2):
        _tiny(out, "engine.checkpoint_every=1", "engine.resume=never", steps=3)
    assert _tags(out / "checkpoints") == ["step_00000002", "step_00000003"]  # keep_last=2 in the folder
    previous = list((out / "archive").glob("*-previous-run"))
    assert len(previous) == 1
    assert sorted(p.name for p in (previous[0] / "checkpoints").iterdir()) == ["latest", "step_00000002",
                                                                               "step_00000003"]
    assert len(_rows(previous[0])) == 3 and (previous[0] / "config.yaml").is_file()
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    assert f"a new run: the previous run in {out}" in capsys.readouterr().err


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "R"
    with RunLock(out):
        with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()} on "):
            _tiny(out, steps=2)
        rc = main(["pretrain", "--out", str(out), "--steps", "2", "data.img_size=32"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("fastmask pretrain: error:") and f"pid {os.getpid()}" in err
        assert "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    # A holder killed without any clean-up (os._exit) leaves its record, but no lock.
    code = (f"import os; from fastmask.engine.runlock import RunLock; RunLock({str(out)!r}).acquire(); "
            "os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 9
    assert json.loads((out / ".lock").read_text())["pid"] != os.getpid()
    assert _tiny(out, steps=2).step == 2


def test_a_loss_blow_up_makes_checkpoints_not_good_and_resume_refuses_them(tmp_path, capsys):
    # lr=1 on TinyMethod: the loss goes from ~2 to ~1e6 in one step (finite), the weights ~30 x.
    out = tmp_path / "R"
    _tiny(out, "engine.lr=1.0", "engine.warmup_steps=0", "engine.checkpoint_every=1", "engine.keep_last=5",
          steps=3)
    health = {t: ckpt.read_state(out, t)["health"] for t in _tags(out / "checkpoints")}
    assert [h["good"] for h in health.values()] == [False, False, False]
    assert "the first loss from its weights (step 2)" in health["step_00000001"]["why"][0]
    assert "the loss logged at step 2" in health["step_00000002"]["why"][0]
    assert ckpt.latest_tag(out) is None
    with pytest.raises(ConfigError, match="holds checkpoints but none is good"):
        _tiny(out, steps=4)
    capsys.readouterr()
    again = _tiny(out, "engine.resume_from=1", "engine.lr=0.003", steps=4)
    assert again.resumed_from == 1 and "it is recorded as not good" in capsys.readouterr().err


def test_every_config_key_has_a_resume_rule():
    assert set(flatten(to_dict(Config()))) == set(RULES)


def test_resume_with_a_changed_config_refuses_before_writing_and_records_accepted_changes(tmp_path, capsys):
    out = tmp_path / "R"
    _tiny(out, "engine.checkpoint_every=2", steps=4)
    saved_yaml, saved_metrics = (out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()
    refusals = [
        (("model=vit_small_patch16", "data.img_size=64"), tiny_factory(),
         "data.img_size 32 -> 64; model vit_base_patch16 -> vit_small_patch16 (cannot change on resume)"),
        ((), tiny_factory(dim=32), "the method's parameters differ (reshaped: embed.weight [24, 3, 8, 8] -> "
                                   "[32, 3, 8, 8]"),
    ]
    for overrides, factory, needle in refusals:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            _tiny(out, *overrides, steps=6, factory=factory)
        assert (out / "config.yaml").read_text() == saved_yaml
        assert (out / "metrics.jsonl").read_text() == saved_metrics
    capsys.readouterr()
    rest = _tiny(out, "data.batch_size=4", "mask_ratio=0.6", "engine.checkpoint_every=2", steps=8)
    err = capsys.readouterr().err
    assert rest.resumed_from == 4 and rest.step == 8
    assert ("config changes accepted on resume at step 4: data.batch_size 8 -> 4, engine.steps 4 -> 8, "
            "mask_ratio 0.75 -> 0.6") in err
    assert ("lr schedule changed: the run had finished its 4-step schedule; warmup + cosine is re-stretched "
            "over 8 steps") in err
    events = [r for r in _lines(out / "metrics.jsonl") if "event" in r]
    assert len(events) == 1 and events[0]["step"] == 4 and events[0]["changes"] == {
        "data.batch_size": [8, 4], "engine.steps": [4, 8], "mask_ratio": [0.75, 0.6]}
    assert "batch_size: 4" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_exploded_weights_are_not_good_and_resuming_with_a_small_lr_trains(tmp_path, capsys):
    """The issue's `engine.lr=1000000.0` run (MAE ViT-Tiny through the CLI), then its advice followed."""
    out = tmp_path / "R"
    args = ["pretrain", "--out", str(out), "--steps", "5", "data.img_size=32", "data.batch_size=8",
            "engine.checkpoint_every=1"]
    assert main([*args, "engine.lr=1000000.0"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite loss at step" in last
    assert f"the newest good checkpoint is {out / 'checkpoints' / 'step_00000001'}" in last  # lr 0 in warmup
    exploded = ckpt.read_state(out, "step_00000002")["health"]
    assert exploded["good"] is False and exploded["why"][0].startswith("its weights grew")
    assert main([*args, "engine.lr=0.001"]) == 0
    captured = capsys.readouterr()
    assert "done: step 5/5, resumed at step 1" in captured.out
    assert "checkpoints/latest names step_0000000" in captured.err and "which is not good" in captured.err
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and all(r["loss"] < 2 for r in rows)
    # moved aside, not deleted
    assert list((out / "archive").glob("*-after-step-1/checkpoints/step_00000002"))
    # The item 6 on the real method: a deeper decoder or another image size is refused in one line.
    yaml_before = (out / "config.yaml").read_text()
    assert main([*args, "method_args.decoder_depth=3", "data.img_size=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.img_size 32 -> 64" in err and "decoder_blocks.2" in err
    assert (out / "config.yaml").read_text() == yaml_before


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143_while_a_second_run_is_refused(tmp_path):
    out = tmp_path / "R"
    cmd = [sys.executable, "-m", "fastmask.cli", "pretrain", "--out", str(out), "--steps", "100000",
           "data.img_size=32", "data.batch_size=8", "engine.log_every=1", "engine.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while len(_rows(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        # Item 2: a second run started on the same folder while this one trains.
        with pytest.raises(RunLockedError, match=f"in use by pid {proc.pid} on "):
            _tiny(out, steps=2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"fastmask pretrain: stopped by SIGTERM after step (\d+): checkpoint (\S+) saved; run "
                     r"the same command to resume", last)
    assert m, last
    step = int(m.group(1))
    assert step >= 2 and m.group(2) == str(out / "checkpoints" / f"step_{step:08d}")
    assert ckpt.latest_tag(out) == f"step_{step:08d}" and _rows(out)[-1]["step"] == step
    assert re.search(r"^step 2/100000 \| loss ", stderr, re.M)  # item 10: plain lines without a TTY
    with RunLock(out):  # the stopped run released its lock
        pass


def test_ctrl_c_once_stops_after_the_step_and_twice_stops_at_once():
    # Python's own SIGINT handler, as in a terminal, whatever started pytest: a shell's background job
    # starts with SIGINT ignored, and then the second Ctrl-C's "previous handler" would end pytest itself.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopOnSignal() as stop:  # the handler is called directly: no signal is sent to this process
            assert stop.requested() == 0
            stop._handle(signal.SIGINT, None)
            stop._handle(signal.SIGTERM, None)  # another kind while one is pending: the first stands
            assert stop.requested() == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):  # the same again: the previous handler (Python's) runs now
                stop._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.slow
@pytest.mark.multirank
def test_two_ranks_agree_on_a_signal_only_one_received_and_on_a_refusal(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = _clean_env()
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(HERE / "multirank_safety_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    seen = {(phase, r): json.loads((tmp_path / f"{phase}_rank{r}.json").read_text())
            for phase in ("sigterm", "refused", "resumed") for r in (0, 1)}
    run = tmp_path / "run"
    for r in (0, 1):
        assert seen["sigterm", r]["stopped"] == [signal.SIGTERM, 3,
                                                 str(run / "checkpoints" / "step_00000003")]
        assert "data.img_size 32 -> 64" in seen["refused", r]["error"]
        assert seen["resumed", r] == {"resumed_from": 3, "step": 6}
    assert seen["refused", 0] == seen["refused", 1]
    # ZeRO-3 partitions (padded) summed over the ranks give the whole model's weight scale.
    from fastmask.engine.trainer import _seed_all
    _seed_all(0)
    params = [p.detach().double() for p in TinyMethod().parameters()]
    rms = (sum((p ** 2).sum() for p in params) / sum(p.numel() for p in params)).sqrt().item()
    health = ckpt.read_state(run, "step_00000003")["health"]
    assert health["param_rms_init"] == pytest.approx(rms, rel=1e-6) and health["good"]
