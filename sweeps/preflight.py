"""Whole-sweep checks before Ray starts: what would fail in every trial fails here, once, all at once.

The config of every trial is validated when the plan is expanded (:func:`sweeps.grid.expand`, which
lists every problem). What needs files is checked here, in two passes so that a bad file is found
before hours of data conversion:

* :func:`check_files` (before data preparation): the data files exist, and every
  ``train.init_checkpoint`` exists and opens as a weights file (a truncated, empty or text file,
  or one holding pickled objects, is named);
* :func:`check_weights` (after it, when the models' sizes are known): the checkpoint's keys and
  shapes load into each distinct model of the sweep exactly as the trial will load them.

Each returns one message per problem; :class:`PreflightError` carries them all.
"""

from __future__ import annotations

from pathlib import Path

from sweeps.config import ConfigError, flatten
from sweeps.grid import Plan


class PreflightError(ConfigError):
    """Problems found before any trial starts; ``problems`` lists one message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems found before starting:"
        body = "" if len(problems) == 1 else "\n  " + "\n  ".join(problems)
        super().__init__(head + body)


def _checkpoints(plan: Plan) -> dict[str, list[str]]:
    """``{init_checkpoint: [trial keys]}`` for the trials that start from one."""
    out: dict[str, list[str]] = {}
    for trial in plan.trials:
        path = trial.config.train.init_checkpoint
        if path:
            out.setdefault(path, []).append(trial.key)
    return out


def _trials(keys: list[str]) -> str:
    return f"{len(keys)} trial(s): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"


def check_files(plan: Plan, cache_dir: Path | None = None) -> list[str]:
    """Every data file the trials need exists, and every ``train.init_checkpoint`` exists and
    reads as weights; one message per missing or bad file.

    Args:
        plan: The sweep.
        cache_dir: Where data caches go when a trial's ``data.cache_dir`` is empty (a feature
            file is needed only while its converted store is not there).
    """
    import dataclasses

    from models.checkpoint import CheckpointError, read_checkpoint

    problems = []
    seen: set[str] = set()
    for trial in plan.trials:
        data = trial.config.data
        if data.name != "vqa":
            continue  # easy-VQA ships in its package
        if not data.cache_dir and cache_dir is not None:
            data = dataclasses.replace(data, cache_dir=str(cache_dir))
        key = repr(flatten(data))
        if key in seen:
            continue
        seen.add(key)
        from tasks.vqa.data import check_inputs

        try:
            check_inputs(data.resolved())
        except (FileNotFoundError, ValueError) as err:
            problems.append(f"data.root={data.root}: {err}")
    for path, keys in _checkpoints(plan).items():
        where = f"train.init_checkpoint={path} ({_trials(keys)})"
        if not Path(path).expanduser().exists():
            problems.append(f"{where}: does not exist (pretrained LXMERT weights: the original model_LXRT.pth "
                            "or a HuggingFace LXMERT directory with config.json)")
            continue
        try:
            read_checkpoint(Path(path).expanduser())
        except (CheckpointError, FileNotFoundError, OSError) as err:
            problems.append(f"{where}: {err}")
    return problems


def check_weights(plan: Plan) -> list[str]:
    """Load every ``train.init_checkpoint`` into each distinct model of the sweep as the trial will
    (strict unless ``train.init_allow_partial``), without keeping anything; one message per refusal.

    Needs the trials' ``model.num_answers`` / ``visual_feat_dim`` set from their data.
    """
    import models
    from models.checkpoint import CheckpointError, load_pretrained

    problems = []
    seen: set[str] = set()
    for trial in plan.trials:
        cfg = trial.config
        if not cfg.train.init_checkpoint:
            continue
        key = repr((cfg.train.init_checkpoint, cfg.train.init_allow_partial, flatten(cfg.model)))
        if key in seen:
            continue
        seen.add(key)
        path = Path(cfg.train.init_checkpoint).expanduser()
        try:
            load_pretrained(models.build_model(cfg.model), path, strict=not cfg.train.init_allow_partial,
                            verbose=False)
        except (CheckpointError, FileNotFoundError, OSError, ValueError) as err:
            problems.append(f"train.init_checkpoint={cfg.train.init_checkpoint} does not load into the model of "
                            f"trial {trial.key} (cell {trial.cell.name}): {err}")
    return problems


def require(problems: list[str]) -> None:
    """Raise :class:`PreflightError` when there is any problem."""
    if problems:
        raise PreflightError(problems)
