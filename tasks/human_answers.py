"""The human answers of evaluation questions: what the official VQA accuracy scores against.

LXMERT's question files carry only soft labels (``{answer: score}``), from which the official
accuracy cannot be recomputed (its normalisation works on the raw human strings). The human
answers come from:

- **VQA v2**: the official annotation file of the split's images
  (``v2_mscoco_val2014_annotations.json`` for ``minival`` / ``nominival``,
  ``v2_mscoco_train2014_annotations.json`` for ``train``; none exists for ``test``), found under
  ``<root>/vqa/`` or named by ``DataConfig.annotations`` (see `annotation_file`). It is converted
  once into a store (`build_store`) keyed by the file's path, size and mtime;
- **easy-VQA**: its one generated answer, counted as ten identical human answers
  (`HumanAnswers.unanimous`), so the official accuracy is an exact match of the unnormalised
  prediction (the unanimity rule of `tasks.metrics.official_accuracy`).

A store holds ``question_id.npy`` (N,) int64 sorted ascending, ``answer_idx.npy`` (N, K) int32
(indices into ``strings.json``, -1 = no answer; K = 10 in VQA v2) and ``strings.json`` (the
distinct answer strings, exactly as in the annotation file).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks import metrics
from tasks import store as st

FORMAT_VERSION = 1
#: The official annotation file of each VQA split's images (LXMERT's minival / nominival are
#: halves of val2014); ``test`` has no public annotations.
SPLIT_ANNOTATIONS = {
    "train": "v2_mscoco_train2014_annotations.json",
    "nominival": "v2_mscoco_val2014_annotations.json",
    "minival": "v2_mscoco_val2014_annotations.json",
}
OFFICIAL_URL = "https://visualqa.org/download.html"
#: `DataConfig.annotations` value that turns the official accuracy off.
NONE = "none"


@dataclass
class HumanAnswers:
    """Human answers per question id.

    Attributes:
        question_ids: (N,) int64, sorted ascending.
        answer_idx: (N, K) int32 indices into ``strings`` (-1 = none).
        strings: the distinct answer strings.
        source: where they come from (a file path, or a description), for messages.
    """

    question_ids: np.ndarray
    answer_idx: np.ndarray
    strings: list[str]
    source: str

    @classmethod
    def unanimous(cls, question_ids: np.ndarray, answers: Sequence[str], source: str, k: int = 10) -> HumanAnswers:
        """``k`` identical human answers per question: ``answers[i]`` for ``question_ids[i]``."""
        q = np.asarray(question_ids, np.int64).reshape(-1)
        if len(q) != len(answers):
            raise ValueError(f"{len(answers)} answers for {len(q)} question ids ({source})")
        strings = sorted(set(answers))
        code = {a: i for i, a in enumerate(strings)}
        idx = np.array([code[a] for a in answers], np.int32).reshape(-1, 1)
        order = np.argsort(q, kind="stable")
        return cls(q[order], np.repeat(idx[order], k, axis=1), strings, source)

    @classmethod
    def open(cls, path: Path) -> HumanAnswers:
        """Memory-map a store written by `build_store`."""
        meta = st.read_json(path / st.META)
        return cls(st.open_array(path, "question_id"), st.open_array(path, "answer_idx"),
                   st.read_json(path / "strings.json"), str(meta.get("source", path)))  # fmt: skip

    def __len__(self) -> int:
        return len(self.question_ids)

    def rows(self, question_ids) -> np.ndarray:
        """Rows of ``question_ids`` (M,) in this table.

        Raises:
            KeyError: naming the first id without human answers and their source.
        """
        q = np.asarray(question_ids, np.int64).reshape(-1)
        at = np.searchsorted(self.question_ids, q).clip(max=max(len(self) - 1, 0))
        bad = (self.question_ids[at] != q) if len(self) else np.ones(len(q), bool)
        if bad.any():
            raise KeyError(f"question_id {int(q[np.argmax(bad)])} has no human answers in {self.source}")
        return at

    def of(self, question_ids) -> list[list[str]]:
        """The human answers of each question id, in the source's order."""
        return [[self.strings[j] for j in row if j >= 0] for row in self.answer_idx[self.rows(question_ids)]]

    def scores(self, question_ids, predictions: Sequence[str]) -> np.ndarray:
        """Per-question official accuracy (`tasks.metrics.official_accuracy`) of predicted strings.

        Args:
            question_ids: (M,) ids.
            predictions: M predicted answer strings, in the same order.

        Returns:
            (M,) float64 in [0, 1].
        """
        humans = self.of(question_ids)
        if len(humans) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions for {len(humans)} question ids")
        return np.array([metrics.official_accuracy(p, h) for p, h in zip(predictions, humans)], np.float64)


def annotation_file(root: str | Path, split: str, configured: str = "") -> Path | None:
    """The official annotation file to score VQA split ``split`` with, or ``None``.

    Args:
        root: LXMERT's data folder (`DataConfig.root`).
        split: the evaluation split.
        configured: `DataConfig.annotations`: ``""`` = ``<root>/vqa/<official name>`` if that file
            exists; ``"none"`` = never; anything else = that file, which must exist.

    Raises:
        FileNotFoundError: a configured file does not exist (naming it and its source).
    """
    if configured == NONE:
        return None
    if configured:
        path = Path(configured).expanduser()
        if not path.is_absolute():
            path = Path(root) / path
        if not path.is_file():
            raise FileNotFoundError(
                f"missing {path} (DataConfig.annotations): the official VQA v2 annotations, e.g. "
                f"{SPLIT_ANNOTATIONS.get(split, SPLIT_ANNOTATIONS['minival'])} from {OFFICIAL_URL}; "
                f"set data.annotations={NONE} to evaluate with LXMERT's soft score instead"
            )
        return path
    name = SPLIT_ANNOTATIONS.get(split)
    if name is None:
        return None
    path = Path(root) / "vqa" / name
    return path if path.is_file() else None


def store_path(cache_dir: str | Path, annotation: Path) -> Path:
    """Where the converted store of an annotation file lives (a new file gets a new store)."""
    s = annotation.stat()
    sig = hashlib.sha1(f"{annotation.resolve()}:{s.st_size}:{s.st_mtime_ns}".encode()).hexdigest()[:10]
    return Path(cache_dir) / "vqa" / f"annotations-v{FORMAT_VERSION}" / f"{annotation.stem}-{sig}"


def build_store(cache_dir: str | Path, annotation: Path) -> Path:
    """Convert an official annotation file into a store once (atomic; a no-op when it exists).

    Raises:
        ValueError: the file is not an official annotation file (naming it and the bad entry).
    """
    path = store_path(cache_dir, annotation)

    def build(tmp: Path) -> dict:
        anns = metrics.load_official_annotations(annotation)
        qids = np.array(sorted(anns), np.int64)
        k = max([1, *(len(a.answers) for a in anns.values())])
        strings: dict[str, int] = {}
        idx = np.full((len(qids), k), -1, np.int32)
        for i, q in enumerate(qids.tolist()):
            for j, a in enumerate(anns[q].answers):
                if not isinstance(a, str):
                    raise ValueError(f"{annotation}: question_id {q}: answer {j} is {a!r}, not a string")
                idx[i, j] = strings.setdefault(a, len(strings))
        st.save(tmp, "question_id", qids)
        st.save(tmp, "answer_idx", idx)
        st.write_json(tmp / "strings.json", list(strings))
        return {"source": str(annotation), "questions": len(qids), "answers_per_question": k,
                "distinct_answers": len(strings), "format_version": FORMAT_VERSION}  # fmt: skip

    return st.build_once(path, build)
