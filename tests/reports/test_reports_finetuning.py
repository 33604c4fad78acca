"""The fine-tuning table's numbers (reports/finetuning.py) from a sweep held in memory: accuracy and the
seed-level comparison with `standard` against scipy's paired t-test, cost ratios, usage per layer, and
when the table is absent. The end-to-end path (a real smoke sweep, MLflow, the rendered report) is
tests/sweeps/test_finetune_sweep.py."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import schema
from reports import finetuning
from reports.store import Cell, Sweep, Trial

ACC = {"standard": [0.70, 0.72, 0.71], "frozen": [0.60, 0.61, 0.63], "spottune": [0.69, 0.73, 0.70]}
STEP_S = {"standard": 1.0, "frozen": 0.6, "spottune": 2.1}


def trial(cell: str, strategy: str, seed: int) -> Trial:
    metrics = {schema.BEST_ACC: ACC[cell][seed], schema.TRAIN_STEP_S: STEP_S[cell] * (1 + 0.1 * seed),
               schema.TRAIN_RESIDENT_MB: {"standard": 50.0, "frozen": 20.0, "spottune": 90.0}[cell],
               schema.FINETUNE_TRAIN_FLOPS: {"standard": 3e9, "frozen": 2e9, "spottune": 5.7e9}[cell],
               schema.FINETUNE_DECISIONS: 425.0 if cell == "spottune" else 0.0}  # fmt: skip
    if cell == "spottune":
        metrics.update({schema.FINETUNE_USAGE: 0.4 + 0.1 * seed, schema.FINETUNE_EVAL_USAGE: 0.5,
                        schema.FINETUNE_POLICY_ENTROPY: 0.6, "finetune/usage/lang/0": 0.2 * seed,
                        "finetune/usage/lang/1": 0.9, "finetune/usage/cross/0": 0.5,
                        "finetune/eval_usage/lang/0": 1.0})  # fmt: skip
    return Trial(key=f"{cell}-s{seed}", cell=cell, seed=seed, status="FINISHED", run_id=f"{cell}{seed}",
                 metrics=metrics, params={schema.PARAM_FINETUNE: strategy})  # fmt: skip


def sweep(cells: dict[str, str]) -> Sweep:
    return Sweep(sweep_id="s", experiment="e", parent_run_id="p", parent_status="FINISHED", tags={}, params={},
                 metrics={}, cells={c: Cell(c, c.title(), None, {}) for c in cells},
                 trials=[trial(c, s, seed) for c, s in cells.items() for seed in range(3)])  # fmt: skip


def test_rows_comparisons_and_ratios_equal_their_definitions():
    ft = finetuning.compute(sweep({"standard": "standard", "frozen": "frozen", "spottune": "spottune"}))
    assert ft["reference"] == "standard" and ft["cells"] == ["standard", "frozen", "spottune"]
    rows = ft["rows"]
    for cell in ft["cells"]:
        assert rows[cell]["acc"]["mean"] == pytest.approx(np.mean(ACC[cell]))
        assert rows[cell]["ratios"]["step_s"] == pytest.approx(STEP_S[cell] / STEP_S["standard"])
    assert rows["frozen"]["ratios"]["resident_mb"] == pytest.approx(20 / 50)
    assert rows["spottune"]["ratios"]["flops"] == pytest.approx(1.9)
    assert rows["spottune"]["decisions"] == 425 and rows["frozen"]["decisions"] == 0
    assert rows["spottune"]["usage"]["mean"] == pytest.approx(0.5) and rows["frozen"]["usage"]["n"] == 0
    # per layer, mean over seeds; eval_usage's per-layer keys are not training usage
    assert rows["spottune"]["usage_grid"] == {"lang": {0: pytest.approx(0.2), 1: pytest.approx(0.9)},
                                              "cross": {0: pytest.approx(0.5)}}  # fmt: skip
    assert rows["frozen"]["usage_grid"] == {}
    # seed-level tests: scipy's paired t-test, then Holm over the two comparisons
    p = {c: stats.ttest_rel(ACC[c], ACC["standard"]).pvalue for c in ("frozen", "spottune")}
    tests = {c["variant"]: c["seed_test"] for c in ft["comparisons"]}
    for cell in ("frozen", "spottune"):
        assert tests[cell]["paired"] and tests[cell]["p_value"] == pytest.approx(p[cell])
        assert tests[cell]["effect"] == pytest.approx(np.mean(ACC[cell]) - np.mean(ACC["standard"]))
    lo, hi = sorted(p.values())
    assert sorted(t["p_holm"] for t in tests.values()) == pytest.approx(sorted([min(1, 2 * lo), max(2 * lo, hi)]))
    assert tests["frozen"]["verdict"] == "worse"


def test_no_table_without_a_strategy_other_than_standard_and_no_comparison_without_standard():
    assert finetuning.compute(sweep({"standard": "standard"})) is None
    ft = finetuning.compute(sweep({"frozen": "frozen", "spottune": "spottune"}))
    assert ft["reference"] is None and ft["comparisons"] == []
    assert all(r["ratios"]["step_s"] is None for r in ft["rows"].values())
    table = finetuning.table({"finetuning": ft})
    assert "No cell with model.finetune.name=standard" in " ".join(table.notes)
