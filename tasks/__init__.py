"""Data and metrics: VQA v2, GQA and NLVR2 from LXMERT's files, and easy-VQA (the offline default).

Knows models only through the batch it hands over (docs/interfaces.md)::

    from tasks import DataConfig, prepare, load
    cfg = DataConfig(name="easyvqa")
    prepare(cfg)            # one-time, idempotent, atomic, safe from several processes
    data = load(cfg)        # TaskData: memory-mapped, fast
    for batch in data.train.batches(64, shuffle=True, seed=0, epoch=0):
        ...
"""

from __future__ import annotations

from tasks.config import ConfigError, DataConfig, default_cache_dir
from tasks.dataset import ArrayDataset, TaskData

__all__ = ["ArrayDataset", "ConfigError", "DataConfig", "TaskData", "default_cache_dir", "load", "prepare"]


def prepare(cfg: DataConfig) -> dict:
    """Do the task's one-time work into ``cfg.cache_dir`` (idempotent; a no-op once done).

    easy-VQA: region features of the 5,000 images and tokenised questions. VQA v2, GQA, NLVR2:
    checks that every needed LXMERT file exists (before any work, naming the missing file and what
    produces it), converts the ``*_obj36.tsv`` feature files to memory-mapped arrays (resumable)
    and tokenises the question JSONs.

    Returns:
        What was prepared where (paths, timings), for logging.

    Raises:
        FileNotFoundError: a needed input file is missing (the message names it and its source).
        ConfigError: a bad config field (named).
    """
    cfg = cfg.resolved()
    return _task_module(cfg.name).prepare(cfg)


def load(cfg: DataConfig) -> TaskData:
    """Memory-map the prepared arrays of ``cfg``'s task (preparing them first if needed).

    Returns:
        `TaskData` with ``.train``, ``.eval`` (`ArrayDataset`), ``.answers``, ``.num_answers``,
        ``.visual_feat_dim``, ``.num_regions``, ``.max_seq_len`` and ``.summary``.
    """
    cfg = cfg.resolved()
    data = _task_module(cfg.name).load(cfg)
    data.train.epoch_size = cfg.epoch_size
    return data


def _task_module(name: str):
    """The module with ``prepare(cfg)`` / ``load(cfg)`` for task ``name`` (imported on demand)."""
    import importlib

    modules = {"easyvqa": "tasks.easyvqa", "vqa": "tasks.vqa.data", "gqa": "tasks.gqa.data", "nlvr2": "tasks.nlvr2.data"}
    return importlib.import_module(modules[name])
