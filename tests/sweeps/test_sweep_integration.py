"""The sweep end to end, against a real Ray head and a real MLflow store.

* the smoke preset submitted with ``ray job submit`` (session fixture ``smoke_sweep``): a parent
  run with one finished child per grid cell and seed, params, per-epoch metrics, span / alpha tables;
* killing the driver mid-sweep, then rerunning the same command: the sweep finishes with no
  duplicated and no lost child runs or epochs, for both executors (in the Tune trial's process,
  and on a Ray Train worker group);
* the same trials through both executors log the same numbers;
* bad grids, missing data and an unreachable MLflow server fail before any trial starts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import start_ray_head, stop_process_group
from mlflow import MlflowClient

from sweeps.grid import expand, load_grid, load_preset

ROOT = Path(__file__).resolve().parents[2]
ABLATION = [sys.executable, str(ROOT / "sweeps" / "ablation.py")]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """One easy-VQA cache (``data.cache_dir=``) for the sweeps of this module after the smoke
    sweep: the first builds it, the others reuse it instead of extracting features again."""
    return tmp_path_factory.mktemp("data-cache")


def sweep_runs(uri: str, sweep_id: str, experiment: str = "adaptive-ablation"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`sweep.id` = '{sweep_id}'",
                              max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    return client, parents, children


def artifact_text(client: MlflowClient, run_id: str, path: str) -> str:
    local = client.download_artifacts(run_id, path)
    return Path(local).read_text()


def test_smoke_sweep_logs_parent_and_one_finished_child_per_cell_and_seed(smoke_sweep):
    uri, sweep_id, experiment = smoke_sweep
    client, parents, children = sweep_runs(uri, sweep_id, experiment)
    plan = expand(load_grid("paper"), load_preset("smoke"))
    expected = {t.key: t for t in plan.trials}

    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.status"] == "complete"
    assert json.loads(parent.data.tags["sweep.trials"]) == list(expected)
    assert json.loads(parent.data.tags["sweep.pending"]) == {}  # grad_std runs (issue 6)
    assert parent.data.metrics["sweep/overhead_ratio"] > 0
    assert client.get_experiment_by_name(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    # The time account summed over the trials: step time within the trials' wall time, which is
    # within the slots' wall time (the trials phase, two at a time).
    m = parent.data.metrics
    assert 0 < m["sweep/goodput"] <= 1 and m["sweep/wall_over_ideal"] >= 1
    assert m["sweep/train_s"] + m["sweep/eval_s"] == pytest.approx(m["sweep/goodput"] * m["sweep/trials_sum_s"])
    assert m["sweep/trials_sum_s"] <= m["sweep/trials_wall_s"] * m["sweep/concurrency"] + 1

    assert sorted(r.data.tags["trial.key"] for r in children) == sorted(expected)
    for run in children:
        key = run.data.tags["trial.key"]
        trial = expected[key]
        assert run.info.status == "FINISHED", key
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["trial.cell"] == trial.cell.name
        assert run.data.tags["trial.seed"] == str(trial.seed)
        # params: the resolved config
        assert run.data.params["model.attention.name"] == trial.config.model.attention.name
        assert run.data.params["model.l_layers"] == str(trial.config.model.l_layers)
        assert run.data.params["train.epochs"] == str(trial.config.train.epochs)
        # the MLflow UI's Group by (docs/tracking.md): cell and seed as params
        assert (run.data.params["cell"], run.data.params["train.seed"]) == (trial.cell.name, str(trial.seed))
        # per-epoch metrics, each epoch once
        epochs = trial.config.train.epochs
        for metric in ("epoch", "eval/acc", "train/loss", "train/lr", "train/samples_per_s"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (key, metric)
        for metric in ("model/params", "model/flops_per_sample", "best/acc", "time/trial_s"):
            assert run.data.metrics[metric] > 0, (key, metric)
        assert run.data.metrics["best/acc"] <= 1.0
        # one worker, no GPU: the loop ran in the Tune trial's own process; its time, accounted
        assert run.data.tags["trial.executor"] == "in_process", key
        parts = [run.data.metrics[f"time/{p}"] for p in ("startup_s", "train_s", "eval_s", "checkpoint_s", "other_s")]
        assert all(p >= 0 for p in parts) and parts[0] > 0 and parts[1] > 0, (key, parts)
        assert sum(parts) == pytest.approx(run.data.metrics["time/wall_s"], rel=1e-6), key
        # the per-head table: spans for span cells, alphas for entmax cells
        rows = list(csv.DictReader(io.StringIO(artifact_text(client, run.info.run_id, "stats/attention_heads.csv"))))
        stats = {r["stat"] for r in rows}
        name = trial.config.model.attention.name
        assert ("span" in stats) == (name in ("span", "span_entmax")), key
        assert ("alpha" in stats) == (name in ("entmax", "span_entmax")), key
        if rows:
            assert {int(r["epoch"]) for r in rows} == set(range(1, epochs + 1))
            metric = f"{rows[0]['stat']}/{rows[0]['stack']}/{rows[0]['layer']}/{rows[0]['attention']}"
            assert len(client.get_metric_history(run.info.run_id, metric)) == epochs
        predictions = artifact_text(client, run.info.run_id, "eval/predictions.csv").splitlines()
        assert predictions[0].startswith("question_id,answer,score")
        assert len(predictions) - 1 == int(run.data.metrics["eval/n"])
        examples = json.loads(artifact_text(client, run.info.run_id, "eval/examples_top5.json"))
        assert examples and all(len(e["top5"]) == 5 for e in examples)
    # The pretraining cells (equal and gradient-std task weights): per-task losses and weights for
    # every pretraining epoch, at step = pretraining epoch; then the strict encoder transfer.
    pretraining = [r for r in children if expected[r.data.tags["trial.key"]].config.pretrain.enabled]
    assert sorted(r.data.tags["trial.cell"] for r in pretraining) == ["grad_std", "pretrain_equal"]
    for run in pretraining:
        key = run.data.tags["trial.key"]
        pcfg = expected[key].config.pretrain
        assert run.data.params["pretrain.weighting"] == pcfg.weighting == run.data.tags["pretrain.weighting"]
        steps = list(range(1, pcfg.epochs + 1))
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "pretrain/epoch")) == steps
        for task in pcfg.task_list:
            for metric in (f"pretrain/loss_{task}", f"pretrain/weight_{task}", f"pretrain/eval_loss_{task}"):
                history = client.get_metric_history(run.info.run_id, metric)
                assert sorted(m.step for m in history) == steps, (key, metric)
                assert all(math.isfinite(m.value) for m in history), (key, metric)
        weights = [run.data.metrics[f"pretrain/weight_{t}"] for t in pcfg.task_list]
        assert sum(weights) == pytest.approx(len(weights), rel=1e-6)
        if pcfg.weighting == "equal":
            assert weights == [1.0] * len(weights)
        assert "0 missing" in artifact_text(client, run.info.run_id, "pretrain/transfer_report.txt")
        assert artifact_text(client, run.info.run_id, "pretrain/weights.csv").startswith("step,epoch,task,weight")
    # LayerDrop cells ran one layer fewer per stack in training
    ld = next(r for r in children if r.data.tags["trial.cell"] == "layerdrop_955")
    assert ld.data.metrics["layers/lang_ran"] == plan.trials[0].config.model.l_layers - 1
    # the report was built at the end and logged back to the parent
    assert "report:" in smoke_sweep.output
    assert any(a.path.startswith("report") for a in client.list_artifacts(parent.info.run_id))


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.parametrize("executor", ["in_process", "train"])
def test_killing_the_driver_mid_sweep_then_rerunning_finishes_without_duplicates(executor, tmp_path, data_cache):
    # Its own Ray head: a driver killed while a Ray Train worker group is starting can leave that
    # group's placement group behind (Ray Train's cleaner learns of it only once the group has
    # started), holding a CPU of the head until it stops; the session's head must not lose one.
    runs = tmp_path / "runs"
    args = [*ABLATION, "--preset", "smoke", "--cells", "softmax,span", "--name", "resume", "--runs-dir", str(runs),
            "--no-report", "train.epochs=4", f"resources.executor={executor}", f"data.cache_dir={data_cache}"]
    head = start_ray_head(tmp_path, num_cpus=2)
    try:
        env = head.env()
        log1 = open(tmp_path / "first.log", "w")
        first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=log1, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        tune_dir = runs / "ray" / "resume"

        def registered() -> list[str]:
            """Trials with a checkpoint a rerun resumes from: in Ray Train's own record, or named by
            the in-process trial's pointer (both written just after the checkpoint itself)."""
            found = []
            for key in ("softmax-s0", "span-s0"):
                home = tune_dir / "train" / key
                try:
                    if executor == "train":
                        ok = "checkpoint_dir_name" in (home / "checkpoint_manager_snapshot.json").read_text()
                    else:
                        named = json.loads((home / "in_process_checkpoint.json").read_text())["checkpoint"]
                        ok = (Path(named) / "state.pt").is_file()
                except (OSError, ValueError):
                    ok = False
                if ok:
                    found.append(key)
            return found

        try:
            # Kill once some trial has registered an epoch's checkpoint but before the sweep is done.
            _wait_for(lambda: registered() or first.poll() is not None, 600, "a first registered checkpoint")
            resumable = registered()
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
        uri = f"sqlite:///{runs / 'mlflow.db'}"
        _, _, before = sweep_runs(uri, "resume")
        assert before and not all(r.info.status == "FINISHED" for r in before), "the kill came too late to test resume"

        with open(tmp_path / "second.log", "w") as log2:
            second = subprocess.run(args, cwd=tmp_path, env=env, stdout=log2, stderr=subprocess.STDOUT, timeout=900)
        output = (tmp_path / "second.log").read_text()
        assert second.returncode == 0, output[-5000:]
        assert "restoring 'resume'" in output
        client, parents, children = sweep_runs(uri, "resume")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        # the report's cells are the ones this sweep ran, not the whole grid
        assert set(json.loads(parents[0].data.tags["sweep.cells"])) == {"softmax", "span"}
        assert sorted(r.data.tags["trial.key"] for r in children) == ["softmax-s0", "span-s0"]
        assert {r.info.run_id for r in before} <= {r.info.run_id for r in children}, "child runs were replaced"
        for run in children:
            assert run.info.status == "FINISHED"
            assert run.data.tags["trial.executor"] == executor
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]
            assert sorted(steps) == [1, 2, 3, 4], (run.data.tags["trial.key"], steps)
            loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
            assert sorted(loss_steps) == [1, 2, 3, 4]
        # a trial the kill interrupted after its checkpoint went on from it, not from epoch 1
        for key in resumable:
            assert not re.search(rf"{key} +epoch 1: acc", output), (key, output[-5000:])
        # num_to_keep holds after the rerun too: the dead driver's checkpoint folders were cleared
        for key in ("softmax-s0", "span-s0"):
            kept = [p for p in (*(tune_dir / key).glob("checkpoint_*"), *(tune_dir / "train" / key).glob("checkpoint_*"))
                    if p.is_dir()]  # not Ray Train's checkpoint_manager_snapshot.json
            assert 1 <= len(kept) <= 2, (key, kept)
            assert not (tune_dir / "train" / key / "resumed_checkpoint").exists()
    finally:
        stop_process_group(head.proc)


def _run_quick(args, env=None, cwd=ROOT, timeout=120):
    proc = subprocess.run([*ABLATION, *args], cwd=cwd, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_bad_grid_fails_before_any_trial_naming_the_key(tmp_path):
    grid = tmp_path / "bad.yaml"
    grid.write_text("name: bad\ncells: {a: {set: {model.attention.name: sofmax}}}\naxes: [{product: {cell: [a]}}]\n")
    code, out = _run_quick(["--preset", "smoke", "--grid", str(grid), "--runs-dir", str(tmp_path / "r")])
    assert code == 2
    assert "bad.yaml" in out and "attention.name" in out and "sofmax" in out
    assert "\nrunning on " not in out and not (tmp_path / "r").exists()


def test_missing_vqa_data_fails_before_any_trial_naming_the_file(tmp_path):
    ckpt = tmp_path / "model_LXRT.pth"
    ckpt.write_bytes(b"")
    code, out = _run_quick(["--preset", "paper", f"data.root={tmp_path / 'nowhere'}",
                            f"train.init_checkpoint={ckpt}", "--runs-dir", str(tmp_path / "r")])
    assert code == 2, out
    assert "nowhere" in out and "\nrunning on " not in out
    code, out = _run_quick(["--preset", "paper", f"data.root={tmp_path}", "train.init_checkpoint=/no/such.pth",
                            "--runs-dir", str(tmp_path / "r")])
    assert code == 2 and "/no/such.pth" in out


def test_unreachable_mlflow_server_is_one_clear_error_at_start(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    code, out = _run_quick(["--preset", "smoke", "--cells", "softmax", "--runs-dir", str(tmp_path / "r")], env=env)
    assert code == 2
    assert "MLflow tracking server http://127.0.0.1" in out and "not reachable" in out
    assert "Traceback" not in out and "\nrunning on " not in out


def test_optuna_search_gives_every_cell_the_same_budget_then_runs_the_grid_with_the_best(ray_head, tmp_path,
                                                                                          data_cache):
    runs = tmp_path / "runs"
    args = [*ABLATION, "--preset", "smoke", "--cells", "softmax,span", "--name", "opt", "--runs-dir", str(runs),
            "--no-report", "--search", "optuna", "--trials", "2", "train.epochs=1", f"data.cache_dir={data_cache}"]
    proc = subprocess.run(args, cwd=tmp_path, env=ray_head.env(), capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    client, parents, children = sweep_runs(f"sqlite:///{runs / 'mlflow.db'}", "opt")
    exp = client.get_experiment_by_name("adaptive-ablation")
    searched = client.search_runs([exp.experiment_id], "tags.`sweep.id` = 'opt' and tags.`sweep.role` = 'search'")
    per_cell = {}
    for run in searched:
        assert run.info.status == "FINISHED"
        per_cell.setdefault(run.data.tags["trial.cell"], []).append(run)
    assert {c: len(r) for c, r in per_cell.items()} == {"softmax": 2, "span": 2}
    summary = json.loads(parents[0].data.tags["sweep.search"])
    assert summary["trials_per_cell"] == 2
    for run in children:  # the grid's runs use their cell's best point of the search
        cell = run.data.tags["trial.cell"]
        top = max(r.data.metrics["best/acc"] for r in per_cell[cell])  # ties: any of the best will do
        best_lrs = [float(r.data.params["train.lr"]) for r in per_cell[cell] if r.data.metrics["best/acc"] == top]
        assert any(float(run.data.params["train.lr"]) == pytest.approx(lr) for lr in best_lrs), (cell, best_lrs)
        assert float(run.data.params["train.lr"]) == pytest.approx(summary["best"][cell]["train.lr"])
    assert sorted(r.data.tags["trial.key"] for r in children) == ["softmax-s0", "span-s0"]


def test_a_trial_on_two_ddp_workers_drops_the_same_layers_and_logs_once(ray_head, tmp_path, data_cache):
    """DDP over gloo on CPU: two Ray Train workers, LayerDrop (the same layers on both ranks, or
    the trial fails), evaluation gathered on rank 0 without duplicates, one MLflow run."""
    runs = tmp_path / "runs"
    args = [*ABLATION, "--preset", "smoke", "--cells", "layerdrop_955", "--name", "ddp", "--runs-dir", str(runs),
            "--no-report", "resources.num_workers=2", "train.epochs=1", f"data.cache_dir={data_cache}"]
    proc = subprocess.run(args, cwd=tmp_path, env=ray_head.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    client, _, children = sweep_runs(f"sqlite:///{runs / 'mlflow.db'}", "ddp")
    assert len(children) == 1
    run = children[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["trial.world_size"] == "2" and run.data.tags["trial.executor"] == "train"
    plan = expand(load_grid("paper"), load_preset("smoke"), cells=["layerdrop_955"])
    cfg = plan.trials[0].config
    assert run.data.metrics["eval/n"] == cfg.data.eval_limit  # every question once, none twice
    assert run.data.metrics["layers/lang_ran"] == cfg.model.l_layers - 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [1]


def test_a_pretraining_trial_on_two_ddp_workers_finishes_and_logs_once(ray_head, tmp_path, data_cache):
    """grad_std under DDP: per-task gradients on every rank, their statistics averaged over ranks,
    the pretraining model trained through its head outputs only (DDP must see no unused output)."""
    runs = tmp_path / "runs"
    args = [*ABLATION, "--preset", "smoke", "--cells", "grad_std", "--name", "ddp-pretrain", "--runs-dir",
            str(runs), "--no-report", "resources.num_workers=2", "train.epochs=1", "pretrain.weight_every=1",
            f"data.cache_dir={data_cache}"]
    proc = subprocess.run(args, cwd=tmp_path, env=ray_head.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    client, _, children = sweep_runs(f"sqlite:///{runs / 'mlflow.db'}", "ddp-pretrain")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    run = children[0]
    assert run.data.tags["trial.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pretrain/epoch")] == [1]
    weights = [run.data.metrics[f"pretrain/weight_{t}"] for t in ("mlm", "mor", "match", "qa")]
    assert sum(weights) == pytest.approx(4.0) and len(set(weights)) > 1


def test_both_executors_train_the_same_trials_to_the_same_numbers(ray_head, tmp_path, data_cache):
    """Two trials in Tune trial processes, one after the other, so that the second runs in the
    process the first used; then the second on a Ray Train worker group: every logged epoch metric
    equal (nothing of the first trial leaked into the second, and the executors agree)."""
    logged = {}
    for executor, seeds in (("in_process", "0,1"), ("train", "1")):
        runs = tmp_path / executor
        args = [*ABLATION, "--preset", "smoke", "--cells", "softmax", "--seeds", seeds, "--name", "parity",
                "--runs-dir", str(runs), "--no-report", "--verbose", "--max-concurrent", "1", "train.epochs=2",
                f"resources.executor={executor}", f"data.cache_dir={data_cache}"]
        proc = subprocess.run(args, cwd=tmp_path, env=ray_head.env(RAY_DEDUP_LOGS="0"), capture_output=True,
                              text=True, timeout=600)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-5000:]
        client, _, children = sweep_runs(f"sqlite:///{runs / 'mlflow.db'}", "parity")
        assert {r.data.tags["trial.executor"] for r in children} == {executor}
        logged[executor] = {
            metric: [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, metric),
                                                       key=lambda m: m.step)]
            for r in children if r.data.tags["trial.key"] == "softmax-s1"
            for metric in ("train/loss", "eval/acc", "eval/loss", "train/lr")}
        if executor == "in_process":
            # Tune reused the first trial's process for the second (reuse_actors).
            pids = {key: pid for pid, key in re.findall(r"run_trial pid=(\d+)\D.*?\[(softmax-s\d)\] in_process: ready",
                                                         output)}
            assert set(pids) == {"softmax-s0", "softmax-s1"} and len(set(pids.values())) == 1, pids
    assert len(logged["train"]["train/loss"]) == 2 and logged["in_process"] == logged["train"]
