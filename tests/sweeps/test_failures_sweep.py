"""Nothing wrong gets through a running sweep (issue 13, items 1, 3, 6, 9), end to end through
``sweeps/ablation.py`` against a real Ray head and a real MLflow store:

* a diverging cell ends FAILED with its cause (step, loss, last checkpoint), is not retried, shows
  in the report as failed with the reason, and the other trials finish, whichever executor runs
  the trials; a second driver on the same sweep is refused meanwhile;
* after a SIGKILLed driver, the rerun first closes the runs it left RUNNING as KILLED, and a
  ``state.pt`` planted in a checkpoint folder is refused without running its code, whichever
  executor runs the trial (Ray Train's checkpoints or the in-process trial's, found through its
  pointer);
* SIGTERM ends a sweep that started its own Ray like Ctrl-C, and none of that Ray's processes
  outlive the driver.

Small on purpose (a few tiny trials): the whole CI has a time budget.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
ABLATION = [sys.executable, str(ROOT / "sweeps" / "ablation.py")]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """One easy-VQA cache for the module's sweeps (each sweep would otherwise build its own)."""
    return tmp_path_factory.mktemp("cache")


def runs_of(uri: str, sweep: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("adaptive-ablation")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`sweep.id` = '{sweep}'", max_results=100)
    return client, {r.data.tags.get("trial.key", "parent"): r for r in runs}


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}:\n"
                                 + (log.read_text()[-4000:] if log else ""))
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.parametrize("executor", ["in_process", "train"])
def test_a_diverged_cell_fails_with_its_cause_while_the_others_finish_and_a_second_driver_is_refused(
        executor, ray_head, tmp_path, data_cache):
    grid = tmp_path / "diverge.yaml"
    grid.write_text(
        "name: diverge\n"
        "cells:\n"
        "  good: {set: {model.attention.name: softmax}, label: good, table: 1}\n"
        "  diverge: {set: {model.attention.name: softmax, train.lr: 1.0e+6}, label: lr 1e6, table: 1}\n"
        "axes:\n"
        "  - product: {cell: [good, diverge]}\n"
    )
    runs = tmp_path / "runs"
    args = [*ABLATION, "--preset", "smoke", "--grid", str(grid), "--name", "div", "--runs-dir", str(runs),
            "--no-report", f"data.cache_dir={data_cache}", "data.train_limit=256", "data.eval_limit=64",
            "train.epochs=1", f"resources.executor={executor}"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(args, cwd=tmp_path, env=ray_head.env(), stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        wait_for(lambda: (runs / "sweeps" / "div.lock").exists(), 120, "the first driver's lock", first, log)
        second = subprocess.run(args, cwd=tmp_path, env=ray_head.env(), capture_output=True, text=True, timeout=120)
        refused = second.stdout + second.stderr
        assert second.returncode == 2, refused
        assert f"sweep 'div' in {runs} is being run by another driver: PID {first.pid} on host" in refused
        assert "Traceback" not in refused
        first.wait(timeout=600)
    finally:
        stop(first)
    output = log.read_text()
    assert first.returncode == 1, output[-5000:]  # a trial failed
    assert "FAILED diverge" in output and "not retried: diverged at training epoch 1, step" in output
    assert "sweep 'div' incomplete: 1/2 trials finished" in output
    assert not (runs / "sweeps" / "div.lock").exists()

    uri = f"sqlite:///{runs / 'mlflow.db'}"
    client, found = runs_of(uri, "div")
    good, bad = found["good"], found["diverge"]
    assert good.info.status == "FINISHED" and good.data.metrics["best/acc"] > 0
    assert bad.info.status == "FAILED"
    reason = bad.data.tags["failure.reason"]
    assert bad.data.tags["failure.kind"] == "diverged"
    assert reason.startswith("diverged at training epoch 1, step ") and "loss nan" in reason
    assert "no checkpoint was written before it" in reason
    assert bad.data.tags["trial.attempt"] == "1", "the diverged trial was retried"
    assert bad.data.tags["trial.executor"] == good.data.tags["trial.executor"] == executor
    assert "best/acc" not in bad.data.metrics and "eval/acc" not in bad.data.metrics
    assert json.loads(found["parent"].data.tags["sweep.failed"])["diverge"].startswith("diverged at")

    # the report: the cell as failed with its reason, never an accuracy
    code = subprocess.run([sys.executable, "-m", "reports", "--tracking-uri", uri, "--sweep", "div", "--no-log",
                           "--out", str(tmp_path / "report")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stdout + code.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| diverge | diverge |"))
    assert "FAILED" in row and "run status FAILED: diverged at training epoch 1" in row
    table_row = next(line for line in report.splitlines() if line.startswith("| lr 1e6 |"))
    assert "0/1" in table_row and not any(ch.isdigit() for ch in table_row.split("0/1", 1)[1])


class RunsCode:
    """Unpickling this creates ``marker``: a checkpoint planted to run code on resume."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("executor", ["in_process", "train"])
def test_after_a_killed_driver_its_runs_are_closed_first_and_a_planted_checkpoint_is_refused(
        executor, ray_head, tmp_path, data_cache):
    runs = tmp_path / "runs"
    args = [*ABLATION, "--preset", "smoke", "--cells", "softmax", "--name", "kill", "--runs-dir", str(runs),
            "--no-report", f"data.cache_dir={data_cache}", "train.epochs=20", f"resources.executor={executor}"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(args, cwd=tmp_path, env=ray_head.env(), stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    train = runs / "ray" / "kill" / "train"
    uri = f"sqlite:///{runs / 'mlflow.db'}"

    # What a rerun resumes from: Ray Train's own record, or the in-process trial's pointer
    snapshot = train / "softmax-s0" / "checkpoint_manager_snapshot.json"
    pointer = train / "softmax-s0" / "in_process_checkpoint.json"

    def registered_a_checkpoint() -> bool:
        try:
            if executor == "train":
                return "checkpoint_dir_name" in snapshot.read_text()
            return (Path(json.loads(pointer.read_text())["checkpoint"]) / "state.pt").is_file()
        except (OSError, ValueError):
            return False

    try:
        wait_for(registered_a_checkpoint, 600, "a first registered checkpoint", first, log)
    finally:
        stop(first)
    _, before = runs_of(uri, "kill")
    assert {r.info.status for r in before.values()} == {"RUNNING"}, "the killed driver's runs should be open"
    assert (runs / "sweeps" / "kill.lock").exists()

    marker = tmp_path / "code-ran"
    planted = sorted((runs / "ray" / "kill").glob("**/checkpoint_*/state.pt"))  # Train's and Tune's folders
    assert planted
    for path in planted:
        torch.save({"model": {}, "optimizer": {}, "epoch": 1, "payload": RunsCode(marker)}, path)
    # Tune's own saved state is pickled too: a rerun must not unpickle it either
    tune_state = runs / "ray" / "kill" / "tuner.pkl"
    assert tune_state.exists()
    tune_state.write_bytes(pickle.dumps(RunsCode(tmp_path / "tune-code-ran")))

    second = subprocess.run(args, cwd=tmp_path, env=ray_head.env(), capture_output=True, text=True, timeout=600)
    output = second.stdout + second.stderr
    assert second.returncode == 1, output[-5000:]
    assert not marker.exists(), "resuming executed code from the planted state.pt"
    assert not (tmp_path / "tune-code-ran").exists(), "resuming unpickled Tune's saved state"
    # before anything else: the stale lock taken over, the dead driver's runs closed
    assert f"a previous driver of 'kill' (PID {first.pid} on host" in output
    closed = output.index("closed 2 run(s) a previous driver left RUNNING as KILLED")
    assert closed < output.index("running on") < output.index("restoring 'kill': 0 ended trial(s) kept, 1 to run")
    assert "FAILED softmax-s0" in output and "could run code" in output
    client, after = runs_of(uri, "kill")
    run = after["softmax-s0"]
    assert run.info.run_id == before["softmax-s0"].info.run_id
    assert run.info.status == "FAILED" and run.data.tags["failure.kind"] == "checkpoint"
    # the in-process trial moves the checkpoint it resumes from out of Tune's numbering first
    named = planted if executor == "train" else [train / "softmax-s0" / "resumed_checkpoint" / "state.pt"]
    assert any(str(p) in run.data.tags["failure.reason"] for p in named), run.data.tags["failure.reason"]
    assert run.data.tags["trial.attempt"] == "2", "opened by the first driver and once on resume, no retry"


def _marked_processes(mark: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"ABLATION_TEST_MARK={mark}".encode() in (proc / "environ").read_bytes():
                found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:120]!r}")
        except OSError:
            continue
    return found


def test_sigterm_stops_a_sweep_like_ctrl_c_and_no_process_of_its_ray_outlives_it(tmp_path, data_cache):
    mark = uuid.uuid4().hex
    env = dict(os.environ, ABLATION_TEST_MARK=mark, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    runs = tmp_path / "runs"
    args = [*ABLATION, "--preset", "smoke", "--cells", "softmax", "--name", "term", "--runs-dir", str(runs),
            "--no-report", f"data.cache_dir={data_cache}", "train.epochs=20"]
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        tune_dir = runs / "ray" / "term"  # Tune's checkpoints (<key>/) or Ray Train's (train/<key>/)
        wait_for(lambda: any(tune_dir.glob("**/checkpoint_*")), 600, "the trial's first checkpoint", driver, log)
        assert _marked_processes(mark), "the test cannot see the sweep's Ray processes"
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=180)
    finally:
        stop(driver)
    output = log.read_text()
    assert driver.returncode == 130, output[-4000:]
    assert "interrupted; rerun the same command to resume it" in output
    deadline = time.time() + 60
    while _marked_processes(mark) and time.time() < deadline:
        time.sleep(1)
    assert not _marked_processes(mark), _marked_processes(mark)
    assert not (runs / "sweeps" / "term.lock").exists()
    _, found = runs_of(f"sqlite:///{runs / 'mlflow.db'}", "term")
    assert found["parent"].info.status == "KILLED" and found["parent"].data.tags["sweep.status"] == "interrupted"
    assert found["softmax-s0"].info.status == "KILLED"
