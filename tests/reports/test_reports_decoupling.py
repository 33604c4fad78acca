"""The decoupling table (reports/decoupling.py) on a sweep built by hand: which cells it holds, and
its seed-level statistics against scipy's paired t-test and statsmodels' Holm correction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

import schema
from reports import decoupling, render
from reports.store import Cell, Sweep, Trial
from reports.tables import compute

RSUM = {"base": [100.0, 120.0, 110.0], "single_stream": [90.0, 104.0, 101.0], "contrastive": [150.0, 161.0, 149.0]}
ACC = {"base": [0.50, 0.52, 0.51], "single_stream": [0.49, 0.50, 0.52], "contrastive": [0.51, 0.53, 0.50]}
FLOW = {"base": "merged", "single_stream": "single_stream", "contrastive": "merged"}


def _trial(cell: str, seed: int) -> Trial:
    metrics = {schema.BEST_ACC: ACC[cell][seed], f"{schema.RETRIEVAL_PREFIX}rsum": RSUM[cell][seed],
               f"{schema.RETRIEVAL_PREFIX}n_images": 24.0}
    for i, name in enumerate(decoupling.SHOWN[:-1]):
        metrics[f"{schema.RETRIEVAL_PREFIX}{name}"] = float(10 * i + seed)
    params = {schema.PARAM_RETRIEVAL_ENABLED: "True", schema.PARAM_FLOW: FLOW[cell], "model.l_layers": "0",
              "model.x_layers": "6", "model.r_layers": "0", schema.PARAM_RETRIEVAL_SCORING: "itm",
              schema.PARAM_PRETRAIN_TASKS: "match,mlm,mor" + (",contrastive" if cell == "contrastive" else ""),
              schema.PARAM_ITM_NEGATIVES: "0", schema.PARAM_CONTRASTIVE_NEGATIVES: "1024" if cell == "contrastive" else "0"}
    return Trial(key=f"{cell}-s{seed}", cell=cell, seed=seed, status="FINISHED", run_id=f"{cell}{seed}",
                 metrics=metrics, params=params)


@pytest.fixture
def sweep() -> Sweep:
    cells = {c: Cell(c, f"label of {c}", None, {}) for c in RSUM}
    cells["softmax"] = Cell("softmax", "not a retrieval cell", None, {})
    trials = [_trial(c, s) for c in RSUM for s in range(3)]
    trials.append(Trial(key="softmax-s0", cell="softmax", seed=0, status="FINISHED", run_id="x",
                        metrics={schema.BEST_ACC: 0.4}, params={schema.PARAM_RETRIEVAL_ENABLED: "False"}))
    return Sweep("s", "e", "p", "FINISHED", {}, {}, {}, cells, trials)


def test_statistics_match_scipy_and_statsmodels(sweep):
    tables = {"cells": {c: {"params": 1000.0 + i, "flops_per_sample": 5e5} for i, c in enumerate(RSUM)}}
    d = decoupling.compute(sweep, tables)
    assert d["reference"] == "base" and d["order"] == ["base", "single_stream", "contrastive"]  # softmax: no retrieval
    for what, values in (("rsum", RSUM), ("acc", ACC)):
        ps = []
        for cell in ("single_stream", "contrastive"):
            t = d["cells"][cell]["vs_reference"][what]
            ref = stats.ttest_rel(values[cell], values["base"])
            assert t["p_value"] == pytest.approx(ref.pvalue)
            assert t["effect"] == pytest.approx(np.mean(np.subtract(values[cell], values["base"])))
            ci = ref.confidence_interval(0.95)
            assert (t["ci_low"], t["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
            ps.append(ref.pvalue)
        holm = multipletests(ps, method="holm")[1]
        for cell, p in zip(("single_stream", "contrastive"), holm):
            assert d["cells"][cell]["vs_reference"][what]["p_holm"] == pytest.approx(p)
    assert d["cells"]["contrastive"]["vs_reference"]["rsum"]["verdict"] == "better"
    assert d["cells"]["base"]["retrieval"]["rsum"]["mean"] == pytest.approx(110.0)
    assert d["cells"]["single_stream"]["flow"] == "single_stream, 0-6-0"
    assert d["cells"]["base"]["losses"] == "match,mlm,mor"
    assert d["cells"]["contrastive"]["losses"] == "match,mlm,mor,contrastive (1024 queued negatives)"

    frame = decoupling.table({"decoupling": d}).frame
    assert list(frame["Variant"]) == ["label of base", "label of single_stream", "label of contrastive"]
    assert frame["Params"].tolist() == ["1,000", "1,001", "1,002"]
    assert frame["rsum mean ± std"].iloc[0] == "110.0 ± 10.0"


def test_no_retrieval_cells_no_table(sweep):
    sweep.trials = [t for t in sweep.trials if t.cell == "softmax"]
    assert decoupling.compute(sweep, {"cells": {}}) is None
    assert decoupling.table({"decoupling": None}) is None
    tables = compute(sweep)
    tables["decoupling"] = decoupling.compute(sweep, tables)
    assert "decoupling" not in render.frames(tables)


def test_the_report_document_carries_the_table(sweep):
    tables = compute(sweep)
    tables["decoupling"] = decoupling.compute(sweep, tables)
    frame = render.frames(tables)["decoupling"]
    assert len(frame) == 3 and frame["Δ rsum vs `base` [95% CI]"].iloc[0] == "reference"
