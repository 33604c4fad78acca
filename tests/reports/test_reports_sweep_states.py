"""Incomplete, failed, pending and running sweeps; paired tests; logging; errors; the CLI."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from reports_synthetic import PAPER_LIKE, SweepSpec, fill_sweep

import reports
from reports.__main__ import main

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# the paper-like synthetic sweep: one failed trial, one that never started, one pending cell
# --------------------------------------------------------------------------------------------


def test_missing_failed_and_pending_are_reported_not_averaged(synthetic_report):
    t, md = synthetic_report["tables"], synthetic_report["md"]
    trials = {x["key"]: x for x in t["incomplete"]["trials"]}
    assert trials["base_1066-s1"]["status"] == "MISSING"
    assert "worker died" in trials["base_1066-s1"]["reason"]
    assert trials["layerdrop_955-s1"]["status"] == "FAILED"
    assert "out of memory" in trials["layerdrop_955-s1"]["reason"]
    assert set(trials) == {"base_1066-s1", "layerdrop_955-s1"}
    cells = t["cells"]
    assert cells["layerdrop_955"]["seeds"] == [0] and cells["layerdrop_955"]["status"] == "partial"
    assert cells["layerdrop_955"]["acc"]["std"] is None  # one seed: "n/a", never 0
    assert cells["grad_std"]["status"] == "not run"
    assert [p["cell"] for p in t["incomplete"]["pending"]] == ["grad_std"]
    assert "This sweep is incomplete" in md and "not run" in md and "1/2 ‡" in md
    assert "needs the multi-task pretraining stage" in md
    assert t["sweep"]["planned_trials"] == 14 and t["sweep"]["usable_trials"] == 12


def test_verdicts_are_seed_level_and_say_no_difference_plainly(synthetic_report):
    t = synthetic_report["tables"]
    comps = {(c["variant"], c["reference"]): c for c in t["comparisons"]}
    entmax = comps[("entmax", "softmax")]
    assert entmax["seeds"] == [0, 1]  # the question bootstrap's paired seeds
    seed = entmax["seed_test"]
    assert seed["paired"] and seed["seeds"] == [0, 1] and seed["family"] == "vs softmax"
    assert seed["verdict"] == "no detectable difference"
    assert f"no detectable difference (Holm p={seed['p_holm']:.3f})" in synthetic_report["md"]
    # LayerDrop 10-6-6 is ~19 pp worse on both seeds: the question bootstrap calls that significant, and
    # over seeds the effect is clearly negative, but two seeds and seven comparisons under Holm cannot
    # detect it at 5%: the verdict says so instead of overclaiming.
    worse = comps[("layerdrop_1066", "softmax")]
    assert worse["bootstrap"]["significant"] and worse["bootstrap"]["ci95"][1] < 0
    assert worse["seed_test"]["effect"] < -0.1 and worse["seed_test"]["ci_high"] < 0
    assert worse["seed_test"]["p_holm"] >= worse["seed_test"]["p_value"]
    family = [c["seed_test"] for c in t["comparisons"] if c["seed_test"]["family"] == "vs softmax"]
    assert len(family) == 6 and all(f["p_holm"] is not None for f in family if f["p_value"] is not None)
    # LayerDrop 10-6-6 is also compared with its own architecture without LayerDrop (found from params).
    assert t["cells"]["layerdrop_1066"]["baseline"] == "base_1066"
    assert comps[("layerdrop_1066", "base_1066")]["seeds"] == [0]
    assert comps[("layerdrop_1066", "base_1066")]["seed_test"]["verdict"] == "not tested"
    assert t["cells"]["layerdrop_955"]["baseline"] == "softmax"


def test_bootstrap_mean_is_the_paired_difference_of_best_acc(synthetic_report):
    """predictions.csv is the best epoch, so the observed difference over all questions equals the
    mean over paired seeds of best/acc differences: the two inputs agree."""
    cells = synthetic_report["tables"]["cells"]
    for comp in synthetic_report["tables"]["comparisons"]:
        var, ref = cells[comp["variant"]], cells[comp["reference"]]
        diffs = [var["acc"]["values"][var["seeds"].index(s)] - ref["acc"]["values"][ref["seeds"].index(s)]
                 for s in comp["seeds"]]
        assert comp["bootstrap"]["mean"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-3)


# --------------------------------------------------------------------------------------------
# a small sweep of our own: softmax only, one seed finished, one still RUNNING, sweep not closed
# --------------------------------------------------------------------------------------------


@pytest.fixture
def running_sweep(new_store) -> tuple[str, Path, dict]:
    uri, runs = new_store
    spec = SweepSpec(cells={"softmax": PAPER_LIKE["softmax"]}, seeds=(0, 1), epochs=2, n_questions=60,
                     failed=(), missing=(), running=("softmax-s1",), finish_sweep=False)
    info = fill_sweep(uri, runs, sweep_id="tiny", experiment="adaptive-ablation", spec=spec)
    return uri, runs, info


def test_runs_logged_before_the_schema_are_read_through_their_alias_tags(new_store):
    """Trial runs from before 2026-12-02 carry `variant` / `seed` instead of `trial.cell` / `trial.seed`."""
    uri, runs = new_store
    spec = SweepSpec(cells={"softmax": PAPER_LIKE["softmax"]}, seeds=(0, 1), epochs=1, n_questions=40,
                     failed=(), missing=(), legacy_aliases=True)
    fill_sweep(uri, runs, sweep_id="old", spec=spec)
    reports.build(uri, "old")
    t = json.loads((runs / "reports" / "old" / "tables.json").read_text())
    assert t["cells"]["softmax"]["seeds"] == [0, 1]


def test_running_sweep_without_adaptive_cells(running_sweep):
    uri, runs, info = running_sweep
    html = reports.build(uri, "tiny")  # default out dir and logging
    out = runs / "reports" / "tiny"
    assert html == out / "report.html"
    t = json.loads((out / "tables.json").read_text())
    row = t["cells"]["softmax"]
    assert row["seeds"] == [0] and row["n_planned"] == 2 and row["acc"]["std"] is None
    (running,) = t["incomplete"]["trials"]
    assert running["key"] == "softmax-s1" and running["status"] == "RUNNING"
    assert not t["tables"]["table2"] and not t["comparisons"]
    figs = t["figures"]
    assert {f["figure"] for f in figs["files"]} == {4}
    assert set(figs["missing"]) == {"1", "2", "3"}  # said in words, not drawn empty
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["fig4_examples.png"]
    md = (out / "report.md").read_text()
    assert "Fig. 1: no figure." in md and "sweep status **running**" in md

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    logged = {f.path for f in client.list_artifacts(info["parent_run_id"], "report")}
    assert {f"report/{n}" for n in ("report.html", "report.md", "tables.tex", "tables.json")} <= logged
    figures = {f.path for f in client.list_artifacts(info["parent_run_id"], "report/figures")}
    assert figures == {"report/figures/fig4_examples.png"}

    # The CLI lists the experiment's sweeps, and --latest builds the newest one.
    assert main(["--tracking-uri", uri]) == 0
    assert main(["--tracking-uri", uri, "--latest", "--no-log", "--out", str(runs / "cli")]) == 0
    assert (runs / "cli" / "tables.json").read_bytes() == (out / "tables.json").read_bytes()


# --------------------------------------------------------------------------------------------
# errors name what is wrong and what exists
# --------------------------------------------------------------------------------------------


def test_unknown_sweep_lists_the_sweeps(synthetic_sweep, tmp_path):
    uri, _, experiment = synthetic_sweep
    with pytest.raises(reports.ReportError, match=r"no sweep 'nope'.*sweeps there: smoke-paper"):
        reports.build(uri, "nope", experiment=experiment, out_dir=tmp_path, log_to_mlflow=False)
    with pytest.raises(reports.ReportError, match=r"no experiment 'other'.*adaptive-ablation"):
        reports.build(uri, "smoke-paper", experiment="other", out_dir=tmp_path, log_to_mlflow=False)


def test_unreachable_stores_are_named(tmp_path, capsys):
    missing = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    with pytest.raises(reports.ReportError, match="does not exist"):
        reports.build(missing, "x", out_dir=tmp_path)
    assert not (tmp_path / "nowhere").exists()  # reading never creates a store
    # Port 9 (discard) refuses connections at once.
    assert main(["--tracking-uri", "http://127.0.0.1:9", "--sweep", "x"]) == 2
    assert "http://127.0.0.1:9 is not reachable" in capsys.readouterr().err


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "reports", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for flag in ("--sweep", "--experiment", "--tracking-uri", "--out", "--no-log", "--latest"):
        assert flag in out.stdout


def test_default_out_dir(tmp_path, monkeypatch):
    assert reports.default_out_dir(f"sqlite:///{tmp_path}/mlflow.db", "s") == tmp_path / "reports" / "s"
    monkeypatch.chdir(tmp_path)
    assert reports.default_out_dir("http://mlflow:5000", "s") == tmp_path / "reports" / "s"
    monkeypatch.chdir(REPO)  # ./reports is the package here: never write reports into it
    assert reports.default_out_dir("http://mlflow:5000", "s") == REPO / "runs" / "reports" / "s"


def test_default_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("ABLATION_RUNS_DIR", str(tmp_path))
    assert reports.default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://x:5000")
    assert reports.default_tracking_uri() == "http://x:5000"


def test_reports_imports_no_other_package():
    """reports/ reads MLflow only: importing sweeps, models or tasks would tie old reports to new code."""
    for path in (REPO / "reports").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("sweeps", "models", "tasks"), f"{path.name} imports {name}"
