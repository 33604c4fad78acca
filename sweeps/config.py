"""Experiment configuration: dataclasses that flatten to dotted keys and take `key=value` overrides.

One trial is fully described by an :class:`ExperimentConfig`: the model (``models.ModelConfig``),
the data (``tasks.DataConfig``), the optimisation (:class:`TrainConfig`), the resources
(:class:`ResourcesConfig`), the optional pretraining stage (``tasks.pretrain.PretrainConfig``) and
the optional zero-shot retrieval stage after it (``tasks.retrieval.config.RetrievalConfig``).
Every leaf is a ``str``, ``int``, ``float`` or ``bool``, so a config round-trips through MLflow
params, grid files and the command line::

    cfg = ExperimentConfig()
    cfg = apply_overrides(cfg, {"model.attention.name": "span", "train.lr": "3e-4"})
    flat = flatten(cfg)            # {"model.attention.name": "span", "train.lr": 0.0003, ...}
    assert unflatten(ExperimentConfig, flat) == cfg
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import ModelConfig
from models.configkit import (  # noqa: F401  (re-exported: the sweep's one config API)
    ConfigError,
    apply_overrides,
    flatten,
    parse_cli_overrides,
    unflatten,
)
from tasks import DataConfig
from tasks.pretrain.config import PretrainConfig
from tasks.retrieval.config import RetrievalConfig

OPTIMIZERS = ("adamw", "lookahead_lamb")
SCHEDULES = ("linear", "cyclic", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
EXECUTORS = ("auto", "in_process", "train")


@dataclass
class TrainConfig:
    """Optimisation and evaluation of one trial.

    The two recipes: ``adamw`` + ``linear`` (LXMERT's VQA fine-tuning: AdamW, linear warm-up over
    ``warmup_ratio`` of the steps, then linear decay to 0) and ``lookahead_lamb`` + ``cyclic``
    (the paper: Lookahead(k, alpha) around LAMB, triangular cyclical learning rate between
    ``lr_min`` and ``lr`` with half-period ``cycle_steps``).
    """

    seed: int = 0
    epochs: int = 3
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_min: float = 1e-5
    schedule: str = "linear"
    warmup_ratio: float = 0.1
    cycle_steps: int = 2000
    weight_decay: float = 0.01
    lookahead_k: int = 5
    lookahead_alpha: float = 0.8
    grad_clip: float = 5.0
    #: Learning-rate multiplier for the adaptive mechanisms' own parameters (span z, learned-alpha
    #: logits; no weight decay): see ``sweeps.optim.param_groups``.
    mechanism_lr_scale: float = 1.0
    precision: str = "auto"
    eval_batch_size: int = 512
    #: Fixed example questions (the first N of the evaluation split) whose top-5 answers are
    #: logged at the end of the trial (the paper's Fig. 4).
    n_examples: int = 4
    #: Path to pretrained LXMERT weights (HF directory, state dict, or original ``.pth``); empty
    #: means random initialisation.
    init_checkpoint: str = ""
    #: Allow a partial weight import (missing/unexpected keys are reported, not refused).
    init_allow_partial: bool = False
    #: Log the best model's weights as an MLflow artifact at the end of the trial.
    log_best_checkpoint: bool = True
    #: The task adapter of the trial's last stage (``tasks.base.TASKS``); empty: the one registered
    #: for ``data.name`` (``vqa`` for easy-VQA and VQA v2).
    task: str = ""
    #: Optimizer steps with a non-finite loss or gradient a trial may skip (per stage) before it
    #: stops as diverged; 0 stops it at the first one.
    max_nonfinite_steps: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing every bad key of this section (not just the first)."""
        problems = _checked([
            lambda: _choice("train.optimizer", self.optimizer, OPTIMIZERS),
            lambda: _choice("train.schedule", self.schedule, SCHEDULES),
            lambda: _choice("train.precision", self.precision, PRECISIONS),
            lambda: _positive("train.epochs", self.epochs),
            lambda: _positive("train.batch_size", self.batch_size),
            lambda: _positive("train.eval_batch_size", self.eval_batch_size),
            lambda: _positive("train.lr", self.lr),
            lambda: _positive("train.cycle_steps", self.cycle_steps),
            lambda: _positive("train.lookahead_k", self.lookahead_k),
            lambda: _positive("train.mechanism_lr_scale", self.mechanism_lr_scale),
            lambda: _at_least("train.seed", self.seed, 0),
            lambda: _at_least("train.weight_decay", self.weight_decay, 0),
            lambda: _at_least("train.grad_clip", self.grad_clip, 0, " (0: no clipping)"),
            lambda: _at_least("train.max_nonfinite_steps", self.max_nonfinite_steps, 0),
            lambda: _at_least("train.n_examples", self.n_examples, 0),
        ])
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 < self.lookahead_alpha <= 1.0:
            problems.append(f"train.lookahead_alpha must be in (0, 1], got {self.lookahead_alpha}")
        if self.schedule == "cyclic" and not 0.0 < self.lr_min < self.lr:
            problems.append(f"train.lr_min must be in (0, train.lr={self.lr}), got {self.lr_min}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class ResourcesConfig:
    """What one trial asks of the cluster.

    ``gpus_per_worker`` may be fractional (several trials share one GPU). ``threads_per_worker``
    0 means one torch thread per CPU the worker holds.

    ``executor`` says how a trial runs (``sweeps/executor.py``): ``in_process`` runs the training
    loop inside the Tune trial's own process (one worker; it starts in seconds), ``train`` builds a
    Ray Train ``TorchTrainer`` worker group (DDP over ``num_workers``), ``auto`` picks
    ``in_process`` for one worker without a GPU and ``train`` otherwise.
    """

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 0
    #: Trials run at once; 0 means as many as the cluster's CPUs/GPUs allow.
    max_concurrent: int = 0
    #: Restarts per trial (from the last checkpoint) before the trial fails: Ray Train restarts a
    #: worker group this many times (and Tune retries the trial once more); an in-process trial is
    #: restarted by Tune ``max_failures + 1`` times, the same number of second chances.
    max_failures: int = 2
    #: ``auto`` | ``in_process`` | ``train``: see the class docstring.
    executor: str = "auto"

    def validate(self) -> None:
        _positive("resources.num_workers", self.num_workers)
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"resources.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"resources.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ConfigError(
                f"resources.gpus_per_worker above 1 must be whole, got {self.gpus_per_worker}"
            )
        for name in ("threads_per_worker", "max_concurrent", "max_failures"):
            if getattr(self, name) < 0:
                raise ConfigError(f"resources.{name} must be >= 0, got {getattr(self, name)}")
        _choice("resources.executor", self.executor, EXECUTORS)
        if self.executor == "in_process" and self.num_workers != 1:
            raise ConfigError(
                f"resources.executor=in_process runs the loop in the trial's own process, one worker; "
                f"got resources.num_workers={self.num_workers}: use executor=train (or auto) for DDP"
            )


@dataclass
class ExperimentConfig:
    """Everything one trial needs; flattened, it is the trial's MLflow params."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    #: Multi-task pretraining before fine-tuning (off unless ``pretrain.enabled``).
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    #: Zero-shot image-text retrieval after pretraining, evaluation only (off unless ``retrieval.enabled``).
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def stages(self) -> list[tuple[str, str]]:
        """The trial's stages in order, each ``(stage name, task adapter name)``: ``("pretrain",
        "pretrain")`` when ``pretrain.enabled``, then ``("retrieval", "retrieval")`` (evaluation only)
        when ``retrieval.enabled`` too, then ``("finetune", <train.task or data.name's task>)``.
        The last stage is what the trial reports (``train/*``, ``eval/*``, ``best/*``); an earlier
        one logs under ``<stage name>/*`` (sweeps/loop.py)."""
        from tasks.base import task_for_data

        final = ("finetune", self.train.task or task_for_data(self.data.name))
        if not self.pretrain.enabled:
            return [final]
        retrieval = [("retrieval", "retrieval")] if self.retrieval.enabled else []
        return [("pretrain", "pretrain"), *retrieval, final]

    def validate(self) -> None:
        """Validate every section; raises :class:`ConfigError` naming the keys at fault (every
        section's problems, not just the first section's)."""
        problems = []
        for section in ("model", "data", "train", "resources", "pretrain", "retrieval"):
            value = getattr(self, section)
            try:
                value.validate()
            except ConfigError as err:
                problems.append(str(err))
            except (ValueError, KeyError, TypeError) as err:
                # The models/tasks packages raise their own ValueErrors; name the section.
                message = str(err)
                if not message.startswith(f"{section}."):
                    message = f"{section}: {message}"
                problems.append(message)
        problems += self.retrieval.trial_problems(self.pretrain.enabled, list(self.pretrain.tasks), self.data.name)
        try:
            from tasks.base import get_task

            for _, task in self.stages():
                get_task(task)
        except ConfigError as err:
            problems.append(f"train.task: {err}")
        if problems:
            raise ConfigError("; ".join(problems))
        if self.model.finetune.name != "standard":
            task = self.stages()[-1][1]
            if get_task(task).encoder_attr is None:
                raise ConfigError(f"model.finetune.name={self.model.finetune.name!r}: task {task!r} has no encoder "
                                  "the strategy applies to (its adapter's encoder_attr is None); use standard")
        if self.pretrain.enabled and self.pretrain.corpus == "synthetic" and self.data.name != "easyvqa":
            raise ConfigError(
                f"pretrain.corpus=synthetic needs data.name=easyvqa (its region features come from easy-VQA's "
                f"extractor), got data.name={self.data.name!r}: set pretrain.corpus=lxmert and pretrain.root "
                "(default: data.root, and for the synthetic GQA folder pretrain.sources=vgnococo "
                "pretrain.eval_source= as the smoke_tasks preset sets)"  # no "; ": it separates problems
            )
        if self.pretrain.enabled and self.pretrain.corpus == "lxmert" and not self.pretrain.lxmert_root(self.data.root):
            raise ConfigError("pretrain.root is empty (and so is data.root): pretrain.corpus=lxmert needs LXMERT's "
                              "data folder with lxmert/*.json and the obj36 feature TSVs")


# --------------------------------------------------------------------------------------------
# flatten / unflatten / overrides: generic over nested dataclasses with scalar leaves
# --------------------------------------------------------------------------------------------

# flatten / unflatten / overrides / coercion: the one system of every package (models.configkit),
# re-exported here for the sweep's callers.
def load_yaml(path: str | Path, what: str = "YAML") -> Any:
    """Read a YAML file (grids, presets: every YAML file the platform reads goes through here).

    Like ``yaml.safe_load`` (no Python objects are built), but a mapping that repeats a key is
    refused: YAML itself keeps the last value and drops the others silently, so a cell defined
    twice, or a key given twice under ``set:``, would run something the file does not say.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or repeats a key (naming the file, the
            key and both lines).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")

    duplicates: list[str] = []

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *anchor` merges are meant to be overridden
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        seen = first.setdefault(key, line)
                    except TypeError:  # an unhashable key: the base constructor reports it
                        continue
                    if seen != line:
                        duplicates.append(f"{path}:{line}: duplicate key '{key}' (first at line {seen})")
            return super().construct_mapping(node, deep=deep)

    try:
        with open(path) as fh:
            data = yaml.load(fh, Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if duplicates:
        raise ConfigError("; ".join(sorted(set(duplicates), key=duplicates.index))
                          + ". YAML would keep only the last of each and silently drop the others: remove or "
                          "rename them")
    return data


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key} must be one of {', '.join(options)}; got '{value}'")


def _positive(key: str, value: float) -> None:
    if not value > 0:  # `not >` also refuses NaN
        raise ConfigError(f"{key} must be > 0, got {value}")


def _at_least(key: str, value: float, low: float, note: str = "") -> None:
    if not value >= low:
        raise ConfigError(f"{key} must be >= {low}{note}, got {value}")


def _checked(checks: list) -> list[str]:
    """Run every check (each raises ConfigError); return all their messages."""
    problems = []
    for check in checks:
        try:
            check()
        except ConfigError as err:
            problems.append(str(err))
    return problems
