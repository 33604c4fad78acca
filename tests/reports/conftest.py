"""Fixtures for the report tests: MLflow stores holding sweeps.

* ``report_source`` yields ``(kind, (tracking_uri, sweep_id, experiment))`` of a finished sweep,
  once per source: ``synthetic`` (written here through ``sweeps.tracking``, always available) and ``smoke``
  (the real smoke sweep, from the ``smoke_sweep`` fixture that ``tests/conftest.py`` provides when
  the sweep can run; skipped otherwise). The content checks read their expected values from the
  store with ``MlflowClient``, never from constants, so they hold for both.
* ``new_store`` gives a test its own empty store in its own tmp dir (a copy of a migrated empty
  database: creating the MLflow schema costs seconds, copying it milliseconds).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def empty_store_template(pytestconfig, tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite database (copied, never written, by the tests).

    Kept in pytest's cache between sessions, per MLflow version: creating the schema runs every
    MLflow migration (several seconds, most of this suite's fixed cost).
    """
    import logging
    import os

    import mlflow
    from mlflow import MlflowClient

    cache = getattr(pytestconfig, "cache", None)
    folder = (cache.mkdir(f"reports-mlflow-{mlflow.__version__}") if cache is not None
              else tmp_path_factory.mktemp("template"))
    db = Path(folder) / "empty-mlflow.db"
    if not db.is_file():
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        fresh = tmp_path_factory.mktemp("template-new") / "mlflow.db"
        MlflowClient(f"sqlite:///{fresh}").search_experiments(max_results=1)
        # Atomic, so two test sessions starting together never copy a half-written template.
        tmp = db.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(fresh, tmp)
        os.replace(tmp, db)
    return db


def _copy_store(template: Path, runs_dir: Path) -> str:
    runs_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, runs_dir / "mlflow.db")
    return f"sqlite:///{runs_dir / 'mlflow.db'}"


@pytest.fixture
def new_store(tmp_path, empty_store_template) -> tuple[str, Path]:
    """``(tracking_uri, runs_dir)`` of an empty store of this test's own."""
    runs = tmp_path / "runs"
    return _copy_store(empty_store_template, runs), runs


@pytest.fixture(scope="session")
def synthetic_sweep(tmp_path_factory, empty_store_template) -> tuple[str, str, str]:
    """The paper-like synthetic sweep (incomplete: one failed, one missing trial, one pending cell).

    Shared by the read-only tests; a test that writes (logs a report) uses ``new_store``.
    """
    from reports_synthetic import fill_sweep

    runs = tmp_path_factory.mktemp("synthetic") / "runs"
    uri = _copy_store(empty_store_template, runs)
    fill_sweep(uri, runs, sweep_id="smoke-paper", experiment="adaptive-ablation")
    return uri, "smoke-paper", "adaptive-ablation"


@pytest.fixture(scope="session", params=["synthetic", "smoke"])
def report_source(request) -> tuple[str, tuple[str, str, str]]:
    """``(kind, (tracking_uri, sweep_id, experiment))`` of a sweep to build a report from."""
    if request.param == "synthetic":
        return "synthetic", request.getfixturevalue("synthetic_sweep")
    try:
        return "smoke", tuple(request.getfixturevalue("smoke_sweep"))
    except pytest.FixtureLookupError:
        pytest.skip("no smoke_sweep fixture (tests/conftest.py provides it once the smoke sweep runs)")


def _build(source: tuple[str, str, str], out: Path) -> dict:
    import json

    import reports

    uri, sweep, experiment = source
    # Not logged: the source store stays read-only for the other tests.
    html = reports.build(uri, sweep, experiment=experiment, out_dir=out, log_to_mlflow=False)
    return {"uri": uri, "sweep": sweep, "experiment": experiment, "out": out, "html": html,
            "tables": json.loads((out / "tables.json").read_text()),
            "md": (out / "report.md").read_text()}


@pytest.fixture(scope="session")
def synthetic_report(synthetic_sweep, tmp_path_factory) -> dict:
    """The synthetic sweep's report, built once: ``{uri, sweep, experiment, out, html, tables, md}``."""
    return _build(synthetic_sweep, tmp_path_factory.mktemp("synthetic-report"))


@pytest.fixture(scope="session")
def built_report(report_source, request, tmp_path_factory) -> dict:
    """The report of ``report_source``, built once per source (the synthetic one is shared)."""
    kind, source = report_source
    if kind == "synthetic":
        return request.getfixturevalue("synthetic_report")
    return _build(source, tmp_path_factory.mktemp(f"{kind}-report"))
