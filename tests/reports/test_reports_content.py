"""The report's tables against the store they were built from, for every available sweep source.

Expected values are read from MLflow with ``MlflowClient`` here, independently of ``reports``: the
checks hold for the synthetic sweep and for the real smoke sweep alike.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t

REPO = Path(__file__).resolve().parents[2]


def _store_view(uri: str, sweep: str, experiment: str) -> dict:
    """What MLflow holds, per cell: the finished planned trials' numbers, ordered by seed."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    parent = client.search_runs(
        [exp.experiment_id], f"tags.`sweep.id` = '{sweep}' and tags.`sweep.role` = 'parent'")[0]
    planned = json.loads(parent.data.tags["sweep.trials"])
    cells = json.loads(parent.data.tags.get("sweep.cells", "{}"))
    children = client.search_runs(
        [exp.experiment_id], f"tags.`sweep.id` = '{sweep}' and tags.`sweep.role` = 'trial'", max_results=5000)
    finished = defaultdict(list)
    for run in children:
        if run.info.status == "FINISHED" and run.data.tags["trial.key"] in planned:
            finished[run.data.tags["trial.cell"]].append(run)
    view = {}
    for cell in set(cells) | set(finished):
        runs = sorted(finished.get(cell, []), key=lambda r: int(r.data.tags["trial.seed"]))
        rows = []
        for run in runs:
            best_epoch = int(run.data.metrics["best/epoch"])
            hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/acc")}
            by_type = {}
            for name in run.data.metrics:
                if name.startswith("eval/acc_"):
                    h = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
                    by_type[name[len("eval/acc_"):]] = h[best_epoch]
            rows.append({"seed": int(run.data.tags["trial.seed"]), "acc": run.data.metrics["best/acc"],
                         "best_epoch": best_epoch, "last": hist[max(hist)], "by_type": by_type,
                         "params": run.data.metrics.get("model/params")})
        view[cell] = {
            "rows": rows,
            "n_planned": sum(1 for k in planned if k.startswith(cell + "-")),
            "paper": (cells.get(cell) or {}).get("paper") or {},
            "table": (cells.get(cell) or {}).get("table"),
        }
    return view


def _check_summary(summary: dict, values: list[float]) -> None:
    assert summary["n"] == len(values)
    assert summary["values"] == pytest.approx(values, abs=0)
    if not values:
        assert summary["mean"] is None
        return
    assert summary["mean"] == pytest.approx(float(np.mean(values)), rel=1e-12)
    if len(values) == 1:
        assert summary["std"] is None and summary["ci95"] is None  # one seed: no spread, never 0
        return
    std = float(np.std(values, ddof=1))
    half = student_t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))
    assert summary["std"] == pytest.approx(std, rel=1e-9)
    assert summary["ci95"] == pytest.approx([np.mean(values) - half, np.mean(values) + half], rel=1e-9)


def test_tables_match_the_store(built_report):
    view = _store_view(built_report["uri"], built_report["sweep"], built_report["experiment"])
    cells = built_report["tables"]["cells"]
    assert set(view) <= set(cells)
    for name, expect in view.items():
        row = cells[name]
        rows = expect["rows"]
        assert row["seeds"] == [r["seed"] for r in rows], name
        assert row["n_planned"] == expect["n_planned"], name
        _check_summary(row["acc"], [r["acc"] for r in rows])
        _check_summary(row["acc_last"], [r["last"] for r in rows])
        assert row["best_epoch"] == [r["best_epoch"] for r in rows]
        for atype, summary in row["acc_by_type"].items():
            _check_summary(summary, [r["by_type"][atype] for r in rows if atype in r["by_type"]])
        if expect["paper"]:
            assert row["paper"] == pytest.approx({k: float(v) for k, v in expect["paper"].items()})
        if rows and rows[0]["params"] is not None:
            assert row["params"] == pytest.approx(rows[0]["params"])
        if expect["table"] in (1, 2):
            assert name in built_report["tables"]["tables"][f"table{expect['table']}"]


def test_markdown_shows_the_numbers(built_report):
    md = (built_report["out"] / "report.md").read_text()
    for name, row in built_report["tables"]["cells"].items():
        assert row["label"] in md
        acc = row["acc"]
        if acc["n"] >= 2:
            assert f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}" in md, name
        elif acc["n"] == 1:
            assert f"{100 * acc['mean']:.2f} ± n/a" in md, name
    assert "best/acc" in md  # the accuracy definition is stated


def test_every_figure_exists_or_says_why_not(built_report):
    out, tables = built_report["out"], built_report["tables"]
    figs = tables["figures"]
    md = (out / "report.md").read_text()
    for f in figs["files"]:
        path = out / f["file"]
        assert path.is_file() and path.stat().st_size > 2000, f["file"]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f["file"] in md
    numbers = {f["figure"] for f in figs["files"]} | {int(n) for n in figs["missing"]}
    assert numbers == {1, 2, 3, 4}
    for reason in figs["missing"].values():
        assert reason in md
    on_disk = {p.name for p in (out / "figures").glob("*.png")}
    assert on_disk == {f["file"].split("/")[-1] for f in figs["files"]}  # no empty or stray images


def test_html_is_self_contained(built_report):
    page = built_report["html"].read_text()
    n_figs = len(built_report["tables"]["figures"]["files"])
    assert page.count('src="data:image/png;base64,') == n_figs
    for external in ('src="http', "href=", "<script", "<link", "url("):
        assert external not in page
    for key, cells in built_report["tables"]["tables"].items():
        if cells and key != "other":
            assert f'<table id="{key}">' in page


def test_rebuild_is_identical(built_report, tmp_path):
    """A second build, in another process with another string-hash seed (so no set or dict order
    can leak into the output), through the command line, gives the same bytes."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    cmd = [sys.executable, "-m", "reports", "--tracking-uri", built_report["uri"], "--sweep", built_report["sweep"],
           "--experiment", built_report["experiment"], "--out", str(tmp_path), "--no-log"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    again = Path(done.stdout.strip().splitlines()[-1])  # the path is printed last
    first = built_report["out"]
    for name in ("report.md", "tables.tex", "tables.json", "report.html"):
        assert (tmp_path / name).read_bytes() == (first / name).read_bytes(), name
    for f in built_report["tables"]["figures"]["files"]:
        assert (tmp_path / f["file"]).read_bytes() == (first / f["file"]).read_bytes(), f["file"]
    assert again == tmp_path / "report.html"


def test_latex_tables(built_report):
    tex = (built_report["out"] / "tables.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") >= 1
    assert r"\toprule" in tex and "±" not in tex and "Δ" not in tex  # unicode mapped to math
    for row in built_report["tables"]["cells"].values():
        if row["acc"]["n"] >= 2:
            assert f"{100 * row['acc']['mean']:.2f} $\\pm$" in tex
