"""The paper grid on GQA and on NLVR2 (``--grid paper data.name=gqa`` / ``nlvr2``), end to end.

Each runs the CI-sized preset ``smoke_tasks`` (one seed, one epoch), restricted to two cells of the
paper grid to keep CI short: ``softmax`` and ``pretrain_equal`` (pretraining, then the task: the
stage hand-over is the task-specific part; the attention cells change only the encoder), as a real sweep on the session's Ray head, from the synthetic folder in
LXMERT's formats the two writers produce, into a real MLflow store, then the report. Checked: every
trial finished with the task's metric tag and metrics, the task's result file is logged in its
format, and the report shows the task's table with the accuracies MLflow holds (and no VQA paper
numbers).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

import schema

ROOT = Path(__file__).resolve().parents[2]
ABLATION = [sys.executable, str(ROOT / "sweeps" / "ablation.py")]

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CELLS = ("softmax", "pretrain_equal")


@pytest.fixture(scope="module")
def lxmert_root(tmp_path_factory):
    """Both tasks' synthetic files in one LXMERT data folder, smaller than the writers' defaults."""
    from tasks.gqa import synthetic as gqa_syn
    from tasks.nlvr2 import synthetic as nlvr2_syn

    root = tmp_path_factory.mktemp("lxmert-synthetic")
    gqa_syn.write_dataset(root, train_images=100, valid_images=10, testdev_images=40, submit_images=4,
                          questions_per_image=4)  # fmt: skip
    nlvr2_syn.write_dataset(root, train_sets=50, valid_sets=20, test_sets=1)
    return root


def _label_of(cells_tag: str, cell: str) -> str:
    return json.loads(cells_tag)[cell]["label"]


@pytest.mark.parametrize(("task", "artifact"), [("gqa", schema.GQA_SUBMISSION_ARTIFACT),
                                                ("nlvr2", schema.NLVR2_RESULTS_ARTIFACT)])  # fmt: skip
def test_paper_grid_on_the_task_runs_and_the_report_shows_its_table(ray_head, lxmert_root, tmp_path, task, artifact):
    runs = tmp_path / "runs"
    name = f"tasks-{task}"
    args = [*ABLATION, "--preset", "smoke_tasks", "--grid", "paper", "--cells", ",".join(CELLS), "--name", name,
            "--runs-dir", str(runs), f"data.name={task}", f"data.root={lxmert_root}"]
    t0 = time.time()
    proc = subprocess.run(args, cwd=tmp_path, env=ray_head.env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    print(f"{task} sweep: {time.time() - t0:.1f} s")
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adaptive-ablation")
    runs_found = client.search_runs([exp.experiment_id], f"tags.`sweep.id` = '{name}'")
    parent = next(r for r in runs_found if r.data.tags[schema.SWEEP_ROLE] == schema.ROLE_PARENT)
    children = {r.data.tags[schema.TRIAL_CELL]: r for r in runs_found if r.data.tags[schema.SWEEP_ROLE] == "trial"}
    assert set(children) == set(CELLS)
    metric_tag = schema.EVAL_METRIC_GQA if task == "gqa" else schema.EVAL_METRIC_NLVR2
    for run in children.values():
        assert run.info.status == "FINISHED" and run.data.params["data.name"] == task
        assert run.data.tags[schema.EVAL_METRIC_TAG] == metric_tag
        assert 0.0 <= run.data.metrics[schema.BEST_ACC] <= 1.0
        assert run.data.metrics[schema.EVAL_N_LABELLED] == run.data.metrics[schema.EVAL_N]
        if task == "nlvr2":
            assert 0.0 <= run.data.metrics[schema.EVAL_CONSISTENCY] <= run.data.metrics[schema.EVAL_ACC]
    assert "pretrain/loss_mlm" in children["pretrain_equal"].data.metrics  # it pretrained, then fine-tuned
    softmax = children["softmax"]
    text = Path(client.download_artifacts(softmax.info.run_id, artifact, str(tmp_path / "dl"))).read_text()
    if task == "gqa":
        rows = json.loads(text)
        assert len(rows) == 40 * 4 and all(set(r) == {"questionId", "prediction"} for r in rows)
    else:
        lines = text.splitlines()
        assert len(lines) == 20 * 6 and all(line.rsplit(",", 1)[1] in ("True", "False") for line in lines)

    report = (runs / "reports" / name / "report.md").read_text()
    title = "GQA: GQA accuracy" if task == "gqa" else "NLVR2: NLVR2 accuracy"
    assert f"### {title} on the evaluation split (percent)" in report
    section = report.split(f"### {title}")[1].split("###")[0]
    for cell, run in children.items():
        label = _label_of(parent.data.tags[schema.SWEEP_CELLS], cell)
        row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
        assert f"{100 * run.data.metrics[schema.BEST_ACC]:.2f} ± n/a" in row, row
    assert "72.42" not in report  # the grid's VQA v2 paper number for softmax is not printed
    tables = json.loads((runs / "reports" / name / "tables.json").read_text())
    assert tables["metric"] == metric_tag and tables["task"]["task"] == task
