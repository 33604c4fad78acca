"""What a report shows follows what the store holds: a statistic no report file names, the
trials' time account (issue 12) when logged and nothing of it when not, and tables as DataFrames.

Expected values are read back from the store with ``MlflowClient`` (and the artifact's CSV with
the ``csv`` module), never from ``reports``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

NEW_STAT = "temperature"  # no file under reports/ knows this name


@pytest.fixture(scope="module")
def timed_report(tmp_path_factory, empty_store_template):
    """A small sweep whose trials log the time account and whose ``temp`` cell logs :data:`NEW_STAT`."""
    import shutil

    from reports_synthetic import CellSpec, SweepSpec, fill_sweep

    import reports

    runs = tmp_path_factory.mktemp("timed") / "runs"
    runs.mkdir(parents=True)
    shutil.copyfile(empty_store_template, runs / "mlflow.db")
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    spec = SweepSpec(cells={"softmax": CellSpec("LXMERT softmax", 1, [0.6, 0.7]),
                            "temp": CellSpec("Learned temperature", 1, [0.6, 0.71], extra_stats=(NEW_STAT,))},
                     seeds=(0, 1), epochs=2, n_questions=60, failed=(), missing=(), n_examples=2,
                     time_account=True)
    written = fill_sweep(uri, runs, sweep_id="timed", spec=spec)
    out = tmp_path_factory.mktemp("timed-report")
    reports.build(uri, "timed", out_dir=out, log_to_mlflow=False)
    return {"uri": uri, "out": out, "written": written, "tables": json.loads((out / "tables.json").read_text()),
            "md": (out / "report.md").read_text()}


def _store_heads(uri: str, run_ids: list[str]) -> list[dict]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    rows = []
    for rid in run_ids:
        local = client.download_artifacts(rid, "stats/attention_heads.csv")
        with open(local, encoding="utf-8") as f:
            rows += list(csv.DictReader(io.StringIO(f.read())))
    return rows


def test_a_new_statistic_gets_its_rows_and_figure(timed_report):
    tables, md = timed_report["tables"], timed_report["md"]
    rows = [a for a in tables["attention"] if a["stat"] == NEW_STAT]
    assert {a["cell"] for a in rows} == {"temp"}
    assert {a["stack"] for a in rows} == {"lang", "visn", "cross"}
    written = timed_report["written"]["run_ids"]
    heads = [r for r in _store_heads(timed_report["uri"], [written["temp-s0"], written["temp-s1"]])
             if r["stat"] == NEW_STAT]
    for a in rows:
        sel = [r for r in heads if r["stack"] == a["stack"]]
        last = max(int(r["epoch"]) for r in sel)
        values = [float(r["value"]) for r in sel if int(r["epoch"]) == last]
        assert a["last_epoch"] == last and a["n_values_last"] == len(values)
        assert a["mean_last"] == pytest.approx(float(np.mean(values)), rel=1e-12)
        assert (a["min_last"], a["max_last"]) == (min(values), max(values))
        assert f"{a['mean_last']:.3f} (epoch {last})" in md
    figs = [f for f in tables["figures"]["files"] if f.get("stat") == NEW_STAT]
    assert len(figs) == 1 and figs[0]["figure"] > 4 and figs[0]["cell"] == "temp"
    png = timed_report["out"] / figs[0]["file"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figs[0]["file"] in md
    # No span or alpha in this sweep: the paper's figures say why they are absent.
    assert set(tables["figures"]["missing"]) >= {"1", "3"}


def test_time_account_is_shown_when_logged(timed_report):
    from mlflow import MlflowClient

    tables, md = timed_report["tables"], timed_report["md"]
    client = MlflowClient(timed_report["uri"])
    per_cell: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for key, rid in sorted(timed_report["written"]["run_ids"].items()):
        metrics = client.get_run(rid).data.metrics
        for name, value in metrics.items():
            if name.startswith("time/") and name != "time/trial_s" and name != "time/elapsed_s":
                per_cell[key.rsplit("-s", 1)[0]][name[len("time/"):]].append(value)
    for cell, accounts in per_cell.items():
        row = tables["cells"][cell]
        assert set(row["time"]) == set(accounts) == {"startup_s", "train_s", "eval_s", "checkpoint_s", "other_s"}
        for name, values in accounts.items():
            assert row["time"][name]["values"] == pytest.approx(values, abs=0)
            assert row["time"][name]["mean"] == pytest.approx(float(np.mean(values)), rel=1e-12)
    assert "Start-up / train / eval per trial" in md
    parent = client.get_run(timed_report["written"]["parent_run_id"]).data.metrics
    sw = tables["sweep"]
    assert sw["goodput"] == parent["sweep/goodput"] and sw["wall_over_ideal"] == parent["sweep/wall_over_ideal"]
    assert f"goodput {parent['sweep/goodput']:.2f}" in md
    assert f"wall time over ideal {parent['sweep/wall_over_ideal']:.2f}" in md
    assert sw["time"] == {k: parent[f"sweep/{k}"] for k in ("startup_s", "train_s", "eval_s", "checkpoint_s",
                                                           "other_s")}
    # The markdown row of a cell shows its mean start-up / train / eval in the report's duration format.
    from reports.render import duration

    t = tables["cells"]["temp"]["time"]
    assert " / ".join(duration(t[a]) for a in ("startup_s", "train_s", "eval_s")) in md


def test_no_time_account_no_empty_column(synthetic_report):
    """The paper-like synthetic sweep predates the time account: no column, no header line, no definition."""
    tables, md = synthetic_report["tables"], synthetic_report["md"]
    assert all(row["time"] == {} for row in tables["cells"].values())
    assert tables["sweep"]["goodput"] is None and tables["sweep"]["time"] == {}
    for text in ("Start-up / train / eval", "goodput", "wall time over ideal", "time/startup_s"):
        assert text not in md, text


def test_tables_are_dataframes_with_the_report_cells(synthetic_report):
    """``render.frames`` gives each table as a DataFrame whose cells are the Markdown table's cells."""
    from reports import render

    frames = render.frames(synthetic_report["tables"], synthetic_report["tables"]["figures"])
    assert {"table1", "table2", "comparisons", "attention"} <= set(frames)
    md = synthetic_report["md"]
    for key, frame in frames.items():
        assert isinstance(frame, pd.DataFrame)
        header = "| " + " | ".join(str(c).replace("|", "\\|") for c in frame.columns) + " |"
        assert header in md, key
        for row in frame.itertuples(index=False, name=None):
            assert "| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" in md, key
    t1 = frames["table1"]
    for name in synthetic_report["tables"]["tables"]["table1"]:
        row = synthetic_report["tables"]["cells"][name]
        if row["acc"]["n"] >= 2:
            shown = t1.loc[t1["Variant"] == row["label"]].iloc[0, 2]
            assert shown == f"{100 * row['acc']['mean']:.2f} ± {100 * row['acc']['std']:.2f}"
            assert not math.isnan(row["acc"]["mean"])
