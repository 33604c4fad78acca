"""Read a sweep back from MLflow, exactly as ``docs/tracking.md`` describes it.

This module is the report's only input. It never imports ``sweeps``, ``models`` or ``tasks``: a
sweep run months ago, or on another cluster with other code, must still produce its report from
what its MLflow store holds.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import schema

DEFAULT_EXPERIMENT = "adaptive-ablation"

#: Metric histories a report reads for every trial (prefix match); per-layer statistics (span,
#: alpha, any a normaliser logs) come from the ``stats/attention_heads.csv`` artifact instead (one
#: download instead of ~60 calls).
HISTORY_PREFIXES = schema.HISTORY_PREFIXES
#: Tag a trial run carries when it failed for a cause the trial knew (docs/tracking.md).
FAILURE_TAG = schema.FAILURE_REASON
HEADS_ARTIFACT = schema.HEADS_ARTIFACT
PREDICTIONS_ARTIFACT = schema.PREDICTIONS_ARTIFACT
EXAMPLES_ARTIFACT = schema.EXAMPLES_ARTIFACT


class ReportError(RuntimeError):
    """The report cannot be built; the message says what is wrong and what exists instead."""


@dataclass
class Trial:
    """One planned trial of a sweep and what MLflow holds for it.

    Attributes:
        key: The trial key (``span-s1``).
        cell: The grid cell.
        seed: The seed (``None`` when neither the run nor the key says).
        status: The child run's MLflow status, or ``MISSING`` when no run exists.
        reason: Why the trial is not usable (empty when it is).
        run_id: The child run (``None`` when missing).
        planned: Whether the parent's ``sweep.trials`` lists the key.
        metrics: Latest value of every metric of the run.
        history: ``{metric: {step: value}}`` for :data:`HISTORY_PREFIXES`.
        params, tags: The run's params and tags.
        heads: Rows of ``stats/attention_heads.csv`` (``epoch, stack, layer, attention, stat, head,
            value``), or ``None`` when the artifact is absent.
        predictions: ``{question_id: (score, answer_type)}`` from ``eval/predictions.csv``.
        examples: Parsed ``eval/examples_top5.json``.
    """

    key: str
    cell: str
    seed: int | None
    status: str
    reason: str = ""
    run_id: str | None = None
    planned: bool = True
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, dict[int, float]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    heads: list[dict[str, Any]] | None = None
    predictions: dict[int, tuple[float, str]] | None = None
    examples: list[dict[str, Any]] | None = None

    @property
    def usable(self) -> bool:
        """Finished, planned, and logged the number the tables are built on."""
        return not self.reason


@dataclass
class Cell:
    """A grid cell as the parent's ``sweep.cells`` declares it."""

    name: str
    label: str
    table: int | None
    paper: dict[str, float]
    pending: str = ""


@dataclass
class Sweep:
    """A sweep: its parent run, its declared cells and its trials (planned and found)."""

    sweep_id: str
    experiment: str
    parent_run_id: str
    parent_status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    cells: dict[str, Cell]
    trials: list[Trial]
    notes: list[str] = field(default_factory=list)

    def cell_trials(self, cell: str) -> list[Trial]:
        """Trials of one cell, ordered by seed then key."""
        found = [t for t in self.trials if t.cell == cell]
        return sorted(found, key=lambda t: (t.seed is None, t.seed if t.seed is not None else 0, t.key))

    def usable(self, cell: str) -> list[Trial]:
        """Usable trials of one cell, ordered by seed."""
        return [t for t in self.cell_trials(cell) if t.usable]


# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs`` is absolute), else ``None``."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:"):]
    if rest.startswith("///"):
        return Path(rest[3:])
    raise ReportError(f"cannot read the SQLite URI {uri!r}: expected sqlite:///<path to mlflow.db>")


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<ABLATION_RUNS_DIR or ~/ablation-runs>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    runs = Path(os.environ.get("ABLATION_RUNS_DIR", "~/ablation-runs")).expanduser().resolve()
    return f"sqlite:///{runs / 'mlflow.db'}"


def connect(uri: str, timeout_s: float = 10.0):
    """An ``MlflowClient`` on ``uri``, after checking that the store exists and answers.

    Reading must never create a store: MLflow would silently create an empty SQLite database (or
    file store) at a mistyped path, and the report would then say "no such sweep" about the wrong
    place.

    Raises:
        ReportError: naming the URI and what is wrong with it.
    """
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        db = sqlite_path(uri)
        assert db is not None
        if not db.is_file():
            raise ReportError(f"no MLflow store at {uri}: the SQLite file {db} does not exist")
    elif scheme in ("http", "https"):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
        except requests.RequestException as err:
            raise ReportError(
                f"MLflow tracking server {uri} is not reachable ({type(err).__name__}: {err})"
            ) from None
    elif scheme in ("", "file"):
        folder = Path(urlparse(uri).path if scheme == "file" else uri)
        if not folder.is_dir():
            raise ReportError(f"no MLflow store at {uri}: the folder {folder} does not exist")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as err:  # any failure here means "not a usable store"
        raise ReportError(f"MLflow tracking store {uri} is not usable: {type(err).__name__}: {err}") from None
    return client


def quote(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter (which has no escapes: a value with
    a single quote goes in double quotes and vice versa).

    Raises:
        ReportError: the value holds both kinds of quote (no sweep can be named so).
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ReportError(f"no sweep can be named {value!r}: MLflow's search filters cannot hold both ' and \"")


def _search_all(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    """Every run matching ``filter_string`` (follows page tokens)."""
    runs: list = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def experiment_id(client, uri: str, name: str) -> str:
    """The id of the experiment ``name``.

    Raises:
        ReportError: listing the experiments that exist when ``name`` does not.
    """
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(
            f"no experiment '{name}' in {uri}; experiments there: {', '.join(names) or 'none'}"
        )
    return exp.experiment_id


def list_sweeps(client, uri: str, experiment: str) -> list[dict[str, Any]]:
    """The sweeps (parent runs) of an experiment, most recently started first.

    Returns:
        ``[{"sweep", "status", "n_trials", "start_time" (ms), "run_id"}]``.
    """
    exp_id = experiment_id(client, uri, experiment)
    parents = _search_all(client, [exp_id], "tags.`sweep.role` = 'parent'", order_by=["attributes.start_time DESC"])
    out = []
    for run in parents:
        tags = run.data.tags
        out.append({
            "sweep": tags.get(schema.SWEEP_ID, run.info.run_name),
            "status": tags.get(schema.SWEEP_STATUS, run.info.status.lower()),
            "n_trials": len(_json(tags.get(schema.SWEEP_TRIALS), [])),
            "start_time": run.info.start_time,
            "run_id": run.info.run_id,
        })
    return out


def _json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return default


def _cell_of_key(key: str, cells: list[str]) -> str:
    """The cell of a trial key (``span_entmax-s1`` -> ``span_entmax``): the longest cell name that
    prefixes the key up to a ``-``; used only for planned trials that never got a run."""
    best = ""
    for name in cells:
        if (key == name or key.startswith(name + "-")) and len(name) > len(best):
            best = name
    return best or key.split("-", 1)[0]


def _seed_of_key(key: str) -> int | None:
    for part in key.split("-")[1:]:
        if part.startswith("s") and part[1:].isdigit():
            return int(part[1:])
    return None


def _to_int(text: str | None) -> int | None:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return None


def load_sweep(client, uri: str, sweep: str, experiment: str = DEFAULT_EXPERIMENT) -> Sweep:
    """Read a sweep: the parent run, every child run, their histories and artifacts.

    Args:
        client: From :func:`connect`.
        uri: The tracking URI (for messages).
        sweep: The parent's ``sweep.id``.
        experiment: The MLflow experiment name.

    Raises:
        ReportError: when the experiment or sweep does not exist (listing those that do).
    """
    exp_id = experiment_id(client, uri, experiment)
    sweep_literal = quote(sweep)
    parents = _search_all(
        client, [exp_id], f"tags.`sweep.id` = {sweep_literal} and tags.`sweep.role` = 'parent'",
        order_by=["attributes.start_time DESC"],
    )
    if not parents:
        known = [s["sweep"] for s in list_sweeps(client, uri, experiment)]
        raise ReportError(
            f"no sweep '{sweep}' in experiment '{experiment}' of {uri}; sweeps there: "
            f"{', '.join(known) or 'none'}"
        )
    parent = parents[0]
    ptags = dict(parent.data.tags)
    notes: list[str] = []
    if len(parents) > 1:
        notes.append(f"{len(parents)} parent runs carry sweep.id={sweep}; the most recently started "
                     f"({parent.info.run_id}) is used")

    declared = _json(ptags.get(schema.SWEEP_CELLS), {})
    pending = _json(ptags.get(schema.SWEEP_PENDING), {})
    cells: dict[str, Cell] = {}
    for name, spec in declared.items():
        spec = spec or {}
        paper = {k: float(v) for k, v in (spec.get("paper") or {}).items() if _is_number(v)}
        cells[name] = Cell(name=name, label=str(spec.get("label") or name), table=_to_int(spec.get("table")),
                           paper=paper, pending=str(spec.get("pending") or pending.get(name) or ""))
    for name, reason in pending.items():
        if name not in cells:
            cells[name] = Cell(name=name, label=name, table=None, paper={}, pending=str(reason))

    planned: list[str] = list(_json(ptags.get(schema.SWEEP_TRIALS), []))
    failed: dict[str, str] = _json(ptags.get(schema.SWEEP_FAILED), {})
    children = _search_all(client, [exp_id], f"tags.`sweep.id` = {sweep_literal} and tags.`sweep.role` = 'trial'",
                           order_by=["attributes.start_time DESC"])
    by_key: dict[str, list] = {}
    for run in children:
        by_key.setdefault(run.data.tags.get(schema.TRIAL_KEY, run.info.run_name), []).append(run)

    trials: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="report-artifacts-") as tmp, _no_progress_bars():
        for key in planned + sorted(k for k in by_key if k not in set(planned)):
            runs = by_key.get(key, [])
            in_plan = key in planned or not planned
            if not runs:
                cell = _cell_of_key(key, list(cells))
                reason = failed.get(key) or _missing_reason(ptags)
                trials.append(Trial(key=key, cell=cell, seed=_seed_of_key(key), status="MISSING",
                                    reason=f"no run in MLflow: {reason}"))
                continue
            # A resumed trial reuses its run, so duplicates are unexpected; prefer a finished one.
            runs = sorted(runs, key=lambda r: (r.info.status != "FINISHED", -(r.info.start_time or 0)))
            run = runs[0]
            if len(runs) > 1:
                notes.append(f"trial {key} has {len(runs)} runs; {run.info.run_id} ({run.info.status}) is used")
            trials.append(_read_trial(client, run, key, cells, failed, in_plan, Path(tmp)))
    if planned == [] and trials:
        notes.append("the parent run has no sweep.trials tag: every child run is treated as planned")
    for t in trials:
        if t.cell not in cells:
            cells[t.cell] = Cell(name=t.cell, label=t.tags.get(schema.CELL_LABEL, t.cell),
                                 table=_to_int(t.tags.get(schema.CELL_TABLE)),
                                 paper={k: float(t.tags[f"paper.{k}"]) for k in ("test_dev", "test_std")
                                        if _is_number(t.tags.get(f"paper.{k}"))})
        elif cells[t.cell].table is None and _to_int(t.tags.get(schema.CELL_TABLE)) is not None:
            cells[t.cell].table = _to_int(t.tags.get(schema.CELL_TABLE))
    return Sweep(
        sweep_id=sweep, experiment=experiment, parent_run_id=parent.info.run_id,
        parent_status=parent.info.status, tags=ptags, params=dict(parent.data.params),
        metrics=dict(parent.data.metrics), cells=cells, trials=trials, notes=notes,
    )


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _missing_reason(ptags: dict[str, str]) -> str:
    status = ptags.get(schema.SWEEP_STATUS, "")
    if status == "running":
        return "the sweep is still running (or its driver died) and this trial has not started"
    return f"the trial never started (sweep status: {status or 'unknown'})"


def _read_trial(client, run, key: str, cells: dict[str, Cell], failed: dict[str, str], planned: bool,
                tmp: Path) -> Trial:
    tags = dict(run.data.tags)
    # runs logged before the schema also carry alias tags (``variant``, ``seed``): read them as a fallback
    cell = (tags.get(schema.TRIAL_CELL) or tags.get(schema.LEGACY_ALIASES[schema.TRIAL_CELL])
            or _cell_of_key(key, list(cells)))
    seed = _to_int(tags.get(schema.TRIAL_SEED, tags.get(schema.LEGACY_ALIASES[schema.TRIAL_SEED])))
    if seed is None:
        seed = _seed_of_key(key)
    trial = Trial(key=key, cell=cell, seed=seed, status=run.info.status, run_id=run.info.run_id,
                  planned=planned, metrics=dict(run.data.metrics), params=dict(run.data.params), tags=tags)
    if not planned:
        trial.reason = "not listed in the parent's sweep.trials (a run of another plan); not averaged"
    elif run.info.status != "FINISHED":
        # The run's own cause (a divergence names its step, loss and last checkpoint) first.
        why = tags.get(FAILURE_TAG) or failed.get(key)
        trial.reason = f"run status {run.info.status}" + (f": {why}" if why else "")
    elif schema.BEST_ACC not in trial.metrics:
        trial.reason = "run FINISHED but logged no best/acc"
    if trial.reason:
        # An unusable run feeds no table and no figure: skip its histories and artifacts.
        return trial
    for name in sorted(trial.metrics):
        if name.startswith(HISTORY_PREFIXES):
            hist = client.get_metric_history(run.info.run_id, name)
            # If a step was logged twice (it should not be), the later timestamp wins.
            values: dict[int, float] = {}
            for m in sorted(hist, key=lambda m: (m.step, m.timestamp)):
                values[int(m.step)] = float(m.value)
            trial.history[name] = values
    listed = _list_artifacts(client, run.info.run_id)
    if HEADS_ARTIFACT in listed:
        trial.heads = _read_heads(_download(client, run.info.run_id, HEADS_ARTIFACT, tmp))
    elif any(_head_metric(n) for n in trial.metrics):
        trial.heads = _heads_from_metrics(client, run.info.run_id, trial.metrics)
    if PREDICTIONS_ARTIFACT in listed:
        trial.predictions = _read_predictions(_download(client, run.info.run_id, PREDICTIONS_ARTIFACT, tmp))
    if EXAMPLES_ARTIFACT in listed:
        trial.examples = json.loads(_download(client, run.info.run_id, EXAMPLES_ARTIFACT, tmp) or "[]")
    return trial


@contextlib.contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar per artifact download; a report downloads dozens."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _list_artifacts(client, run_id: str) -> set[str]:
    out: set[str] = set()
    for folder in ("stats", "eval"):
        try:
            out.update(f.path for f in client.list_artifacts(run_id, folder) if not f.is_dir)
        except Exception:  # an absent folder is "no artifacts", not an error
            continue
    return out


def _download(client, run_id: str, path: str, tmp: Path) -> str:
    dst = tmp / run_id
    dst.mkdir(parents=True, exist_ok=True)
    local = client.download_artifacts(run_id, path, str(dst))
    return Path(local).read_text(encoding="utf-8")


def _read_heads(text: str) -> list[dict[str, Any]]:
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            rows.append({"epoch": int(row["epoch"]), "stack": row["stack"], "layer": int(row["layer"]),
                         "attention": row["attention"], "stat": row["stat"], "head": int(row["head"]),
                         "value": float(row["value"])})
        except (KeyError, TypeError, ValueError):
            continue
    return rows


#: The model's stacks: the second part of a per-layer statistic's metric name.
STACKS = ("lang", "visn", "cross")


def _head_metric(name: str) -> tuple[str, str, int, str] | None:
    """``(stat, stack, layer, attention)`` of a per-layer statistic's metric name
    ``<stat>/<stack>/<layer>/<attention>`` (any statistic: the name's shape, not a list of known
    statistics, decides), else ``None``. The ``_max`` companions are not statistics of their own."""
    parts = name.split("/")
    if len(parts) != 4 or parts[1] not in STACKS or not parts[2].isdigit() or parts[3].endswith("_max"):
        return None
    return parts[0], parts[1], int(parts[2]), parts[3]


def _heads_from_metrics(client, run_id: str, metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Per-layer means from ``<stat>/<stack>/<layer>/<attention>`` histories (head = -1: the mean
    over heads), for runs that logged the metrics but not the per-head CSV."""
    rows = []
    for name in sorted(metrics):
        parsed = _head_metric(name)
        if parsed is None:
            continue
        stat, stack, layer, attention = parsed
        for m in client.get_metric_history(run_id, name):
            rows.append({"epoch": int(m.step), "stack": stack, "layer": int(layer), "attention": attention,
                         "stat": stat, "head": -1, "value": float(m.value)})
    return rows


def _read_predictions(text: str) -> dict[int, tuple[float, str]]:
    out: dict[int, tuple[float, str]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        try:
            out[int(row["question_id"])] = (float(row["score"]), row.get("answer_type") or "")
        except (KeyError, TypeError, ValueError):
            continue
    return out
