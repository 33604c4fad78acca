"""Nothing wrong gets through the trial (issue 13, items 1, 3, 6, 8), without Ray: divergence stops a
trial with its cause, checkpoints never execute code, bad weight files are named, one driver per
sweep. The sweep-level behaviour of the same (through ``sweeps/ablation.py``) is in
``test_failures_cli.py`` and ``test_failures_sweep.py``."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, load_pretrained
from sweeps.config import parse_cli_overrides
from sweeps.failures import CheckpointRefused, TrialDiverged, classify
from sweeps.grid import expand, load_grid, load_preset
from sweeps.lock import SweepLock, SweepLocked
from sweeps.loop import STATE_FILE, TrialLoop, load_state, prepared_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def trial_config(cache, *overrides: str):
    over = parse_cli_overrides([f"data.cache_dir={cache}", "data.train_limit=128", "data.eval_limit=64",
                                "train.batch_size=32", "train.epochs=2", *overrides])
    plan = expand(load_grid("paper"), load_preset("smoke"), cli_overrides=over, cells=["softmax"])
    cfg = plan.trials[0].config
    return prepared_config(cfg)


class Tracker:
    """Records what the loop sends to MLflow (TrialTracker's interface, no server)."""

    def __init__(self):
        self.run_id, self.tags, self.status, self.epochs = "run", {}, "RUNNING", []

    def catch_up(self, history):
        return 0

    def log_metrics(self, metrics, step=0):
        pass

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_epoch(self, epoch, metrics):
        self.epochs.append(epoch)

    def log_text(self, *a):
        pass

    def log_dict(self, *a):
        pass

    def log_bytes(self, *a):
        pass

    def finish(self, status="FINISHED"):
        self.status = status


def test_a_diverging_trial_stops_at_its_first_non_finite_step_and_its_run_fails_with_the_cause(cache):
    torch.set_num_threads(1)
    loop = TrialLoop(trial_config(cache, "train.lr=1e6"), log=lambda _m: None)
    tracker = Tracker()
    with pytest.raises(TrialDiverged) as info:
        loop.fit(lambda metrics, state: "unused", tracker)
    err = info.value
    assert err.epoch == 1 and 1 <= err.step <= 4 and not math.isfinite(err.loss)
    assert f"training epoch 1, step {err.step}: loss nan" in str(err)
    assert "no checkpoint was written before it" in str(err)
    assert classify(err) == ("diverged", str(err))
    # the run is FAILED with the cause; no epoch (no accuracy) was logged
    assert tracker.status == "FAILED" and tracker.epochs == []
    assert tracker.tags["failure.kind"] == "diverged" and tracker.tags["failure.reason"] == str(err)


def test_divergence_after_a_checkpoint_names_it_and_the_allowed_non_finite_steps_are_skipped(cache):
    torch.set_num_threads(1)
    cfg = trial_config(cache, "train.max_nonfinite_steps=2")
    loop = TrialLoop(cfg, log=lambda _m: None)
    steps_per_epoch = loop.final.adapter.data.train.num_batches(cfg.train.batch_size)

    def report(metrics, state):
        # After the first epoch's checkpoint a weight goes NaN: every later loss is NaN.
        with torch.no_grad():
            next(loop.final.model.parameters()).fill_(float("nan"))
        return f"/runs/train/softmax-s0/checkpoint_epoch{int(metrics['epoch'])}"

    with pytest.raises(TrialDiverged) as info:
        loop.fit(report)
    err = info.value
    # two non-finite steps skipped (train.max_nonfinite_steps=2), the third stops the trial
    assert (err.epoch, err.step) == (2, steps_per_epoch + 3)
    assert "3 non-finite steps, more than train.max_nonfinite_steps=2" in str(err)
    assert "last finite checkpoint: /runs/train/softmax-s0/checkpoint_epoch1" in str(err)
    assert loop.final.guard.count == 3 and loop.state_dict()["nonfinite_steps"] == 3


class RunsCode:
    """Unpickling this calls ``Path(marker).touch()``: what a planted state.pt would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def bad_files(folder: Path, good_state: dict) -> dict[str, Path]:
    """A malicious, an empty, a truncated and a text file, each in the checkpoint's place."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "code-ran"
    files = {name: folder / f"{name}.pt" for name in ("malicious", "empty", "truncated", "text")}
    torch.save({"model": {}, "optimizer": {}, "epoch": 1, "payload": RunsCode(marker)}, files["malicious"])
    files["empty"].write_bytes(b"")
    torch.save(good_state, folder / "whole.pt")
    whole = (folder / "whole.pt").read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    files["text"].write_text("epoch: 1\nweights: see the other file\n")
    return files


def test_a_trial_checkpoint_is_loaded_without_executing_anything_and_bad_ones_name_their_path(cache, tmp_path):
    torch.set_num_threads(1)
    loop = TrialLoop(trial_config(cache, "train.epochs=1"), log=lambda _m: None)
    states = []
    loop.fit(lambda metrics, state: states.append(state))
    torch.save(states[-1], tmp_path / STATE_FILE)
    assert load_state(tmp_path / STATE_FILE)["epoch"] == 1

    files = bad_files(tmp_path / "bad", states[-1])
    expected = {"malicious": "could run code", "empty": "is empty", "truncated": "cannot be read",
                "text": "cannot be read"}
    for name, path in files.items():
        with pytest.raises(CheckpointRefused) as info:
            load_state(path)
        assert str(path) in str(info.value) and expected[name] in str(info.value), (name, info.value)
        assert classify(info.value)[0] == "checkpoint"
    assert not (tmp_path / "bad" / "code-ran").exists(), "unpickling the planted checkpoint ran its code"


def test_a_checkpoint_written_before_the_rng_state_became_tensors_still_loads(tmp_path):
    import random

    import numpy as np

    from sweeps.loop import set_rng_state

    np.random.seed(3)
    old = {"model": {}, "optimizer": {}, "epoch": 2,
           "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    torch.save(old, tmp_path / STATE_FILE)
    expected = np.random.rand(3)
    set_rng_state(load_state(tmp_path / STATE_FILE)["rng"])
    np.testing.assert_array_equal(np.random.rand(3), expected)


def test_bad_init_checkpoints_are_refused_naming_the_file_without_running_code(cache, tmp_path):
    import models

    cfg = trial_config(cache)
    model = models.build_model(cfg.model)
    files = bad_files(tmp_path, {k: v for k, v in model.state_dict().items()})
    before = copy.deepcopy(model.state_dict())
    for name, path in files.items():
        with pytest.raises(CheckpointError) as info:
            load_pretrained(model, path, verbose=False)
        assert f"checkpoint {path}" in str(info.value) and "not a readable torch weights file" in str(info.value)
        if name == "malicious":
            assert "could run code" in str(info.value)
    assert not (tmp_path / "code-ran").exists()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


HOLD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from sweeps.lock import SweepLock
    lock = SweepLock({runs!r}, "demo").acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def test_one_driver_per_sweep_and_a_dead_drivers_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), runs=str(tmp_path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepLocked) as info:
            SweepLock(tmp_path, "demo").acquire()
        message = str(info.value)
        assert f"PID {holder.pid} on host {os.uname().nodename}" in message and "another --name" in message
        SweepLock(tmp_path, "other").acquire().release()  # another sweep in the same runs dir: fine
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale, and the next driver takes it over
    lock = SweepLock(tmp_path, "demo").acquire()
    assert lock.stale is not None and lock.stale["pid"] == holder.pid
    lock.release()
    assert not lock.path.exists()


def test_a_lock_held_from_another_host_is_stale_once_its_heartbeat_stops(tmp_path):
    path = tmp_path / "sweeps" / "demo.lock"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": "head-pod-0", "pid": 7, "started": 0, "argv": ["sweeps/ablation.py"]}))
    stop = threading.Event()

    def heartbeat():  # a live driver on the other host
        while not stop.wait(0.1):
            os.utime(path)

    beating = threading.Thread(target=heartbeat)
    beating.start()
    try:
        with pytest.raises(SweepLocked, match="PID 7 on host head-pod-0.*heartbeat is alive"):
            SweepLock(tmp_path, "demo", lease_s=1.0).acquire()
    finally:
        stop.set()
        beating.join()
    lock = SweepLock(tmp_path, "demo", lease_s=1.0).acquire()  # the heartbeat stopped: taken over
    assert lock.stale["host"] == "head-pod-0"
    first = path.stat().st_mtime_ns
    time.sleep(0.5)
    assert path.stat().st_mtime_ns != first, "the holder's heartbeat does not touch the lock"
    lock.release()


def test_mlflow_filter_values_are_quoted_so_that_quotes_in_names_cannot_break_them():
    from reports.store import ReportError
    from reports.store import quote as report_quote
    from sweeps.tracking import TrackingError, quote

    for q, error in ((quote, TrackingError), (report_quote, ReportError)):
        assert q("smoke-paper") == "'smoke-paper'"
        assert q("it's") == '"it\'s"'
        assert q('say "hi"') == "'say \"hi\"'"
        with pytest.raises(error):
            q("""it's "both\"""")
