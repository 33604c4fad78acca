"""How a trial runs on Ray: the training loop inside the Tune trial's process, or on a Ray Train
worker group.

Two executors run the same :class:`sweeps.train.TrialLoop` with the same MLflow tracking, the
same checkpoint file and the same resume rule; they differ in who runs the loop and who keeps the
checkpoints:

* ``in_process`` (one worker, no GPU, by default): the Tune function trainable runs the loop
  itself. ``ray.tune.report(metrics, checkpoint=...)`` persists each epoch's checkpoint into the
  trial's Tune directory (``<runs>/ray/<sweep>/<trial key>/checkpoint_*``); Tune keeps the last
  two (its ``CheckpointConfig``), retries a failed trial from the newest (``FailureConfig``) and
  hands it back through ``ray.tune.get_checkpoint()`` after ``Tuner.restore``. Nothing else starts:
  no Train controller, no worker actor, no placement-group cleaner, so the trial trains seconds
  after its process begins. The trainable then holds the trial's CPUs itself
  (``sweeps.tune.trainable_resources``).
* ``train`` (several workers or a GPU): the trainable builds a Ray Train V2 ``TorchTrainer`` whose
  workers run :func:`train_fn_per_worker` under DDP; Ray Train keeps the checkpoints (under
  ``<runs>/ray/<sweep>/train/<trial key>``) and restarts the worker group.

Ray Train V2's own local mode (``ScalingConfig(num_workers=0)``) was not used for the first: it
keeps a reported checkpoint in memory only (``LocalTrainFnUtils.report``) and starts with none,
so a retried or restored trial would start over.

Both paths call :func:`run_loop`: "run this loop with this report callback and this resume state".
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

    from sweeps.train import STATE_FILE

    torch.save(state, os.path.join(folder, STATE_FILE))


def load_state(folder: str | Path) -> dict[str, Any]:
    """The training state in a checkpoint folder (``state.pt``)."""
    import torch

    from sweeps.train import STATE_FILE

    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)


def cpu_threads(cfg) -> int:
    """Torch threads of a CPU worker: ``threads_per_worker``, else one per CPU it holds."""
    return cfg.resources.threads_per_worker or max(1, int(math.floor(cfg.resources.cpus_per_worker)))


def run_loop(spec: dict[str, Any], *, report: Callable[[dict[str, float], dict[str, Any] | None], None],
             resume: dict[str, Any] | None, executor: str, started: float, rank: int = 0, world_size: int = 1,
             device=None, wrap_model=None) -> dict[str, float]:
    """Run one trial's loop to the end: build it, resume it from ``resume`` (a checkpoint's state),
    open the trial's MLflow run on rank 0, train, and report every epoch through ``report``.

    Args:
        spec: the trial spec (``trial_key``, ``config`` (flat), ``context``, ``tags``).
        report: ``report(metrics, state)``; must persist ``state`` (rank 0) before returning.
        resume: the state to continue from, or ``None`` for a fresh start.
        executor: ``in_process`` or ``train`` (tagged ``trial.executor``).
        started: when this attempt began (``time.time()``), for ``time/startup_s``.
        rank, world_size, device, wrap_model: where this copy of the loop runs and how its model
            is wrapped (DDP on the Train path); one CPU copy, unwrapped, by default.

    Returns:
        The last epoch's metrics and the trial's ``time/*`` account.
    """
    from sweeps.config import ExperimentConfig, unflatten
    from sweeps.tracking import TrialTracker, quiet_mlflow
    from sweeps.train import TrialLoop

    key = spec["trial_key"]

    def log(msg: str) -> None:
        print(f"[{key}] {msg}", flush=True)

    t_built = time.time()
    cfg = unflatten(ExperimentConfig, spec["config"], source="trial config")
    loop = TrialLoop(cfg, rank=rank, world_size=world_size, device=device, wrap_model=wrap_model, log=log,
                     started=started)
    if resume is not None:
        loop.load_state_dict(resume)
        log(f"resumed from checkpoint after epoch {loop.epoch}")
    t_built, t_tracked = time.time() - t_built, time.time()
    tracker = None
    with quiet_mlflow():
        if rank == 0:
            tracker = TrialTracker(spec["context"], key)
            tags = {**spec.get("tags", {}), **placement_tags(), "trial.executor": executor}
            tracker.start(tags=tags, params=spec["config"])
            log(f"{executor}: ready {time.time() - started:.1f} s after the trial began (loop built in "
                f"{t_built:.1f} s, MLflow run opened in {time.time() - t_tracked:.1f} s)")
        try:
            return loop.fit(report, tracker)
        except BaseException:
            if tracker is not None and tracker.run_id:
                # FAILED now; the next attempt (Tune's or Ray Train's retry) reopens it as RUNNING.
                try:
                    tracker.finish("FAILED")
                except Exception:
                    pass
            raise


def placement_tags() -> dict[str, str]:
    """Where this Ray process runs: ``trial.node_id`` (the Ray node), ``trial.node_ip``,
    ``trial.hostname``. Rank 0 tags its trial's run with them when it (re)opens it, so after a
    restart on another node they say where the trial ran last."""
    import socket

    import ray

    return {"trial.node_id": ray.get_runtime_context().get_node_id(),
            "trial.node_ip": ray.util.get_node_ip_address(),
            "trial.hostname": socket.gethostname()}


# ----------------------------------------------------------------------------------------------
# in_process: the loop in the Tune trial's own process
# ----------------------------------------------------------------------------------------------


def run_in_process(spec: dict[str, Any], started: float) -> dict[str, float]:
    """Run the trial inside this Tune function trainable; checkpoints go to Tune.

    Called by :func:`sweeps.tune.run_trial`; ``started`` is when the trainable began.
    """
    import ray.tune
    import torch

    res = spec["resources"]
    device = torch.device("cpu")
    if float(res["gpus_per_worker"]) > 0 and torch.cuda.is_available():
        device = torch.device("cuda", 0)  # Ray gave this actor its GPU through CUDA_VISIBLE_DEVICES
    else:
        # Tune runs this function in a thread of its own: set the threads there, where torch uses them.
        from sweeps.config import ExperimentConfig, unflatten

        torch.set_num_threads(cpu_threads(unflatten(ExperimentConfig, spec["config"], source="trial config")))
    resume = None
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_state(folder)

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save_state(state, folder)
            # Persists the folder into the trial's Tune directory before it returns.
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))

    return run_loop(spec, report=report, resume=resume, executor=IN_PROCESS, started=started, device=device)


# ----------------------------------------------------------------------------------------------
# train: a Ray Train V2 worker group (DDP)
# ----------------------------------------------------------------------------------------------


def train_fn_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    """Entry point of every Ray Train worker of a trial.

    ``loop_config``: ``{"trial_key", "config" (flat ExperimentConfig), "context" (tracking),
    "tags", "started" (when the trainable began)}``.
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

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_state(folder)
    # A fresh trial began when its trainable did; a restarted worker group's attempt is counted
    # from here (its worker processes' own start is not known: Ray may reuse pooled ones).
    started = float(loop_config["started"]) if resume is None and loop_config.get("started") else t_fn

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if state is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_state(state, folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    # Rank 0's return value is the Train result's ``return_value``: the last epoch's metrics and
    # the whole time account (the result's ``metrics`` are those of the last checkpoint).
    return run_loop(loop_config, report=report, resume=resume, executor=TRAIN, started=started, rank=rank,
                    world_size=world, device=device, wrap_model=wrap)
