"""The report of a sweep on NLVR2 / GQA (reports/task_tables.py), from a real MLflow store.

Three cells x three seeds are logged through the sweep's own trackers as NLVR2 trials would log
them (``data.name`` param, ``eval.metric=nlvr2_accuracy``, ``eval/acc`` and ``eval/consistency`` per
epoch, ``best/acc`` / ``best/epoch``). The report's NLVR2 table must hold, per cell, the accuracy
and the consistency at each trial's best epoch over seeds, and differences from softmax whose
paired-t p-values and Holm adjustment equal scipy's and a hand-written Holm over the same numbers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy import stats

import schema

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CELLS = {"softmax": "LXMERT softmax", "entmax": "Adaptive sparse (learned-alpha entmax)",
         "span": "Adaptive span"}  # fmt: skip
SEEDS = (0, 1, 2)
# (eval/acc, eval/consistency) per cell, seed and epoch; epoch 2 is the best except where noted.
RNG = np.random.default_rng(7)
NUMBERS = {c: {s: [(0.55 + 0.01 * s + RNG.uniform(0, 0.02), 0.20 + RNG.uniform(0, 0.05)),
                   (0.60 + 0.02 * i + 0.01 * s + RNG.uniform(0, 0.02), 0.25 + 0.03 * i + RNG.uniform(0, 0.05))]
               for s in SEEDS} for i, c in enumerate(CELLS)}  # fmt: skip
NUMBERS["span"][1][0] = (0.80, 0.50)  # seed 1 of span peaks at epoch 1: its best-epoch numbers are epoch 1's


def _best(cell: str, seed: int) -> tuple[int, float, float]:
    epochs = NUMBERS[cell][seed]
    best = max(range(len(epochs)), key=lambda e: epochs[e][0])
    return best + 1, *epochs[best]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from reports import build
    from sweeps.tracking import SweepTracker, TrialTracker

    tmp = tmp_path_factory.mktemp("nlvr2-report")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    keys = [f"{c}-s{s}" for c in CELLS for s in SEEDS]
    sweeper = SweepTracker(uri, "adaptive-ablation", "nlvr2-sweep", tmp)
    cells = {c: {"label": label, "table": 1, "paper": {"test_dev": 72.0}} for c, label in CELLS.items()}
    parent = sweeper.start({schema.SWEEP_TRIALS: json.dumps(keys), schema.SWEEP_STATUS: "running",
                            schema.SWEEP_GRID: "paper", schema.SWEEP_CELLS: json.dumps(cells)}, {"grid": "paper"})
    context = {"tracking_uri": uri, "experiment_id": sweeper.experiment_id, "parent_run_id": parent,
               "sweep_id": "nlvr2-sweep", "tags": {schema.SWEEP_GRID: "paper"}}
    for cell, label in CELLS.items():
        for seed in SEEDS:
            tracker = TrialTracker(context, f"{cell}-s{seed}")
            tracker.start({schema.TRIAL_CELL: cell, schema.TRIAL_SEED: str(seed), schema.CELL_LABEL: label,
                           schema.CELL_TABLE: "1", schema.EVAL_METRIC_TAG: schema.EVAL_METRIC_NLVR2,
                           schema.TRIAL_AXES: json.dumps({"cell": cell, "train.seed": seed})},
                          {"data.name": "nlvr2", "train.seed": seed, "model.attention.name": cell})  # fmt: skip
            best_acc = -1.0
            for epoch, (acc, cons) in enumerate(NUMBERS[cell][seed], 1):
                best_acc = max(best_acc, acc)
                best_epoch = _best(cell, seed)[0] if epoch == 2 else 1
                tracker.log_epoch(epoch, {schema.EPOCH: float(epoch), schema.EVAL_ACC: acc,
                                          schema.EVAL_CONSISTENCY: cons, schema.BEST_ACC: best_acc,
                                          schema.BEST_EPOCH: float(best_epoch)})  # fmt: skip
            tracker.finish("FINISHED")
    sweeper.finish("FINISHED", {}, {schema.SWEEP_STATUS: "complete"})
    html = build(uri, "nlvr2-sweep", out_dir=tmp / "report", log_to_mlflow=False)
    return json.loads((html.parent / "tables.json").read_text()), (html.parent / "report.md").read_text()


def _holm(pvalues: list[float]) -> list[float]:
    order = np.argsort(pvalues)
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def test_nlvr2_table_holds_best_epoch_numbers_and_seed_level_tests(report):
    tables, _ = report
    task = tables["task"]
    assert task["task"] == "nlvr2" and tables["metric"] == schema.EVAL_METRIC_NLVR2
    rows = {r["cell"]: r for r in task["rows"]}
    for metric, index in (("acc", 1), ("consistency", 2)):
        per_seed = {c: np.array([_best(c, s)[index] for s in SEEDS]) for c in CELLS}
        for c in CELLS:
            summary = rows[c]["acc"] if metric == "acc" else rows[c]["extra"]["consistency"]["summary"]
            assert summary["mean"] == pytest.approx(per_seed[c].mean())
            assert summary["std"] == pytest.approx(per_seed[c].std(ddof=1))
        variants = [c for c in CELLS if c != "softmax"]
        pvalues = [stats.ttest_rel(per_seed[c], per_seed["softmax"]).pvalue for c in variants]
        for c, p, p_holm in zip(variants, pvalues, _holm(pvalues)):
            comp = rows[c]["vs_reference"] if metric == "acc" else rows[c]["extra"]["consistency"]["vs_reference"]
            test = comp["seed_test"]
            assert test["effect"] == pytest.approx((per_seed[c] - per_seed["softmax"]).mean())
            assert test["p_value"] == pytest.approx(p) and test["p_holm"] == pytest.approx(p_holm)


def test_report_names_the_task_metric_and_drops_vqa_paper_numbers(report):
    tables, markdown = report
    assert "### NLVR2: NLVR2 accuracy on the evaluation split (percent)" in markdown
    assert "NLVR2 acc. (best epoch)" in markdown and "Soft score" not in markdown
    assert "74.95" in markdown and "72.00" not in markdown  # LXMERT's reference; not the grid's VQA number
    assert all(row["paper"] == {} for row in tables["cells"].values())
    section = markdown.split("### NLVR2:")[1].split("###")[0]
    row = next(line for line in section.splitlines() if line.startswith("| Adaptive span |"))
    accs = np.array([_best("span", s)[1] for s in SEEDS])
    assert f"{100 * accs.mean():.2f} ± {100 * accs.std(ddof=1):.2f}" in row
