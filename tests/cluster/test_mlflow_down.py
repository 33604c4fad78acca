"""An MLflow server that disappears mid-sweep and stays away longer than the trials retry.

The trial fails with a TrackingError that names the server and what it was doing (in the sweep's
output and in the parent run's ``sweep.failed``), and nothing is lost: the epoch MLflow missed is
in the trial's checkpoint, and rerunning the same command with the server back logs it, once.

Its own one-node cluster (one for both executors, whose tests run one after the other): the
trials' retry budget (MLFLOW_RETRY_SECONDS, read by the workers from their node's environment) is a
few seconds here, while the driver keeps the default (120 s), long enough for the test to bring the
server back before the driver records the failure.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from cluster_testutils import (
    EXECUTORS,
    MLFLOW_CLIENT_ENV,
    Driver,
    MlflowServer,
    checkpoint_states,
    steps,
    sweep_args,
    sweep_runs,
)
from helpers import free_port, start_ray_head, stop_process_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RETRY_S = 4


@pytest.fixture(scope="module")
def short_retry_head(tmp_path_factory):
    """A one-CPU Ray head whose trials give MLflow RETRY_S seconds."""
    head = start_ray_head(tmp_path_factory.mktemp("mlflow-down-head"), num_cpus=1,
                          env={"MLFLOW_RETRY_SECONDS": str(RETRY_S), **MLFLOW_CLIENT_ENV})
    try:
        yield head
    finally:
        stop_process_group(head.proc)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_mlflow_down_for_good_fails_the_trial_clearly_and_a_rerun_catches_up(executor, short_retry_head, tmp_path,
                                                                             cluster_data_cache, monkeypatch):
    for key, value in MLFLOW_CLIENT_ENV.items():
        monkeypatch.setenv(key, value)
    runs = tmp_path / "runs"
    # max_failures=0: one attempt per Tune attempt (Train path: one worker group; Tune itself
    # retries a trial once; in-process: Tune's one retry is max_failures + 1).
    args = sweep_args("mlflow-down", runs, cluster_data_cache, "--cells", "softmax", "--verbose",
                      "train.epochs=2", "resources.max_failures=0", f"resources.executor={executor}")
    head = short_retry_head
    server = MlflowServer(tmp_path / "mlflow", free_port())
    first = second = None
    try:
        server.start()
        sweep_runs(server.url, "mlflow-down")  # imports and connects the test's client before the clock runs
        env = {**head.env(RAY_DEDUP_LOGS="0", **MLFLOW_CLIENT_ENV), "MLFLOW_TRACKING_URI": server.url}
        first = Driver(args, env, tmp_path / "first.log", tmp_path)
        # Epoch 1 reaches MLflow, then the server is gone: epoch 2 is trained and checkpointed,
        # and its logging fails after RETRY_S, on both attempts Tune gives the trial.
        _wait_until_epoch_1_logged(server.url, first, 300)
        server.kill()
        first.wait_for(r"FAILED softmax-s0 \(1/1\)", 300)
        server.start()  # back before the driver's own retries end: it records the failure
        assert first.wait(300) == 1, first.tail()

        out = first.output
        summary = re.search(r"^\s*FAILED softmax-s0: (.*)$", out, re.M)
        assert summary, first.tail()
        reason = summary.group(1)
        assert "TrackingError" in reason and f"MLflow {server.url} failed for {RETRY_S} s while trying to" in reason
        assert "Traceback" not in out.split("sweep 'mlflow-down' incomplete")[-1], first.tail()
        client, parents, children = sweep_runs(server.url, "mlflow-down")
        assert parents[0].data.tags["sweep.status"] == "incomplete"
        failed = json.loads(parents[0].data.tags["sweep.failed"])
        assert list(failed) == ["softmax-s0"] and f"MLflow {server.url} failed for" in failed["softmax-s0"]
        assert len(children) == 1 and steps(client, children[0].info.run_id, "epoch") == [1]
        run_id = children[0].info.run_id
        # Not dropped: the trial's newest checkpoint holds epoch 2's metrics.
        state = checkpoint_states(runs, "mlflow-down", "softmax-s0")[-1]
        assert [epoch for epoch, _ in state["history"]] == [1, 2]

        # The same command with the server back: the sweep resumes the failed trial from that
        # checkpoint, which logs the missing epoch, once.
        second = Driver(args, env, tmp_path / "second.log", tmp_path)
        assert second.wait(300) == 0, second.tail()
        assert re.search(r"restoring 'mlflow-down'", second.output), second.tail()
        assert "logged 1 epoch(s) the checkpoint held but MLflow lacked" in second.output, second.tail()
        client, parents, children = sweep_runs(server.url, "mlflow-down")
        assert parents[0].data.tags["sweep.status"] == "complete"
        assert [r.info.run_id for r in children] == [run_id] and children[0].info.status == "FINISHED"
        assert children[0].data.tags["trial.executor"] == executor
        for metric in ("epoch", "train/loss", "eval/acc"):
            assert steps(client, run_id, metric) == [1, 2], metric
        logged = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
        assert logged[2] == pytest.approx(state["history"][1][1]["train/loss"])
    finally:
        for driver in (first, second):
            if driver is not None:
                driver.stop()
        server.stop()


def _wait_until_epoch_1_logged(uri: str, driver: Driver, timeout_s: float = 120) -> None:
    """Until MLflow has epoch 1's last artifact (the best model, logged after its metrics and
    other artifacts), so that the outage hits epoch 2 and nothing of epoch 1. Polls fast: epoch 2
    takes a few seconds."""
    deadline = time.time() + timeout_s
    run_id = ""
    while time.time() < deadline:
        assert driver.proc.poll() is None, driver.tail()
        if not run_id:
            client, _, children = sweep_runs(uri, "mlflow-down")
            run_id = children[0].info.run_id if children else ""
        elif any(a.path == "checkpoint/best_model.pt" for a in client.list_artifacts(run_id, "checkpoint")):
            assert steps(client, run_id, "epoch") == [1]
            return
        time.sleep(0.05)
    raise AssertionError(f"epoch 1 not fully in MLflow after {timeout_s:.0f} s\n{driver.tail()}")
