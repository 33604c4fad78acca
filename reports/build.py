"""Build a sweep's report: read MLflow, compute the tables, draw the figures, write and log them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reports import decoupling, finetuning, render, task_tables
from reports import figures as figures_mod
from reports.store import DEFAULT_EXPERIMENT, ReportError, connect, load_sweep, sqlite_path
from reports.tables import compute

#: Files a build writes (figures go under ``figures/``).
OUTPUTS = ("report.html", "report.md", "tables.tex", "tables.json")


def default_out_dir(tracking_uri: str, sweep: str) -> Path:
    """Where a report goes when no ``out_dir`` is given.

    ``<folder of the SQLite database>/reports/<sweep>`` for the embedded store; otherwise
    ``./reports/<sweep>``, except when ``./reports`` is this package's source folder (running from
    the repository root): then ``./runs/reports/<sweep>`` (``runs/`` is git-ignored), so reports never
    land among the package's sources.
    """
    db = sqlite_path(tracking_uri) if tracking_uri.startswith("sqlite:") else None
    if db is not None:
        return db.expanduser().resolve().parent / "reports" / sweep
    local = Path.cwd() / "reports"
    if (local / "__init__.py").is_file():
        return Path.cwd() / "runs" / "reports" / sweep
    return local / sweep


def dumps_tables(tables: dict[str, Any]) -> str:
    """``tables.json`` text: stable key order, no timestamps, floats as Python prints them."""
    return json.dumps(tables, indent=1, ensure_ascii=False, allow_nan=True) + "\n"


def build(
    tracking_uri: str,
    sweep: str,
    experiment: str = DEFAULT_EXPERIMENT,
    out_dir: str | Path | None = None,
    log_to_mlflow: bool = True,
) -> Path:
    """Build the report of one sweep from its MLflow store.

    Writes ``report.html`` (self-contained), ``report.md``, ``tables.tex``, ``tables.json`` and
    ``figures/*.png`` to ``out_dir`` and, with ``log_to_mlflow``, logs them as artifacts of the
    sweep's parent run under ``report/``.

    Args:
        tracking_uri: The MLflow store (``sqlite:///.../mlflow.db``, ``http://host:5000``, a folder).
        sweep: The parent run's ``sweep.id`` tag.
        experiment: The MLflow experiment holding the sweep.
        out_dir: Output folder; default :func:`default_out_dir`.
        log_to_mlflow: Log the outputs back to the parent run.

    Returns:
        The path of ``report.html``.

    Raises:
        ReportError: unreachable store, unknown experiment or sweep (naming those that exist).
    """
    client = connect(tracking_uri)
    data = load_sweep(client, tracking_uri, sweep, experiment)
    out = Path(out_dir) if out_dir is not None else default_out_dir(tracking_uri, sweep)
    out.mkdir(parents=True, exist_ok=True)

    task = task_tables.strip_vqa_paper(data)  # a GQA / NLVR2 sweep: the grid's VQA paper numbers do not apply
    tables = compute(data)
    task_tables.add(tables, data, task)
    tables["finetuning"] = finetuning.compute(data)
    tables["decoupling"] = decoupling.compute(data, tables)  # None unless trials ran the retrieval stage
    figs = figures_mod.make_figures(data, tables, out)
    finetuning.add_figure(tables, figs, out)
    tables["figures"] = figs
    blocks = render.document(tables, figs)
    (out / "tables.json").write_text(dumps_tables(tables), encoding="utf-8")
    (out / "report.md").write_text(render.to_markdown(blocks), encoding="utf-8")
    (out / "tables.tex").write_text(render.to_latex(blocks, sweep), encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(render.to_html(blocks, out, f"Ablation report: {sweep}"), encoding="utf-8")

    if log_to_mlflow:
        try:
            for name in OUTPUTS:
                client.log_artifact(data.parent_run_id, str(out / name), "report")
            for f in figs["files"]:
                client.log_artifact(data.parent_run_id, str(out / f["file"]), "report/figures")
        except Exception as err:  # the files exist locally: say why they are not in MLflow
            raise ReportError(
                f"report written to {out} but logging it to the parent run {data.parent_run_id} "
                f"in {tracking_uri} failed: {type(err).__name__}: {err}"
            ) from err
    return html_path
