"""The Tune driver: a validated plan -> one Tune trial per grid point, run by the trial's executor.

Every trial is a Tune *function trainable* (:func:`run_trial`). What it does depends on the
trial's executor (``resources.executor``, ``sweeps/executor.py``): a one-worker CPU trial runs the
training loop in the trainable's own process and reports its checkpoints to Tune, which keeps them
under ``<runs>/ray/<sweep>/<key>``; any other trial builds a Ray Train V2 ``TorchTrainer`` and
calls ``.fit()`` (``Tuner(trainer)`` is the V1 API and fails under V2), its Train run named after
the trial key and stored under ``<runs>/ray/<sweep>/train/<key>``. Either way a restarted trial
(Tune retry, Train worker-group restart, rerun sweep) finds its latest checkpoint and resumes
from it. The Tune experiment is stored under ``<runs>/ray/<sweep>``, with a ledger of the trials
that ended (:data:`LEDGER`, JSON): rerunning the same command after the driver died runs a new
Tuner over the trials the ledger lacks, which resume from their checkpoints; ended trials are not
rerun. (Not ``Tuner.restore``: it unpickles Tune's saved state, and nothing unpickled from the
runs dir is trusted.)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

import schema
from sweeps import executor as executors
from sweeps.config import ConfigError, flatten
from sweeps.failures import failure_of
from sweeps.grid import Plan, Trial

#: What a trial's own process (the function trainable, the Train driver) reserves on the ``train``
#: path: memory only, no CPU. It only waits on its TorchTrainer; the Train workers hold the CPUs.
#: Even a small CPU fraction breaks packing: on nodes whose CPUs are a whole number of trial
#: workers (two 1-CPU nodes, two 1-CPU trials) Tune spreads the trainables over the nodes, no node
#: then has a whole worker's CPUs free, and every trial waits forever for its worker group. Tune
#: needs a non-empty bundle, hence memory: a floor (the trainable and its Train controller, which
#: Ray puts on the same node, hold about 0.4 GB RSS each, mostly shared torch libraries) that does
#: not cut concurrency on small hosts. On the ``in_process`` path the trainable is the worker, so it
#: reserves the worker's CPUs (and GPU) instead (:func:`trainable_resources`); the same packing
#: then holds trivially: one 1-CPU trainable per 1-CPU node.
TRAINABLE_RESOURCES = {"cpu": 0, "memory": 256 * 1024**2}

#: Checkpoints kept per trial (Ray Train's on the Train path, Tune's on the in-process path).
NUM_TO_KEEP = 2

#: Environment of every trial's process, Train controller and workers (set explicitly so that it
#: holds whether the sweep was started locally, with RAY_ADDRESS, or by `ray job submit`).
TRIAL_ENV = {
    # Trials are short: notice finished or failed workers promptly (Ray's default polls every 2 s).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Worker prints reach the driver once (Ray Train's print patch would log them twice).
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


@dataclass
class SweepPaths:
    runs_dir: Path
    sweep_id: str

    @property
    def ray_dir(self) -> Path:
        return self.runs_dir / "ray"

    @property
    def tune_dir(self) -> Path:
        return self.ray_dir / self.sweep_id

    @property
    def train_dir(self) -> Path:
        return self.tune_dir / "train"

    @property
    def manifest(self) -> Path:
        return self.runs_dir / "sweeps" / f"{self.sweep_id}.json"


@dataclass
class TrialOutcome:
    key: str
    cell: str
    seed: int
    #: TERMINATED | ERROR (raised, retries spent) | FAILED (not retried: its cause in ``error``) |
    #: UNFINISHED (the sweep was interrupted before it ended)
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    duration_s: float = 0.0
    ran_now: bool = False

    def time(self, part: str) -> float:
        """``time/<part>`` of the trial's time account (0 when the trial did not report it)."""
        value = self.metrics.get(f"{schema.TIME_NS}{part}", 0.0)
        return float(value) if isinstance(value, (int, float)) else 0.0


@dataclass
class SweepOutcome:
    trials: list[TrialOutcome]
    wall_s: float
    concurrency: int

    @property
    def n_ran(self) -> int:
        return sum(t.ran_now for t in self.trials)

    @property
    def ideal_s(self) -> float:
        """Sum of the trial times of this run over the slots they could fill at once."""
        return sum(t.duration_s for t in self.trials if t.ran_now) / max(1, min(self.concurrency, self.n_ran))

    @property
    def overhead_ratio(self) -> float:
        """Wall time over :attr:`ideal_s`, which counts each trial's whole time (start-up
        included) as useful: it cannot see start-up costs."""
        return self.wall_s / self.ideal_s if self.ideal_s > 0 else float("nan")

    def time_sum(self, part: str) -> float:
        """``time/<part>`` summed over the trials this run finished (parts: ``TIME_PARTS``, ``wall_s``)."""
        return sum(t.time(part) for t in self.trials if t.ran_now)

    @property
    def step_s(self) -> float:
        """Time in training and evaluation steps, summed over the trials this run finished."""
        return self.time_sum("train_s") + self.time_sum("eval_s")

    @property
    def goodput(self) -> float:
        """:attr:`step_s` over the trials' summed wall times (their time accounts)."""
        wall = self.time_sum("wall_s")
        return self.step_s / wall if wall > 0 else float("nan")

    @property
    def step_ideal_s(self) -> float:
        """The sweep's wall time if its slots did nothing but training and evaluation steps."""
        return self.step_s / max(1, min(self.concurrency, self.n_ran))

    @property
    def wall_over_ideal(self) -> float:
        return self.wall_s / self.step_ideal_s if self.step_ideal_s > 0 else float("nan")

    def timing_metrics(self, prefix: str = "sweep/") -> dict[str, float]:
        """The time account of the sweep: per part sums, goodput, wall / ideal (for MLflow)."""
        from sweeps.loop import TIME_PARTS

        out = {f"{prefix}{part}": self.time_sum(part) for part in (*TIME_PARTS, "wall_s")}
        out[f"{prefix}trials_sum_s"] = out.pop(f"{prefix}wall_s")  # the parent's wall_s is the command's
        if self.step_s > 0:
            out[f"{prefix}goodput"] = self.goodput
            out[f"{prefix}step_ideal_s"] = self.step_ideal_s
            out[f"{prefix}wall_over_ideal"] = self.wall_over_ideal
        return out

    @property
    def failed(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.status != "TERMINATED"]


# ----------------------------------------------------------------------------------------------
# the trainable (runs in a Tune trial actor)
# ----------------------------------------------------------------------------------------------


def run_trial(param: dict[str, Any]) -> dict[str, Any]:
    """Tune function trainable: one trial, resumed from its last checkpoint, by its executor."""
    started = time.time()  # the trial's start, as its time account counts it (time/startup_s)
    spec = dict(param["trial"])
    if param.get("search"):
        # An Optuna trial: this point of the search space, under a name of its own.
        from ray import tune

        spec["config"] = {**spec["config"], **param["search"]}
        spec["trial_key"] = f"{spec['trial_key']}-opt-{tune.get_context().get_trial_id()}"
        spec["tags"] = {**spec["tags"], "search.params": json.dumps(param["search"], sort_keys=True)}
    env = {k: os.environ.get(k, v) for k, v in TRIAL_ENV.items()}
    os.environ.update(env)  # the Train controller inherits RAY_TRAIN_* from this process
    if spec.get("executor", executors.TRAIN) == executors.IN_PROCESS:
        metrics = executors.run_in_process(spec, started)
    else:
        metrics = _run_train(spec, env, started)
    metrics["trial_wall_s"] = time.time() - started
    return metrics


def _run_train(spec: dict[str, Any], env: dict[str, str], started: float) -> dict[str, Any]:
    """The Train path: a TorchTrainer over ``num_workers`` workers, each running the loop."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = spec["resources"]
    scaling = ray.train.ScalingConfig(
        num_workers=int(res["num_workers"]),
        use_gpu=res["gpus_per_worker"] > 0,
        resources_per_worker={"CPU": res["cpus_per_worker"],
                              **({"GPU": res["gpus_per_worker"]} if res["gpus_per_worker"] > 0 else {})},
    )
    trainer = TorchTrainer(
        executors.train_fn_per_worker,
        train_loop_config={**{k: spec[k] for k in ("trial_key", "config", "context", "tags")}, "started": started},
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=spec["trial_key"],
            storage_path=spec["train_dir"],
            failure_config=ray.train.FailureConfig(max_failures=int(res["max_failures"])),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=NUM_TO_KEEP),
            callbacks=[TuneReportCallback()],
            worker_runtime_env={"env_vars": env},
            logging_config=ray.train.LoggingConfig(log_level=os.environ.get("ABLATION_TRAIN_LOG_LEVEL", "WARNING")),
        ),
    )
    result = trainer.fit()
    prune_unregistered_checkpoints(result, spec["trial_key"])
    returned = result.return_value if isinstance(result.return_value, dict) else {}
    if failure_of(returned):
        # A trial that ended without a retry returns its cause (rank 0's return value), not its
        # last checkpoint's metrics.
        return dict(returned)
    metrics = dict(result.metrics or {})
    metrics.update(returned)  # rank 0's: the last epoch's metrics and the time account up to its last line
    return metrics


def trainable_resources(config: dict[str, Any]):
    """Tune's resource request for one trial (``tune.with_resources``): the worker's CPUs (and GPU)
    on the in-process path, :data:`TRAINABLE_RESOURCES` on the Train path."""
    from ray.tune import PlacementGroupFactory

    spec = config["trial"]
    res = spec["resources"]
    if spec.get("executor") == executors.IN_PROCESS:
        bundle = {"CPU": float(res["cpus_per_worker"])}
        if float(res["gpus_per_worker"]) > 0:
            bundle["GPU"] = float(res["gpus_per_worker"])
        return PlacementGroupFactory([bundle])
    return PlacementGroupFactory([{"CPU": TRAINABLE_RESOURCES["cpu"], "memory": TRAINABLE_RESOURCES["memory"]}])


def reuse_trial_processes(specs: list[dict[str, Any]]) -> bool:
    """Whether a finished trial's process runs the next trial (Tune's ``reuse_actors``): when every
    trial runs in-process. That process has already imported torch, torch._dynamo (which the first
    optimizer pulls in) and MLflow, a few seconds each trial would otherwise spend starting. Every
    trial seeds all generators and builds its own model, data view, optimizer and MLflow client, so
    nothing carries over; a failed trial's process is never reused. Train-path trials keep a fresh
    process each (their trainable only waits on the worker group)."""
    return bool(specs) and all(s.get("executor") == executors.IN_PROCESS for s in specs)


def tune_max_failures(specs: list[dict[str, Any]]) -> int:
    """Tune's retries per trial (one number for the whole experiment): once on the Train path
    (Ray Train restarts the worker group itself, ``resources.max_failures`` times); on the
    in-process path Tune alone restarts a trial, ``max_failures + 1`` times."""
    need = [int(s["resources"]["max_failures"]) + 1 if s.get("executor") == executors.IN_PROCESS else 1
            for s in specs]
    return max(need, default=1)


def prune_unregistered_checkpoints(result, trial_key: str) -> list[Path]:
    """Remove the trial's checkpoint folders that Ray Train (or Tune) never registered.

    A worker persists its checkpoint folder first and reports it to the Train controller after; a
    worker lost in between (its node gone) leaves a folder that ``num_to_keep`` never counts nor
    deletes. Once the run has finished, every ``checkpoint_*`` folder in its run directory that is
    not among the kept checkpoints is such an orphan. The same holds for an in-process trial's
    Tune directory (``result`` from Tune's ``ResultGrid``). Local or shared-filesystem storage
    only; returns the folders removed.
    """
    import pyarrow.fs

    keep = {Path(c.path).resolve() for c, _ in result.best_checkpoints or []}
    if not keep or not isinstance(result.filesystem, pyarrow.fs.LocalFileSystem):
        return []
    removed = []
    for folder in sorted(Path(result.path).glob("checkpoint_*")):
        if folder.is_dir() and folder.resolve() not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        print(f"[{trial_key}] removed {len(removed)} checkpoint folder(s) a lost worker wrote but never "
              f"registered: {', '.join(f.name for f in removed)}", flush=True)
    return removed


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------


def longest_first(trials: list[Trial]) -> list[Trial]:
    """Trials in the order to start them: the longest first, so the sweep does not end on one
    long trial while the other slots idle. Pretraining trials come first (they do a whole extra
    stage), then the rest by FLOPs per sample times epochs; ties keep the grid's order."""
    from models.flops import flops_per_sample

    def cost(t: Trial) -> tuple[bool, float]:
        c = t.config
        return c.pretrain.enabled, flops_per_sample(c.model, training=True, backward=True) * c.train.epochs

    return sorted(trials, key=cost, reverse=True)


def trial_spec(trial: Trial, paths: SweepPaths, context: dict[str, Any]) -> dict[str, Any]:
    cell = trial.cell
    tags = {
        schema.TRIAL_CELL: cell.name,
        schema.TRIAL_SEED: str(trial.seed),
        schema.TRIAL_AXES: json.dumps(trial.axis_values, sort_keys=True),
        schema.CELL_LABEL: cell.label,
        schema.CELL_TABLE: str(cell.table),
    }
    for key, value in cell.paper.items():
        tags[f"paper.{key}"] = str(value)
    return {
        "trial_key": trial.key,
        "config": flatten(trial.config),
        "resources": flatten(trial.config.resources),
        "context": context,
        "tags": tags,
        "train_dir": str(paths.train_dir),
        "executor": executors.choose(trial.config.resources),
    }


def concurrency(plan: Plan, cluster: dict[str, float], requested: int) -> int:
    """How many trials fit at once (every trial asks the same resources; the preset sets them)."""
    res = plan.trials[0].config.resources
    if requested > 0:
        return requested
    cpus = cluster.get("CPU", 1.0)
    fit = math.floor(cpus / (res.num_workers * res.cpus_per_worker) + 1e-9)
    if res.gpus_per_worker > 0:
        fit = min(fit, math.floor(cluster.get("GPU", 0.0) / (res.num_workers * res.gpus_per_worker) + 1e-9))
    if fit < 1:
        need = f"{res.num_workers} x {res.cpus_per_worker} CPU" + (
            f" + {res.num_workers} x {res.gpus_per_worker} GPU" if res.gpus_per_worker else "")
        raise ConfigError(
            f"one trial needs {need}, the cluster has {cpus:g} CPU / {cluster.get('GPU', 0):g} GPU: "
            "lower resources.* or add nodes"
        )
    return fit


def check_manifest(paths: SweepPaths, plan: Plan, fresh: bool, search: dict[str, Any] | None = None) -> bool:
    """Refuse to restore a sweep whose trials changed; returns True when a previous run exists."""
    exists = paths.manifest.exists()
    if exists and not fresh:
        saved = json.loads(paths.manifest.read_text())
        if search is not None and saved.get("search", search) != search:
            raise ConfigError(
                f"sweep '{paths.sweep_id}' already exists in {paths.runs_dir} with search {saved.get('search')}, "
                f"not {search}: rerun with the same --search/--trials, pass --name, or --fresh to replace it."
            )
        if saved.get("fingerprint") != plan.fingerprint:
            raise ConfigError(
                f"sweep '{paths.sweep_id}' already exists in {paths.runs_dir} with a different grid or "
                f"config (fingerprint {saved.get('fingerprint')} != {plan.fingerprint}). Rerun with the "
                "same arguments to resume it, pass --name to start a new sweep, or --fresh to replace it."
            )
    return exists and not fresh


def write_manifest(paths: SweepPaths, plan: Plan, extra: dict[str, Any]) -> None:
    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "sweep_id": paths.sweep_id,
        "fingerprint": plan.fingerprint,
        "grid": str(plan.grid.path),
        "preset": str(plan.preset.path),
        "trials": [t.key for t in plan.trials],
        "pending": plan.pending,
        **extra,
    }, indent=1))
    os.replace(tmp, paths.manifest)


class Progress(Callback):
    """One line per epoch and per finished trial, instead of Tune's tables."""

    def __init__(self, total: int, ledger: Path | None = None):
        self.total = total
        self.ledger = ledger  # where ended trials are recorded (what a rerun of the sweep skips)
        self.done = 0
        self.start = time.time()
        self.printed: set[tuple[str, int]] = set()

    def _stamp(self) -> str:
        return f"[{time.time() - self.start:6.0f}s]"

    @staticmethod
    def _key(trial) -> str:
        return _trial_name(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if schema.PRETRAIN_EPOCH in result and schema.EVAL_ACC not in result:
            seen = (self._key(trial), -int(result[schema.PRETRAIN_EPOCH]))  # its own epoch counter
            if seen not in self.printed:
                self.printed.add(seen)
                losses = " ".join(f"{k.rsplit('_', 1)[-1]} {v:.3f}" for k, v in sorted(result.items())
                                  if k.startswith(f"{schema.PRETRAIN_STAGE}/loss_") and k.count("_") == 1)  # fmt: skip
                print(f"{self._stamp()} {self._key(trial):<22} pretrain epoch {int(result['pretrain/epoch'])}: "
                      f"{losses} {result.get('pretrain/samples_per_s', 0):.0f} samples/s", flush=True)
            return
        if schema.RETRIEVAL_EPOCH in result and schema.EVAL_ACC not in result:
            seen = (self._key(trial), "retrieval")  # evaluated once
            rsum = f"{schema.RETRIEVAL_PREFIX}{schema.RETRIEVAL_RSUM}"
            if seen not in self.printed and rsum in result:
                self.printed.add(seen)
                recalls = " ".join(f"{k} {result[schema.RETRIEVAL_PREFIX + k]:.1f}" for k in ("i2t_r1", "t2i_r1")
                                   if schema.RETRIEVAL_PREFIX + k in result)  # fmt: skip
                print(f"{self._stamp()} {self._key(trial):<22} zero-shot retrieval: {recalls} rsum {result[rsum]:.1f}",
                      flush=True)
            return
        if schema.EVAL_ACC in result and schema.EPOCH in result:
            # The trainable's return value repeats the last epoch's metrics: print each epoch once.
            seen = (self._key(trial), int(result[schema.EPOCH]))
            if seen in self.printed:
                return
            self.printed.add(seen)
            print(f"{self._stamp()} {self._key(trial):<22} epoch {int(result['epoch'])}: "
                  f"acc {result['eval/acc']:.4f} loss {result.get('train/loss', float('nan')):.4f} "
                  f"{result.get('train/samples_per_s', 0):.0f} samples/s", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        result = dict(trial.last_result or {})
        # Only run_trial's own return value carries trial_wall_s: a trial stopped mid-way has none.
        if self.ledger is not None and "trial_wall_s" in result:
            _record_ended(self.ledger, _trial_name(trial), result, trial.config.get("search"))
        failure = failure_of(trial.last_result)
        if failure:  # ended without a retry (sweeps/failures.py): no accuracy to show
            print(f"{self._stamp()} FAILED {self._key(trial)} ({self.done}/{self.total}), not retried: {failure}",
                  flush=True)
            return
        acc = (trial.last_result or {}).get(schema.BEST_ACC)
        acc_s = f"best acc {acc:.4f}" if isinstance(acc, (int, float)) else ""
        print(f"{self._stamp()} finished {self._key(trial)} ({self.done}/{self.total}) {acc_s}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        print(f"{self._stamp()} FAILED {self._key(trial)} ({self.done}/{self.total}); logs: {trial.local_path}",
              flush=True)


def _trial_name(trial) -> str:
    """The trial key; an Optuna trial adds its Tune id (as ``run_trial`` names its MLflow run)."""
    key = trial.config["trial"]["trial_key"]
    return f"{key}-opt-{trial.trial_id}" if trial.config.get("search") else key


def error_summary(error: BaseException | str | None) -> str:
    """The root cause of a trial error: the last ``SomeError: message`` line of its traceback."""
    if not error:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*:", ln)]
    return (causes[-1] if causes else lines[-1] if lines else str(error))[:1000]


#: The Optuna search space, relative to the preset's values: every cell gets the same space and
#: the same number of trials (``--trials``), so no variant is favoured by its tuning budget.
SEARCH_SPACE = {
    "train.lr": ("loguniform", 0.1, 10.0),  # x the preset's learning rate
    "train.warmup_ratio": ("uniform", 0.0, 0.3),  # absolute
}


def _fit(name: str, paths: SweepPaths, param_space: dict[str, Any] | None, n_at_once: int,
         progress: Callback, search_alg=None, num_samples: int = 1, max_failures: int = 1,
         reuse_actors: bool = False):
    """Run one Tune experiment over ``param_space`` (the trials not finished yet); returns
    (results, wall_s).

    A rerun of an interrupted sweep builds a new Tuner over its unfinished trials instead of
    ``Tuner.restore``: Tune's saved experiment state is pickled Python objects, and unpickling a
    file from the runs dir (shared storage on a cluster) could run any code. What a restore needs
    is elsewhere, in plain data: which trials finished (:func:`read_ledger`, JSON) and each
    unfinished trial's last checkpoint (Ray Train's JSON snapshot on the Train path, the
    executor's JSON pointer on the in-process path, :func:`sweeps.executor.find_resume`; both
    ``state.pt`` read with ``weights_only=True``).

    ``max_failures``: Tune's retries per trial (:func:`tune_max_failures`); ``reuse_actors``: see
    :func:`reuse_trial_processes`.
    """
    from ray import tune

    trainable = tune.with_resources(run_trial, trainable_resources)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=n_at_once, reuse_actors=reuse_actors, search_alg=search_alg,
            num_samples=num_samples, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(paths.ray_dir),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            # In-process trials' checkpoints (Train-path trials report metrics only to Tune).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=NUM_TO_KEEP),
            callbacks=[progress],
            verbose=0,
        ),
    )
    start = time.time()
    results = tuner.fit()
    wall = time.time() - start
    for result in results:
        if result.config["trial"].get("executor") == executors.IN_PROCESS and not result.error:
            prune_unregistered_checkpoints(result, _result_name(result))
    return results, wall


def _result_name(result) -> str:
    """The trial name of a Tune result (its folder's name: :func:`_trial_name`)."""
    return Path(result.path).name


#: In each Tune experiment's folder: the trials that ended (finished, or failed without a retry).
LEDGER = "ended_trials.json"


def read_ledger(path: Path) -> dict[str, dict[str, Any]]:
    """``{trial name: {"metrics": last result, "search": point or None}}`` of the trials that
    ended in earlier runs of a Tune experiment (``{}`` when none did)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_ended(path: Path, name: str, result: dict[str, Any], point: dict[str, Any] | None) -> None:
    """Add one ended trial to the ledger (atomically: a killed driver leaves the old or the new one)."""
    ledger = read_ledger(path)
    metrics = {k: v for k, v in result.items() if k != "config" and isinstance(v, (int, float, str, bool))}
    ledger[name] = {"metrics": metrics, "search": point}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ledger, default=str))
    os.replace(tmp, path)


def _ledger_outcome(spec: dict[str, Any], record: dict[str, Any], key: str = "") -> TrialOutcome:
    """A trial that ended in an earlier run of the sweep, as this run reports it."""
    metrics = dict(record.get("metrics") or {})
    failure = failure_of(metrics)
    return TrialOutcome(key=key or spec["trial_key"], cell=spec["tags"][schema.TRIAL_CELL], seed=int(spec["tags"][schema.TRIAL_SEED]),
                        status="FAILED" if failure else "TERMINATED", metrics=metrics, error=failure,
                        duration_s=float(metrics.get("trial_wall_s", 0.0) or 0.0), ran_now=False)


def _ledger(paths: SweepPaths, name: str, restore: bool) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The experiment's ledger and, when restoring, what it holds (a new sweep starts it empty)."""
    path = paths.ray_dir / name / LEDGER
    if not restore:
        path.unlink(missing_ok=True)
        return path, {}
    return path, read_ledger(path)


def _outcomes(results) -> list[TrialOutcome]:
    # Tune's own status per trial (the ResultGrid keeps the trials in its analysis, in result order):
    # a trial stopped by Ctrl-C / SIGTERM ends with no error and is not finished either.
    analysis = getattr(results, "_experiment_analysis", None)
    states = [t.status for t in analysis.trials] if analysis is not None else []
    out = []
    for i, result in enumerate(results):
        spec = result.config["trial"]
        metrics = dict(result.metrics or {})
        failure = failure_of(metrics)  # ended without a retry, with its cause (sweeps/failures.py)
        state = states[i] if len(states) == len(results) else "TERMINATED"
        status = ("ERROR" if result.error else "FAILED" if failure
                  else "TERMINATED" if state == "TERMINATED" else "UNFINISHED")
        out.append(TrialOutcome(
            key=spec["trial_key"],
            cell=spec["tags"][schema.TRIAL_CELL],
            seed=int(spec["tags"][schema.TRIAL_SEED]),
            status=status,
            metrics=metrics,
            error=error_summary(result.error) if result.error else failure,
            duration_s=float(metrics.get("trial_wall_s", 0.0) or 0.0),
            ran_now=status == "TERMINATED",
        ))
    return out


def run(plan: Plan, paths: SweepPaths, context: dict[str, Any], max_concurrent: int = 0,
        restore: bool = True) -> SweepOutcome:
    """Run (or, with ``restore``, finish) every trial of ``plan`` on the connected Ray cluster."""
    import ray
    from ray import tune

    specs = [trial_spec(t, paths, context) for t in longest_first(plan.trials)]
    n_at_once = concurrency(plan, ray.cluster_resources(), max_concurrent)
    paths.train_dir.mkdir(parents=True, exist_ok=True)
    ledger, ended = _ledger(paths, paths.sweep_id, restore)
    todo = [s for s in specs if s["trial_key"] not in ended]
    if restore:
        print(f"restoring '{paths.sweep_id}': {len(specs) - len(todo)} ended trial(s) kept, {len(todo)} to run or "
              "resume from their checkpoints", flush=True)
    outcomes = [_ledger_outcome(s, ended[s["trial_key"]]) for s in specs if s["trial_key"] in ended]
    wall = 0.0
    if todo:
        results, wall = _fit(paths.sweep_id, paths, {"trial": tune.grid_search(todo)}, n_at_once,
                             Progress(len(todo), ledger), max_failures=tune_max_failures(todo),
                             reuse_actors=reuse_trial_processes(todo))
        outcomes += _outcomes(results)
    order = {t.key: i for i, t in enumerate(plan.trials)}
    outcomes = sorted(outcomes, key=lambda o: order.get(o.key, len(order)))
    return SweepOutcome(trials=outcomes, wall_s=wall, concurrency=n_at_once)


def search(plan: Plan, paths: SweepPaths, context: dict[str, Any], n_trials: int, max_concurrent: int = 0,
           restore: bool = True) -> tuple[dict[str, dict[str, float]], SweepOutcome]:
    """Optuna over :data:`SEARCH_SPACE` for every cell, ``n_trials`` each, on the cell's first seed.

    Search trials are logged as child runs with ``sweep.role=search`` (reports ignore them).

    Returns:
        ``{cell: {"train.lr": ..., "train.warmup_ratio": ...}}``, the best point of each cell by
        evaluation accuracy, and the search trials' outcomes.
    """
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    n_at_once = concurrency(plan, ray.cluster_resources(), max_concurrent)
    paths.train_dir.mkdir(parents=True, exist_ok=True)
    best: dict[str, dict[str, float]] = {}
    outcomes: list[TrialOutcome] = []
    wall = 0.0
    first_of_cell: dict[str, Trial] = {}
    for trial in sorted(plan.trials, key=lambda t: t.seed):
        first_of_cell.setdefault(trial.cell.name, trial)
    for cell, trial in first_of_cell.items():
        spec = trial_spec(trial, paths, {**context, "tags": {**context.get("tags", {}), schema.SWEEP_ROLE: schema.ROLE_SEARCH}})
        spec["tags"] = {**spec["tags"], schema.SWEEP_ROLE: schema.ROLE_SEARCH}
        space: dict[str, Any] = {}
        for key, (kind, lo, hi) in SEARCH_SPACE.items():
            if kind == "loguniform":
                base = float(spec["config"][key])
                space[key] = tune.loguniform(base * lo, base * hi)
            else:
                space[key] = tune.uniform(lo, hi)
        name = f"{paths.sweep_id}-search-{cell}"
        ledger, ended = _ledger(paths, name, restore)
        # (point, metrics) of every search trial that ended, in earlier runs and in this one
        points = [(r["search"], r.get("metrics") or {}) for r in ended.values() if r.get("search")]
        outcomes.extend(_ledger_outcome(spec, r, key) for key, r in ended.items())
        remaining = n_trials - len(ended)
        print(f"search: {cell}: {remaining} Optuna trials over {', '.join(space)}"
              + (f" ({len(ended)} ended before)" if ended else ""), flush=True)
        if remaining > 0:
            results, seconds = _fit(
                name, paths, {"trial": spec, "search": space}, n_at_once, Progress(remaining, ledger),
                search_alg=OptunaSearch(metric=schema.BEST_ACC, mode="max", seed=trial.seed + len(ended)),
                num_samples=remaining, max_failures=tune_max_failures([spec]),
                reuse_actors=reuse_trial_processes([spec]),
            )
            wall += seconds
            outcomes.extend(_outcomes(results))
            points += [(r.config["search"], dict(r.metrics or {})) for r in results if not r.error]
        finished = [(p, m) for p, m in points
                    if not failure_of(m) and isinstance(m.get(schema.BEST_ACC), (int, float)) and m[schema.BEST_ACC] == m[schema.BEST_ACC]]
        if not finished:
            raise RuntimeError(f"search: every Optuna trial of cell '{cell}' failed; see {paths.ray_dir}")
        point, metrics = max(finished, key=lambda pm: pm[1][schema.BEST_ACC])
        best[cell] = {k: float(v) for k, v in point.items()}
        print(f"search: {cell}: best {best[cell]} (acc {metrics['best/acc']:.4f})", flush=True)
    return best, SweepOutcome(trials=outcomes, wall_s=wall, concurrency=n_at_once)
