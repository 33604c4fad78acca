"""MLflow tracking for sweeps: one parent run per sweep, one child run per trial.

The layout (what ``reports/`` reads) is documented in ``docs/tracking.md``. Everything here is
idempotent so that a restored sweep, a retried trial or a resumed worker never duplicates a run
or an epoch:

* the parent run is found again by the tag ``sweep.id``;
* a child run is found again by ``sweep.id`` + ``trial.key`` (deterministic from the grid);
* an epoch is logged once: steps already in MLflow are skipped, and epochs that a checkpoint
  holds but MLflow lacks (the server was down, the worker died between checkpoint and log) are
  logged when the trial resumes ("catch-up").

Every call goes through :func:`_retry`: transient failures (server restarting, SQLite busy) are
retried with backoff for ``MLFLOW_RETRY_SECONDS`` (default 120 s); after that a
:class:`TrackingError` names the server and the operation, and the trial fails loudly rather than
dropping metrics.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")

PARENT_RUN_TAG = "mlflow.parentRunId"
DEFAULT_EXPERIMENT = "adaptive-ablation"
EPOCH_METRIC = "epoch"


class TrackingError(RuntimeError):
    """MLflow could not be reached or refused an operation; the message says which and where."""


# --------------------------------------------------------------------------------------------
# where the store is
# --------------------------------------------------------------------------------------------


def default_tracking_uri(runs_dir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store under ``runs_dir`` (absolute path, so
    every Ray worker, whatever its working directory, writes to the same database)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    db = Path(runs_dir).expanduser().resolve() / "mlflow.db"
    return f"sqlite:///{db}"


def artifact_root(runs_dir: str | Path) -> str:
    return (Path(runs_dir).expanduser().resolve() / "mlartifacts").as_uri()


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any trial starts, when the tracking store is unusable.

    Raises:
        TrackingError: naming the URI and what to do about it.
    """
    if is_remote(uri):
        import requests

        health = uri.rstrip("/") + "/health"
        try:
            response = requests.get(health, timeout=timeout_s)
            response.raise_for_status()
        except requests.RequestException as err:
            raise TrackingError(
                f"MLflow tracking server {uri} is not reachable ({type(err).__name__}: {err}). "
                "Start it (see platform/mlflow/), point MLFLOW_TRACKING_URI at a running one, "
                "or unset MLFLOW_TRACKING_URI to use the local SQLite store."
            ) from None
        return
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"cannot create the MLflow store folder {db.parent}: {err}") from None
    # Opening the store creates / migrates the schema once, here, rather than racing in workers;
    # two drivers creating one new SQLite store at once fail ("table ... already exists"), so
    # drivers sharing a runs dir take turns.
    guard = contextlib.nullcontext()
    if parsed.scheme == "sqlite":
        from tasks.store import file_lock

        guard = file_lock(db.with_name(db.name + ".init-lock"))
    try:
        with guard:
            client(uri).search_experiments(max_results=1)
    except Exception as err:
        raise TrackingError(f"MLflow tracking store {uri} is not usable: {err}") from None


def client(uri: str):
    """An ``MlflowClient`` bound to ``uri`` (no global state touched)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _retry(what: str, uri: str, fn: Callable[[], T], budget_s: float | None = None) -> T:
    """Run ``fn``; on failure retry with exponential backoff up to ``budget_s`` seconds."""
    from mlflow.exceptions import MlflowException

    budget = float(os.environ.get("MLFLOW_RETRY_SECONDS", "120")) if budget_s is None else budget_s
    start = time.monotonic()
    deadline = start + budget
    delay = 0.5
    retried = False
    while True:
        try:
            result = fn()
            if retried:
                _say(f"MLflow {uri} reachable again: {what} done after {time.monotonic() - start:.1f} s of retries")
            return result
        except MlflowException as err:
            # 4xx other than 429 are the caller's mistake: retrying cannot help.
            code = getattr(err, "get_http_status_code", lambda: 500)()
            if code and 400 <= code < 500 and code != 429:
                raise TrackingError(f"MLflow {uri} refused {what}: {err}") from None
            last: Exception = err
        except Exception as err:
            last = err
        if time.monotonic() + delay > deadline:
            raise TrackingError(
                f"MLflow {uri} failed for {budget:.0f} s while trying to {what}: "
                f"{type(last).__name__}: {str(last)[:300]}"
            ) from None
        if not retried:
            # Logging is synchronous: say why the trial has stalled, once per call.
            _say(f"MLflow {uri} failed to {what} ({type(last).__name__}); retrying for up to {budget:.0f} s")
            retried = True
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def quote(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter.

    MLflow's filter parser has no escape sequences: it strips the quotes at both ends and keeps
    the rest. A value with a single quote is written in double quotes and vice versa; one with
    both cannot be written at all.

    Raises:
        TrackingError: the value holds both kinds of quote.
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"{value!r} holds both ' and \": MLflow's search filters cannot express it")


def _to_int(text: str | None, default: int) -> int:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return default


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# code version
# --------------------------------------------------------------------------------------------


def code_version(root: str | Path) -> dict[str, str]:
    """``git.commit`` (when ``root`` is a git checkout) and ``source.hash`` (always: a hash of the
    package sources, so runs launched from a copied working dir, e.g. by ``ray job submit``,
    still say which code ran)."""
    import hashlib

    root = Path(root)
    tags: dict[str, str] = {}
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0:
            tags["git.commit"] = out.stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root, capture_output=True, text=True, timeout=10,
            )
            tags["git.dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    tags.setdefault("git.commit", os.environ.get("GIT_COMMIT", "unknown"))
    digest = hashlib.sha256()
    for package in ("models", "tasks", "sweeps", "reports"):
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    tags["source.hash"] = digest.hexdigest()[:16]
    return tags


# --------------------------------------------------------------------------------------------
# the sweep (driver side)
# --------------------------------------------------------------------------------------------


class SweepTracker:
    """The sweep's parent run. Created (or found again) by the driver before trials start."""

    def __init__(self, uri: str, experiment: str, sweep_id: str, runs_dir: str | Path):
        self.uri = uri
        self.sweep_id = sweep_id
        self.client = client(uri)
        self.experiment_id = self._experiment(experiment, runs_dir)
        self.parent_run_id: str | None = None

    def _experiment(self, name: str, runs_dir: str | Path) -> str:
        def get_or_create() -> str:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage != "active":
                    raise TrackingError(
                        f"MLflow experiment '{name}' is deleted; restore it or pick another with --experiment"
                    )
                return exp.experiment_id
            location = None if is_remote(self.uri) else artifact_root(runs_dir)
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except Exception:
                # Another driver created it between our get and create.
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                return exp.experiment_id

        return _retry(f"open experiment '{name}'", self.uri, get_or_create)

    def find_parent(self):
        runs = _retry(
            "search for the sweep's parent run",
            self.uri,
            lambda: self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`sweep.id` = {quote(self.sweep_id)} and tags.`sweep.role` = 'parent'",
                max_results=5,
            ),
        )
        return runs[0] if runs else None

    def start(self, tags: dict[str, str], params: dict[str, Any]) -> str:
        """Find or create the parent run; (re)mark it running; return its id."""
        run = self.find_parent()
        if run is None:
            run = _retry(
                "create the sweep's parent run",
                self.uri,
                lambda: self.client.create_run(
                    self.experiment_id,
                    run_name=self.sweep_id,
                    tags={"sweep.id": self.sweep_id, "sweep.role": "parent", **tags},
                ),
            )
            log_params(self.client, self.uri, run.info.run_id, params)
        else:
            _retry("reopen the sweep's parent run", self.uri,
                   lambda: self.client.update_run(run.info.run_id, status="RUNNING"))
            set_tags(self.client, self.uri, run.info.run_id, tags)
        self.parent_run_id = run.info.run_id
        return self.parent_run_id

    def set_tags(self, tags: dict[str, str]) -> None:
        assert self.parent_run_id
        set_tags(self.client, self.uri, self.parent_run_id, tags)

    def discard(self) -> int:
        """Delete (MLflow's soft delete) the parent and every child run of this sweep, so that a
        ``--fresh`` sweep of the same name starts with no runs to resume. Returns how many."""
        runs = _retry(
            "list the sweep's runs",
            self.uri,
            lambda: list(self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`sweep.id` = {quote(self.sweep_id)}", max_results=5000,
            )),
        )
        for run in runs:
            _retry("delete a run of the old sweep", self.uri, lambda r=run: self.client.delete_run(r.info.run_id))
        return len(runs)

    def finish(self, status: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
        assert self.parent_run_id
        rid = self.parent_run_id
        set_tags(self.client, self.uri, rid, tags)
        log_metrics(self.client, self.uri, rid, metrics, step=0)
        _retry("close the sweep's parent run", self.uri,
               lambda: self.client.set_terminated(rid, status=status))

    def close_orphans(self, reason: str) -> list[str]:
        """Mark this sweep's runs still RUNNING as KILLED, tagging ``failure.reason``.

        Called by a driver holding the sweep's lock before anything else: no other driver runs
        this sweep, so a RUNNING run was left by one that died (SIGKILL, a lost head node). A trial
        that resumes reopens its run as RUNNING. Returns the trial keys (or ``parent``) closed.
        """
        runs = _retry(
            "list the sweep's unfinished runs",
            self.uri,
            lambda: list(self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`sweep.id` = {quote(self.sweep_id)} and attributes.status = 'RUNNING'",
                max_results=5000,
            )),
        )
        closed = []
        for run in runs:
            rid = run.info.run_id
            role = run.data.tags.get("sweep.role", "")
            if role != "parent":
                set_tags(self.client, self.uri, rid, {"failure.kind": "killed", "failure.reason": reason})
            _retry("close a run the dead driver left open", self.uri,
                   lambda r=rid: self.client.set_terminated(r, status="KILLED"))
            closed.append("parent" if role == "parent" else run.data.tags.get("trial.key", rid))
        return closed

    def children(self) -> list:
        return _retry(
            "list the sweep's trial runs",
            self.uri,
            lambda: list(self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`sweep.id` = {quote(self.sweep_id)} and tags.`sweep.role` = 'trial'",
                max_results=5000,
            )),
        )


# --------------------------------------------------------------------------------------------
# one trial (rank-0 worker side)
# --------------------------------------------------------------------------------------------


class TrialTracker:
    """The trial's child run, opened by rank 0 of the trial's worker group.

    Args:
        context: ``{"tracking_uri", "experiment_id", "parent_run_id", "sweep_id", "tags"}`` as
            the driver hands it to every trial.
        trial_key: the trial's deterministic name (``softmax-s0``).
    """

    def __init__(self, context: dict[str, Any], trial_key: str):
        self.uri = context["tracking_uri"]
        self.experiment_id = context["experiment_id"]
        self.parent_run_id = context["parent_run_id"]
        self.sweep_id = context["sweep_id"]
        self.trial_key = trial_key
        self.client = client(self.uri)
        self.run_id: str = ""
        self.logged_epochs: set[int] = set()
        # Epochs of other stages (e.g. pretraining) already in MLflow, per counter metric; read lazily.
        self._stage_epochs: dict[str, set[int]] = {}
        self._base_tags = dict(context.get("tags", {}))

    def start(self, tags: dict[str, str], params: dict[str, Any]) -> str:
        """Find the child run of this trial (resume) or create it; log params and tags once."""
        found = _retry(
            f"search for trial {self.trial_key}'s run",
            self.uri,
            lambda: self.client.search_runs(
                [self.experiment_id],
                filter_string=(
                    f"tags.`sweep.id` = {quote(self.sweep_id)} and tags.`trial.key` = {quote(self.trial_key)}"
                ),
                max_results=5,
            ),
        )
        all_tags = {
            **self._base_tags,
            **tags,
            "sweep.id": self.sweep_id,
            "sweep.role": tags.get("sweep.role", "trial"),  # "search" for Optuna trials
            "trial.key": self.trial_key,
            PARENT_RUN_TAG: self.parent_run_id,
        }
        if found:
            run = found[0]
            self.run_id = run.info.run_id
            # How many times a worker has opened the run: 1 + restarts (retries, resumed sweeps).
            all_tags["trial.attempt"] = str(_to_int(run.data.tags.get("trial.attempt"), 1) + 1)
            _retry("reopen the trial's run", self.uri,
                   lambda: self.client.update_run(self.run_id, status="RUNNING"))
            history = _retry(
                "read the trial's logged epochs",
                self.uri,
                lambda: self.client.get_metric_history(self.run_id, EPOCH_METRIC),
            )
            self.logged_epochs = {int(m.step) for m in history}
            existing = run.data.params
            params = {k: v for k, v in params.items() if k not in existing}
            set_tags(self.client, self.uri, self.run_id, all_tags)
        else:
            all_tags["trial.attempt"] = "1"
            run = _retry(
                "create the trial's run",
                self.uri,
                lambda: self.client.create_run(self.experiment_id, run_name=self.trial_key, tags=all_tags),
            )
            self.run_id = run.info.run_id
        log_params(self.client, self.uri, self.run_id, params)
        return self.run_id

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Log one epoch's metrics at ``step=epoch``, unless that epoch is already in MLflow."""
        if epoch in self.logged_epochs:
            return False
        log_metrics(self.client, self.uri, self.run_id, {**metrics, EPOCH_METRIC: float(epoch)}, step=epoch)
        self.logged_epochs.add(epoch)
        return True

    def log_stage_epoch(self, counter: str, epoch: int, metrics: dict[str, float]) -> bool:
        """Log one epoch of another stage (pretraining) at ``step=epoch``, once.

        ``counter`` (e.g. ``pretrain/epoch``) is that stage's epoch metric: its history in MLflow
        says which epochs are logged, as ``epoch``'s does for fine-tuning, so a resumed trial
        neither repeats nor skips one.
        """
        logged = self._stage_epochs.get(counter)
        if logged is None:
            history = _retry(f"read the trial's logged {counter}", self.uri,
                             lambda: self.client.get_metric_history(self.run_id, counter))
            logged = self._stage_epochs[counter] = {int(m.step) for m in history}
        if epoch in logged:
            return False
        log_metrics(self.client, self.uri, self.run_id, {**metrics, counter: float(epoch)}, step=epoch)
        logged.add(epoch)
        return True

    def catch_up(self, history: Iterable[tuple[int, dict[str, float]]]) -> int:
        """Log the epochs a checkpoint holds but MLflow lacks; returns how many were logged."""
        return sum(self.log_epoch(epoch, metrics) for epoch, metrics in history)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        log_metrics(self.client, self.uri, self.run_id, metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        set_tags(self.client, self.uri, self.run_id, tags)

    def log_text(self, text: str, artifact_file: str) -> None:
        _retry(f"log artifact {artifact_file}", self.uri,
               lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=1, sort_keys=True, default=float), artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(f"log artifact {Path(path).name}", self.uri,
               lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        folder, name = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.log_file(path, folder or None)

    def finish(self, status: str = "FINISHED") -> None:
        _retry("close the trial's run", self.uri,
               lambda: self.client.set_terminated(self.run_id, status=status))


# --------------------------------------------------------------------------------------------
# batched writes
# --------------------------------------------------------------------------------------------

_MAX_BATCH_PARAMS = 100
_MAX_BATCH_METRICS = 1000


def log_params(mlflow_client, uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), _MAX_BATCH_PARAMS):
        chunk = items[i : i + _MAX_BATCH_PARAMS]
        _retry("log params", uri, lambda c=chunk: mlflow_client.log_batch(run_id, params=c))


def log_metrics(mlflow_client, uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
    for i in range(0, len(items), _MAX_BATCH_METRICS):
        chunk = items[i : i + _MAX_BATCH_METRICS]
        _retry(f"log metrics (step {step})", uri, lambda c=chunk: mlflow_client.log_batch(run_id, metrics=c))


def set_tags(mlflow_client, uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items()]
    for i in range(0, len(items), _MAX_BATCH_PARAMS):
        chunk = items[i : i + _MAX_BATCH_PARAMS]
        _retry("set tags", uri, lambda c=chunk: mlflow_client.log_batch(run_id, tags=c))


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows (dicts with the same keys) as CSV text, for table artifacts."""
    import csv

    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


@contextlib.contextmanager
def quiet_mlflow():
    """Silence MLflow's per-call INFO chatter (e.g. run URLs) inside workers."""
    import logging

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
