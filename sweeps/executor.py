"""How a trial runs on Ray: the training loop inside the Tune trial's process, or on a Ray Train
worker group.

Two executors run the same :class:`sweeps.loop.TrialLoop` with the same MLflow tracking, the
same checkpoint file and the same resume rule; they differ in who runs the loop and who keeps the
checkpoints:

* ``in_process`` (one worker, no GPU, by default): the Tune function trainable runs the loop
  itself. ``ray.tune.report(metrics, checkpoint=...)`` persists each epoch's checkpoint into the
  trial's Tune directory (``<runs>/ray/<sweep>/<trial key>/checkpoint_*``); Tune keeps the last
  two (its ``CheckpointConfig``) and retries a failed trial from the newest (``FailureConfig``,
  ``ray.tune.get_checkpoint()``). A rerun sweep (a new Tuner after the driver died, not
  ``Tuner.restore``: nothing is unpickled from the runs dir) knows none of them: the trial finds
  its last one through a JSON pointer that every report rewrites (:func:`find_resume`). Nothing
  else starts: no Train controller, no worker actor, no placement-group cleaner, so the trial
  trains seconds after its process begins. The trainable then holds the trial's CPUs itself
  (``sweeps.tune.trainable_resources``).
* ``train`` (several workers or a GPU): the trainable builds a Ray Train V2 ``TorchTrainer`` whose
  workers run :func:`train_fn_per_worker` under DDP; Ray Train keeps the checkpoints (under
  ``<runs>/ray/<sweep>/train/<trial key>``) and restarts the worker group.

Ray Train V2's own local mode (``ScalingConfig(num_workers=0)``) was not used for the first: it
keeps a reported checkpoint in memory only (``LocalTrainFnUtils.report``) and starts with none,
so a retried or resumed trial would start over.

Both paths call :func:`run_loop`: "run this loop with this report callback, resumed from this
checkpoint". It reads the checkpoint with :func:`sweeps.loop.load_state` (``weights_only``), and a
failure no retry can fix (divergence, a bad config or checkpoint: :func:`sweeps.failures.classify`)
ends the trial with its cause (:func:`sweeps.failures.failure_result`) on either path instead of
raising it, so that neither Tune nor Ray Train retries it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import schema

IN_PROCESS = "in_process"
TRAIN = "train"


def choose(resources: Any) -> str:
    """The executor of a trial: ``resources.executor`` unless ``auto``, else ``in_process`` for one
    worker without a GPU and ``train`` otherwise.

    Args:
        resources: a :class:`sweeps.config.ResourcesConfig` or its flattened dict.
    """
    get = resources.get if isinstance(resources, dict) else lambda k: getattr(resources, k)
    executor = get("executor") or "auto"
    if executor != "auto":
        return executor
    one_cpu_worker = int(get("num_workers")) == 1 and float(get("gpus_per_worker")) == 0
    return IN_PROCESS if one_cpu_worker else TRAIN


# ----------------------------------------------------------------------------------------------
# shared by both paths
# ----------------------------------------------------------------------------------------------


def save_state(state: dict[str, Any], folder: str | Path) -> None:
    import torch

    from sweeps.loop import STATE_FILE

    torch.save(state, os.path.join(folder, STATE_FILE))


def load_state(folder: str | Path) -> dict[str, Any]:
    """The training state in a checkpoint folder (``state.pt``), read without executing anything
    (:func:`sweeps.loop.load_state`: ``weights_only=True``; a refused file raises
    :class:`sweeps.failures.CheckpointRefused`, which no retry can fix)."""
    from sweeps.loop import STATE_FILE
    from sweeps.loop import load_state as load_trial_state

    return load_trial_state(Path(folder) / STATE_FILE)


def cpu_threads(cfg) -> int:
    """Torch threads of a CPU worker: ``threads_per_worker``, else one per CPU it holds."""
    return cfg.resources.threads_per_worker or max(1, int(math.floor(cfg.resources.cpus_per_worker)))


#: A checkpoint to resume from: ``(read its state, where it is: the path a divergence message names)``.
Resume = tuple[Callable[[], dict[str, Any]], str]


def from_checkpoint(checkpoint) -> Resume:
    """A Ray ``Checkpoint`` (Tune's or Train's) as a :data:`Resume`: its ``state.pt`` read by
    :func:`load_state` from the checkpoint's local copy (``as_directory``)."""

    def read() -> dict[str, Any]:
        with checkpoint.as_directory() as folder:
            return load_state(folder)

    return read, checkpoint.path


def run_loop(spec: dict[str, Any], *, report: Callable[[dict[str, float], dict[str, Any] | None], Any],
             resume: Callable[[], Resume | None], executor: str, started: float, rank: int = 0,
             world_size: int = 1, device=None, wrap_model=None) -> dict[str, Any]:
    """Run one trial's loop to the end: open the trial's MLflow run on rank 0, build the loop,
    resume it from the checkpoint ``resume()`` names (if any), train, and report every epoch
    through ``report``.

    Args:
        spec: the trial spec (``trial_key``, ``config`` (flat), ``context``, ``tags``).
        report: ``report(metrics, state)``; must persist ``state`` (rank 0) before returning, and
            may return where it put it (a path).
        resume: finds the checkpoint to continue from (``None``: a fresh start). Called after the
            MLflow run is open, so that a checkpoint refused (:func:`load_state`) is recorded there.
        executor: ``in_process`` or ``train`` (tagged ``trial.executor``).
        started: when this attempt began (``time.time()``), for ``time/startup_s``.
        rank, world_size, device, wrap_model: where this copy of the loop runs and how its model
            is wrapped (DDP on the Train path); one CPU copy, unwrapped, by default.

    Returns:
        The last epoch's metrics and the trial's ``time/*`` account; or, for a failure no retry
        can fix (:func:`sweeps.failures.classify`), its cause (:func:`sweeps.failures.failure_result`)
        instead of raising it (Tune and Ray Train retry whatever is raised).
    """
    from sweeps.config import ExperimentConfig, unflatten
    from sweeps.failures import classify, failure_result, record_failure
    from sweeps.loop import TrialLoop
    from sweeps.tracking import TrialTracker, quiet_mlflow

    key = spec["trial_key"]

    def log(msg: str) -> None:
        if rank == 0:  # the other ranks run the same loop; one line per trial is enough
            print(f"[{key}] {msg}", flush=True)

    tracker = None
    with quiet_mlflow():
        try:
            t_tracked = time.time()
            if rank == 0:
                tracker = TrialTracker(spec["context"], key)
                tags = {**spec.get("tags", {}), **placement_tags(), schema.TRIAL_EXECUTOR: executor}
                tracker.start(tags=tags, params=spec["config"])
            t_built, t_tracked = time.time(), time.time() - t_tracked
            cfg = unflatten(ExperimentConfig, spec["config"], source="trial config")
            loop = TrialLoop(cfg, rank=rank, world_size=world_size, device=device, wrap_model=wrap_model, log=log,
                             started=started)
            found = resume()
            if found is not None:
                read, where = found
                loop.load_state_dict(read())
                loop.last_checkpoint = where
                log(f"resumed from checkpoint after epoch {loop.epoch} ({where})")
            log(f"{executor}: ready {time.time() - started:.1f} s after the trial began (MLflow run opened in "
                f"{t_tracked:.1f} s, loop built in {time.time() - t_built:.1f} s)")
            return loop.fit(report, tracker)
        except Exception as err:
            failure = classify(err)
            if failure is None:
                _close_run(tracker)
                raise
            # Every retry would fail the same way: end the trial with its cause instead of raising.
            record_failure(tracker, *failure)
            log(f"FAILED, not retried ({failure[0]}): {failure[1]}")
            return failure_result(*failure)
        except (SystemExit, KeyboardInterrupt):
            # Stopped from outside, not failed: Tune ends a stopped function trial with sys.exit(0)
            # inside its report (a sweep interrupted by Ctrl-C / SIGTERM), so the run is KILLED,
            # like the runs a dead driver leaves, and a rerun reopens it.
            _close_run(tracker, "KILLED")
            raise
        except BaseException:
            _close_run(tracker)
            raise


def _close_run(tracker, status: str = "FAILED") -> None:
    """Close the run as ``status`` (FAILED: an error that may be retried; KILLED: the trial was
    stopped); the next attempt, Tune's or Ray Train's, or a rerun, reopens it as RUNNING."""
    if tracker is not None and tracker.run_id:
        try:
            if status == "KILLED":
                tracker.set_tags({schema.FAILURE_KIND: "killed",
                                  schema.FAILURE_REASON: "the trial was stopped (the sweep was interrupted)"})
            tracker.finish(status)
        except Exception:
            pass


def placement_tags() -> dict[str, str]:
    """Where this Ray process runs: ``trial.node_id`` (the Ray node), ``trial.node_ip``,
    ``trial.hostname``. Rank 0 tags its trial's run with them when it (re)opens it, so after a
    restart on another node they say where the trial ran last."""
    import socket

    import ray

    return {schema.TRIAL_NODE_ID: ray.get_runtime_context().get_node_id(),
            schema.TRIAL_NODE_IP: ray.util.get_node_ip_address(),
            schema.TRIAL_HOSTNAME: socket.gethostname()}


# ----------------------------------------------------------------------------------------------
# in_process: the loop in the Tune trial's own process
# ----------------------------------------------------------------------------------------------


#: In ``<train_dir>/<trial key>/`` of an in-process trial: where its last checkpoint is (JSON).
POINTER = "in_process_checkpoint.json"
#: Beside it: the checkpoint a rerun sweep resumed from, moved out of Tune's trial directory.
RESUMED = "resumed_checkpoint"


def _write_pointer(home: Path, checkpoint: str) -> None:
    """Point at ``checkpoint`` (atomically: a killed process leaves the old pointer or the new one)."""
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / (POINTER + ".tmp")
    tmp.write_text(json.dumps({"checkpoint": checkpoint}))
    os.replace(tmp, home / POINTER)


def find_resume(home: Path) -> Resume | None:
    """The checkpoint an in-process trial of a rerun sweep resumes from, when Tune has none for it.

    The new Tuner of a rerun sweep (:func:`sweeps.tune._fit`) starts each unfinished trial afresh:
    ``ray.tune.get_checkpoint()`` is ``None`` and Tune's checkpoint numbering starts again at
    ``checkpoint_000000``, in the same trial directory as the dead driver's. The trial's pointer
    (:data:`POINTER` in ``home``, ``<train_dir>/<trial key>``, rewritten after every report) names
    its last checkpoint. That folder is moved to ``home/``:data:`RESUMED` (so Tune's new
    numbering cannot write into it) and the dead driver's other ``checkpoint_*`` folders are
    removed (no Tuner knows them: ``num_to_keep`` would never count them); the first checkpoint
    the resumed trial reports replaces it (:func:`run_in_process`). A pointer naming a folder that
    is gone (moved before a second kill) falls back to ``home/``:data:`RESUMED`.

    Returns:
        A :data:`Resume` of that folder, or ``None`` when the trial has no checkpoint (a fresh start).
    """
    from sweeps.loop import STATE_FILE

    try:
        named = Path(json.loads((home / POINTER).read_text())["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # never reported a checkpoint
    resumed = home / RESUMED
    if named != resumed and (named / STATE_FILE).is_file():
        if resumed.exists():
            shutil.rmtree(resumed)
        os.replace(named, resumed)
        _write_pointer(home, str(resumed))
        for stale in named.parent.glob("checkpoint_*"):
            shutil.rmtree(stale, ignore_errors=True)
    if not resumed.is_dir():
        return None
    return (lambda: load_state(resumed)), str(resumed)


def run_in_process(spec: dict[str, Any], started: float) -> dict[str, Any]:
    """Run the trial inside this Tune function trainable; checkpoints go to Tune.

    Called by :func:`sweeps.tune.run_trial`; ``started`` is when the trainable began. A retried
    trial resumes from Tune's checkpoint (``ray.tune.get_checkpoint()``), a trial of a rerun sweep
    from the one its pointer names (:func:`find_resume`).
    """
    import ray.tune
    import torch

    res = spec["resources"]
    home = Path(spec["train_dir"]) / spec["trial_key"]
    device = torch.device("cpu")
    if float(res["gpus_per_worker"]) > 0 and torch.cuda.is_available():
        device = torch.device("cuda", 0)  # Ray gave this actor its GPU through CUDA_VISIBLE_DEVICES
    else:
        # Tune runs this function in a thread of its own: set the threads there, where torch uses them.
        from sweeps.config import ExperimentConfig, unflatten

        torch.set_num_threads(cpu_threads(unflatten(ExperimentConfig, spec["config"], source="trial config")))

    def resume() -> Resume | None:
        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            return find_resume(home)
        return from_checkpoint(checkpoint)

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> str | None:
        with tempfile.TemporaryDirectory() as folder:
            save_state(state, folder)
            # Persists the folder into the trial's Tune directory before it returns.
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))
        persisted = ray.tune.get_checkpoint()  # the copy just persisted
        if persisted is None:
            return None
        _write_pointer(home, persisted.path)
        # The checkpoint a rerun resumed from is superseded (removed only after the pointer moved on).
        shutil.rmtree(home / RESUMED, ignore_errors=True)
        return persisted.path

    return run_loop(spec, report=report, resume=resume, executor=IN_PROCESS, started=started, device=device)


# ----------------------------------------------------------------------------------------------
# train: a Ray Train V2 worker group (DDP)
# ----------------------------------------------------------------------------------------------


def train_fn_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of every Ray Train worker of a trial.

    ``loop_config``: ``{"trial_key", "config" (flat ExperimentConfig), "context" (tracking),
    "tags", "started" (when the trainable began)}``.

    Returns:
        :func:`run_loop`'s result; rank 0's is the Train result's ``return_value``: the last epoch's
        metrics and the whole time account, or the cause of a failure no retry can fix.
    """
    t_fn = time.time()
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    from sweeps.config import ExperimentConfig, unflatten

    cfg = unflatten(ExperimentConfig, loop_config["config"], source="trial config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg))

    def wrap(model: nn.Module) -> nn.Module:
        if world == 1:
            return model
        # Some parameters get no gradient in a step, the same ones on every rank: the dropped
        # layers under LayerDrop, and always (as in LXMERT) the last cross layer's vision branch,
        # which never reaches the VQA logits. DDP must be told.
        return ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True}
        )

    # Ray Train hands back the run's latest checkpoint: after a worker-group restart, and after a
    # rerun sweep (its controller reads the run's JSON snapshot under <train_dir>/<trial key>).
    checkpoint = ray.train.get_checkpoint()
    # A fresh trial began when its trainable did; a restarted worker group's attempt is counted
    # from here (its worker processes' own start is not known: Ray may reuse pooled ones).
    started = float(loop_config["started"]) if checkpoint is None and loop_config.get("started") else t_fn

    def resume() -> Resume | None:
        return None if checkpoint is None else from_checkpoint(checkpoint)

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> str | None:
        if state is None:
            ray.train.report(metrics, checkpoint=None)
            return None
        with tempfile.TemporaryDirectory() as folder:
            save_state(state, folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        persisted = ray.train.get_checkpoint()  # the copy just persisted (reports are synchronous)
        return persisted.path if persisted is not None else None

    return run_loop(loop_config, report=report, resume=resume, executor=TRAIN, started=started, rank=rank,
                    world_size=world, device=device, wrap_model=wrap)
