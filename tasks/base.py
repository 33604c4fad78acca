"""Task adapters: what one task (VQA, pretraining, ...) hands the task-agnostic training loop.

The loop (``sweeps/loop.py``) owns steps, epochs, the optimiser step, gradient clipping, autocast,
DDP, checkpoints and exact resume, the ``aux_loss`` / ``post_step`` hooks, LayerDrop bookkeeping,
divergence detection, time accounting and MLflow logging. A :class:`TaskAdapter` owns everything
that depends on the task: its data, its model (encoder + heads), its loss, its evaluation and the
metrics and artifacts those produce. Adapters are registered by name (:data:`TASKS`); a trial is a
list of stages, each naming its task (``sweeps.config.ExperimentConfig.stages``).

One training step, as the loop runs it::

    out = adapter.train_loss(trainable, batch, ctx)        # forward (under ctx.autocast) + task loss
    if out is None: continue                               # the adapter skips this batch
    total = out.loss + hooks.aux_loss(model)
    zero_grad(); total.backward(); adapter.after_backward()
    clip; optimiser step (or skip a non-finite one); schedule step; hooks.post_step(model)
    adapter.after_step(ctx, out, finite, total, aux)       # the adapter's epoch accumulators

and once per epoch ``adapter.train_metrics()`` then ``adapter.evaluate(trainable, ctx)``. Metric
names an adapter returns are bare (``loss``, ``acc``); the loop puts them in the stage's namespace
(``train/`` and ``eval/`` for the trial's last stage, ``<stage>/`` and ``<stage>/eval_`` for an
earlier one, e.g. ``pretrain/loss_mlm``, ``pretrain/eval_acc_mlm``). See docs/extending.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

#: The encoder's inputs in a batch (tasks/dataset.py's batches carry them under these names).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos")


@dataclass(frozen=True)
class OptimSpec:
    """How a stage optimises: its optimiser, schedule, budget and clipping (from the task's config
    section: ``train.*`` for fine-tuning, ``pretrain.*`` for pretraining)."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    lookahead_k: int = 5
    lookahead_alpha: float = 0.8
    mechanism_lr_scale: float = 1.0
    schedule: str = "linear"
    warmup_ratio: float = 0.1
    lr_min: float = 1e-5
    cycle_steps: int = 2000
    grad_clip: float = 5.0


@dataclass
class StepContext:
    """What the loop tells an adapter about the step it is in."""

    epoch: int  # epochs of this stage completed before this one (0-based epoch index)
    step: int  # optimiser steps of this stage so far
    lr: float  # the first parameter group's learning rate now
    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast: Callable[[], AbstractContextManager] = field(default=lambda: torch.autocast("cpu", enabled=False))


@dataclass
class StepLoss:
    """One training step's task loss (a 0-d tensor that will be backpropagated) and its batch size."""

    loss: Tensor
    n: int
    extra: Any = None  # whatever the adapter wants back in after_step (per-objective results)


@dataclass
class EvalResult:
    """One evaluation: bare metric names (the loop namespaces them) and what the artifacts are made
    from (:meth:`TaskAdapter.artifacts` turns it into files when the epoch is the best so far)."""

    metrics: dict[str, float]
    payload: Any = None
    #: MLflow tags describing this evaluation, set on the run when it is the best so far.
    tags: dict[str, str] = field(default_factory=dict)


class TaskAdapter:
    """The base of every task adapter; subclasses set the class attributes and override the methods.

    Args:
        cfg: The trial's whole ``ExperimentConfig``.
        rank, world_size: This worker's place in the group (each rank trains and evaluates its shard).
        device: Where the model runs.
        log: Progress messages (rank 0's; a no-op elsewhere).

    Construction loads the task's data (memory-mapped; prepared before by :meth:`prepare`).
    """

    #: The registry name (``vqa``, ``pretrain``, ...).
    name: ClassVar[str] = ""
    #: Values of ``data.name`` this task trains on when it is the trial's last stage.
    data_names: ClassVar[tuple[str, ...]] = ()
    #: The eval metric the last stage's ``best/<metric>`` and the report track (None: no "best").
    primary_metric: ClassVar[str | None] = None
    #: Parameter patterns that may stay at their initialisation when ``train.init_checkpoint`` is
    #: imported (strict otherwise), and when the previous stage's weights are imported.
    fresh_on_init: ClassVar[tuple[str, ...]] = ()
    fresh_on_transfer: ClassVar[tuple[str, ...]] = ("head.*",)
    #: The attribute of :meth:`build_model`'s model that holds the encoder (an ``LxmertModel``) to
    #: which ``model.finetune`` applies: in the trial's last stage the loop replaces it by the
    #: strategy's encoder (``models.finetune``) once the starting weights are in. None: the task's
    #: model has no such encoder, and only ``model.finetune.name=standard`` runs.
    encoder_attr: ClassVar[str | None] = "lxmert"
    #: What this stage takes from the previous stage of the trial: ``"encoder"`` (its encoder,
    #: strictly; only ``fresh_on_transfer`` may stay fresh, the previous stage's heads stay behind)
    #: or ``"model"`` (its whole state dict, heads and buffers included, loaded with
    #: ``load_state_dict(strict=True)``: this stage's model must be built exactly as the previous
    #: one's, e.g. the retrieval stage scoring the pretraining model with its matching head).
    transfer: ClassVar[str] = "encoder"

    def __init__(self, cfg: Any, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 log: Callable[[str], None] = print):  # fmt: skip
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        self.log = log

    # -- driver side, before any trial --------------------------------------------------------------

    @classmethod
    def prepare(cls, cfg: Any) -> tuple[dict[str, Any], str]:
        """One-time work (caches), idempotent; returns the ``model.*`` fields the data fixes (e.g.
        ``{"num_answers": 13}``) and a line saying what was prepared."""
        return {}, f"task {cls.name}: nothing to prepare"

    @classmethod
    def cache_key(cls, cfg: Any) -> str:
        """Trials whose keys are equal share one :meth:`prepare` (default: the data section)."""
        from models.configkit import flatten

        return f"{cls.name}:{flatten(cfg.data)!r}"

    # -- the stage -------------------------------------------------------------------------------

    def optim(self) -> OptimSpec:
        """The stage's optimisation settings and budget."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The task's whole model (encoder + its heads), plain (not wrapped), on the CPU."""
        raise NotImplementedError

    def init_options(self) -> dict[str, Any]:
        """Extra keyword arguments of :func:`models.checkpoint.load_pretrained` when the stage's model
        starts from ``train.init_checkpoint`` (e.g. ``{"answer_map": {task answer: checkpoint row}}``
        to start the answer head from a pretraining QA head). Called once, before the import."""
        return {}

    def trainable(self, model: nn.Module) -> nn.Module:
        """What trains and evaluates: ``model`` wrapped so that its forward returns only what the
        loss uses (DDP marks parameters used by walking back from the outputs). Default: ``model``."""
        return model

    def optimized(self, model: nn.Module) -> nn.Module:
        """The module whose parameters the optimiser trains (default ``model``; an adapter with
        learned loss weights adds them)."""
        return model

    def train_length(self) -> int:
        """Training samples per epoch (for the schedule's step count)."""
        raise NotImplementedError

    def train_batches(self, epoch: int) -> Iterable[dict[str, Tensor]]:
        """This rank's training batches of ``epoch`` (shuffled by ``train.seed`` and the epoch)."""
        raise NotImplementedError

    def sequence_shape(self) -> tuple[int, int]:
        """(tokens, regions) per sample, for the FLOPs estimate."""
        raise NotImplementedError

    def describe(self) -> dict[str, float]:
        """Metrics logged once at the start of the trial (``data/train_questions``, ...)."""
        return {}

    def tags(self) -> dict[str, str]:
        """MLflow tags set when the stage starts."""
        return {}

    # -- training --------------------------------------------------------------------------------

    def start_epoch(self, epoch: int) -> None:
        """Reset the epoch's accumulators."""

    def train_loss(self, model: nn.Module, batch: dict[str, Tensor], ctx: StepContext) -> StepLoss | None:
        """Forward ``batch`` through ``model`` (the :meth:`trainable`; inside ``ctx.autocast()``)
        and return the task loss; None skips the batch (no step)."""
        raise NotImplementedError

    def sample_groups(self, batch: dict[str, Tensor]) -> list[str] | None:
        """A label per sample of a training batch (e.g. VQA's question type) by which the loop breaks
        down per-sample statistics (SpotTune's usage of the fine-tuned branch); None: no groups."""
        return None

    def after_backward(self) -> None:
        """After ``backward`` and before clipping (e.g. all-reduce gradients outside DDP)."""

    def after_step(self, ctx: StepContext, out: StepLoss, finite: bool, total: float, aux: float) -> None:
        """After the optimiser step (or the skipped one): accumulate the epoch's statistics."""

    def train_metrics(self) -> dict[str, float]:
        """The epoch's training metrics (bare names; the loop adds lr, steps, timing and speed)."""
        return {}

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, ctx: StepContext) -> EvalResult:
        """Evaluate on this rank's shard of the evaluation split; return rank 0's view of the whole."""
        return EvalResult({})

    def artifacts(self, result: EvalResult) -> dict[str, Any]:
        """Files to log when ``result`` is the best so far: ``{name: text (str) or JSON-able object}``."""
        return {}

    def epoch_artifacts(self) -> dict[str, Any]:
        """Files to log after every epoch (e.g. a weights table)."""
        return {}

    def progress(self, metrics: dict[str, float]) -> str:
        """A short progress line for the epoch's (bare-named) train and eval metrics."""
        parts = [f"loss {metrics['loss']:.4f}"] if "loss" in metrics else []
        if self.primary_metric and f"eval_{self.primary_metric}" in metrics:
            parts.append(f"{self.primary_metric} {metrics[f'eval_{self.primary_metric}']:.4f}")
        return " ".join(parts)

    # -- checkpoint ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The adapter's own state (learned loss weights, logged rows); merged into the stage's."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (``state`` is the whole stage state)."""


def gather_per_example(local: dict[str, Any], keys: tuple[str, ...], world_size: int) -> dict[str, Any]:
    """Gather one rank's per-example evaluation arrays (``keys``, the first ``question_id``; plus the sums
    ``loss_sum`` and ``n``) from every rank, and keep each example once (a padded last shard repeats
    some), in first-seen order.

    Args:
        local: This rank's ``{key: (N_rank, ...) array}`` and ``loss_sum`` / ``n``.
        keys: The per-example arrays, ``question_id`` first.
        world_size: Ranks in the group (1: no communication).
    """
    import numpy as np

    if world_size > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, local)
        merged = {k: np.concatenate([g[k] for g in gathered]) for k in keys}
        merged["loss_sum"] = sum(g["loss_sum"] for g in gathered)
        merged["n"] = sum(g["n"] for g in gathered)
        local = merged
    _, first = np.unique(local[keys[0]], return_index=True)
    for k in keys:
        local[k] = local[k][np.sort(first)]
    return local


#: Task name -> ``"module:Class"`` of its adapter (imported on first use) or the class itself.
TASKS: dict[str, str | type[TaskAdapter]] = {
    "vqa": "tasks.vqa.adapter:VQAAdapter",
    "pretrain": "tasks.pretrain.adapter:PretrainAdapter",
    "gqa": "tasks.gqa.adapter:GQAAdapter",
    "nlvr2": "tasks.nlvr2.adapter:NLVR2Adapter",
    "retrieval": "tasks.retrieval.adapter:RetrievalAdapter",
}


def register_task(cls: type[TaskAdapter]) -> type[TaskAdapter]:
    """Add an adapter class to :data:`TASKS` under ``cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[TaskAdapter]:
    """The adapter class registered as ``name``."""
    from models.configkit import ConfigError

    entry = TASKS.get(name)
    if entry is None:
        raise ConfigError(f"task {name!r} is not a registered task adapter; registered: {sorted(TASKS)}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = TASKS[name] = getattr(importlib.import_module(module), attr)
    return entry


def with_model_fields(cfg: Any, fields: dict[str, Any]) -> Any:
    """``cfg`` with ``model.<field>`` set from ``fields`` (what :meth:`TaskAdapter.prepare` says the
    data fixes: answer count, feature size)."""
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields)) if fields else cfg


def task_for_data(data_name: str) -> str:
    """The registered task that trains on ``data.name=data_name`` (the trial's last stage)."""
    from models.configkit import ConfigError

    for name in list(TASKS):
        if data_name in get_task(name).data_names:
            return name
    raise ConfigError(f"data.name={data_name!r} has no task adapter; adapters and their data: "
                      + ", ".join(f"{n}: {list(get_task(n).data_names)}" for n in sorted(TASKS)))
