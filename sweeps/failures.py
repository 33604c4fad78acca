"""Failures a retry cannot fix: what they are, how a trial detects divergence, how it reports them.

Ray Train restarts a failed worker group (``resources.max_failures`` times) and Ray Tune restarts a
failed trial, whatever the exception: neither has a hook that looks at the exception's type. That
is right for a lost node, and wasted time for a failure that recurs on every attempt: a diverged
loss (same seed, same data, same steps), a config the trial cannot run, a checkpoint that does not
load. For those the trial does not raise out of its worker function: it closes its MLflow run as
FAILED with the cause (:func:`record_failure`) and returns the cause (:func:`failure_result`; for
Ray Train, rank 0's return value is the Train result's ``return_value``). The trainable returns it
as the trial's last result instead of metrics, Tune sees a trial that ended, the driver reads the
cause from that result (:func:`failure_of`) and lists the trial as failed, and a restored sweep
does not rerun it (``--fresh`` does).

Everything else still raises and is retried as before.
"""

from __future__ import annotations

import math
from typing import Any

#: Keys of the last result of a trial that failed without retry.
FAILURE_KEY = "trial/failure"
FAILURE_KIND_KEY = "trial/failure_kind"
#: MLflow tags of a trial run that failed (any failure the loop saw).
FAILURE_TAG = "failure.reason"
FAILURE_KIND_TAG = "failure.kind"


class NonRetryableError(RuntimeError):
    """A trial failure that would recur on every retry; ``kind`` names the family."""

    kind = "error"


class TrialDiverged(NonRetryableError):
    """The training loss (or its gradient) stopped being finite.

    Attributes:
        stage: ``finetune`` or ``pretrain``.
        epoch: The 1-based epoch in which it happened (of that stage).
        step: The optimizer step (of that stage) whose loss was not finite.
        loss: That step's loss.
        grad_norm: That step's gradient norm.
        checkpoint: The last checkpoint written before it (all finite), or ``""`` when none was.
    """

    kind = "diverged"

    def __init__(self, stage: str, epoch: int, step: int, loss: float, grad_norm: float, nonfinite_steps: int,
                 allowed: int, checkpoint: str):
        self.stage, self.epoch, self.step = stage, epoch, step
        self.loss, self.grad_norm, self.checkpoint = loss, grad_norm, checkpoint
        where = f"{'pretraining' if stage == 'pretrain' else 'training'} epoch {epoch}, step {step}"
        budget = (f"{nonfinite_steps} non-finite steps, more than train.max_nonfinite_steps={allowed}"
                  if allowed else "train.max_nonfinite_steps=0 allows none")
        last = f"last finite checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written before it"
        super().__init__(f"diverged at {where}: loss {loss:g}, gradient norm {grad_norm:g} ({budget}); {last}")


class CheckpointRefused(NonRetryableError):
    """A checkpoint file that cannot be loaded safely or at all (named in the message)."""

    kind = "checkpoint"


def classify(err: BaseException) -> tuple[str, str] | None:
    """``(kind, message)`` when ``err`` cannot succeed on a retry, else ``None``.

    Non-retryable: :class:`NonRetryableError` (divergence, a refused checkpoint), a config error
    (``sweeps.config.ConfigError``, ``tasks.ConfigError``) and a refused weight import
    (``models.checkpoint.CheckpointError``): the same config and files fail the same way again.
    """
    from models.checkpoint import CheckpointError
    from sweeps.config import ConfigError
    from tasks.config import ConfigError as DataConfigError

    if isinstance(err, NonRetryableError):
        return err.kind, str(err)
    if isinstance(err, (ConfigError, DataConfigError)):
        return "config", str(err)
    if isinstance(err, CheckpointError):
        return "checkpoint", str(err)
    return None


def failure_result(kind: str, message: str) -> dict[str, Any]:
    """The last result a trial reports instead of raising: the cause, and no accuracy.

    ``best/acc`` is NaN (not absent) so that a search algorithm that requires its metric in every
    result records the point as failed rather than stopping the search.
    """
    return {FAILURE_KEY: message, FAILURE_KIND_KEY: kind, "best/acc": float("nan")}


def failure_of(metrics: dict[str, Any] | None) -> str:
    """The failure message a trial's last result carries (``""`` for a trial that did not fail)."""
    return str((metrics or {}).get(FAILURE_KEY) or "")


def record_failure(tracker, kind: str, message: str) -> None:
    """Tag the trial's MLflow run with the failure and close it as FAILED (never raises: the
    failure itself must still reach the driver when MLflow is down)."""
    if tracker is None or not getattr(tracker, "run_id", ""):
        return
    try:
        tracker.set_tags({FAILURE_KIND_TAG: kind, FAILURE_TAG: message[:5000]})
        tracker.finish("FAILED")
    except Exception as err:
        print(f"could not record the failure in MLflow: {type(err).__name__}: {err}", flush=True)


class FiniteGuard:
    """Counts optimizer steps whose loss or gradient is not finite; raises once too many.

    A non-finite step is skipped (no optimizer step: its NaN gradient would poison every weight),
    up to ``allowed`` of them per stage; the next one raises :class:`TrialDiverged`. Under DDP the
    decision is all-reduced, so that every rank skips the same steps and stops at the same step.

    Args:
        stage: ``finetune`` or ``pretrain`` (for the message).
        allowed: ``train.max_nonfinite_steps``.
        world_size: Ranks in the group.
        device: Where the all-reduced flag lives (the model's device: NCCL needs CUDA tensors).
    """

    def __init__(self, stage: str, allowed: int, world_size: int = 1, device=None):
        self.stage = stage
        self.allowed = allowed
        self.world_size = world_size
        self.device = device
        self.count = 0

    def finite(self, loss: float, grad_norm: float) -> bool:
        """Whether this step may update the weights (on every rank)."""
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item() > 0)
        return not bad

    def skip(self, epoch: int, step: int, loss: float, grad_norm: float, checkpoint: str) -> None:
        """Record a non-finite step; raise :class:`TrialDiverged` when it is one too many."""
        self.count += 1
        if self.count > self.allowed:
            raise TrialDiverged(self.stage, epoch, step, loss, grad_norm, self.count, self.allowed, checkpoint)


def grad_norm(parameters, max_norm: float) -> float:
    """The total gradient norm, clipping to ``max_norm`` when it is > 0 (one pass either way)."""
    import torch

    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
