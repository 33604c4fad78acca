"""`ArrayDataset`: questions + region features as arrays; batches are slices, not collations.

A dataset is one or more *parts* (a split's question arrays, each pointing into one image-feature
store). All arrays are memory-mapped ``.npy`` files written by `prepare`; a batch is assembled with
a handful of vectorised gathers (``np.take`` into one fresh output buffer per key), so there is no
per-sample Python and no per-sample ``collate``:

========================  ===============  =========================================================
array                     shape / dtype    meaning
========================  ===============  =========================================================
``input_ids``             (N, T) int32     WordPiece ids, ``[CLS] ... [SEP]``, padded with 0
``lengths``               (N,) int32       tokens before truncation (``> T``: truncated)
``image_index``           (N,) int32       row of the question's image in its feature store; (N, K)
                                           with K images per question (NLVR2: the pair, K = 2)
``label_idx``             (N, K) int32     answer ids of the soft labels, -1 = none (K: max labels)
``label_score``           (N, K) float32   their soft scores (0.3, 0.6, 0.9, 1.0)
``question_id``           (N,) int64       id of the question in its split
``answer_type``           (N,) int16       index into ``answer_type_names``
``question_type``         (N,) int16       index into ``question_type_names``
``n_oov``                 (N,) int16       answers dropped from targets: not in the vocabulary
feature store ``feats``   (M, R, F) f32    region features of the M images
feature store ``boxes``   (M, R, 4) f32    (x1, y1, x2, y2) / (w, h, w, h), in [0, 1]
========================  ===============  =========================================================

With K images per question the batch's ``visual_feats`` / ``visual_pos`` are (B, K, R, F) /
(B, K, R, 4), in the order the task wrote them (NLVR2: ``img0``, ``img1``). A split may also keep
the ids its source file uses (``source_ids.json``: GQA's string question ids, NLVR2's
identifiers) beside the integer ``question_id``; `ArrayDataset.source_id_of` returns them.

Soft targets are stored sparsely (K <= 10 answers per question) and scattered into the dense
``(B, A)`` target matrix per batch: a dense VQA matrix would be 600k x 3,129 floats (7.5 GB).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tasks import store as st

if TYPE_CHECKING:
    from tasks.human_answers import HumanAnswers

QUESTION_ARRAYS = (
    "input_ids",
    "lengths",
    "image_index",
    "label_idx",
    "label_score",
    "question_id",
    "answer_type",
    "question_type",
    "n_oov",
)


@dataclass
class FeatureStore:
    """Region features of a set of images, memory-mapped.

    Attributes:
        path: the store directory.
        feats: (M, R, F) float32 region features.
        boxes: (M, R, 4) float32 normalised boxes.
        meta: the store's ``meta.json`` (image ids, provenance).
    """

    path: Path
    feats: np.ndarray
    boxes: np.ndarray
    meta: dict

    @classmethod
    def open(cls, path: Path) -> FeatureStore:
        return cls(path, st.open_array(path, "feats"), st.open_array(path, "boxes"), st.read_json(path / st.META))

    @property
    def image_ids(self) -> list:
        return self.meta["image_ids"]


@dataclass
class QuestionPart:
    """One split's question arrays (see the module table) and the feature store they index."""

    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict
    features: FeatureStore

    @classmethod
    def open(cls, path: Path, features: FeatureStore) -> QuestionPart:
        arrays = {k: st.open_array(path, k) for k in QUESTION_ARRAYS}
        return cls(path, arrays, st.read_json(path / st.META), features)

    def __len__(self) -> int:
        return len(self.arrays["question_id"])

    def texts(self) -> list[str]:
        return st.read_json(self.path / "texts.json")

    def raw_labels(self) -> list[dict[str, float]]:
        """Each question's labels as written in its source, out-of-vocabulary answers included."""
        return st.read_json(self.path / "labels.json")

    def source_ids(self) -> list[str]:
        """Each question's id as its source file writes it (``str(question_id)`` when the split
        keeps no other)."""
        path = self.path / "source_ids.json"
        if path.is_file():
            return st.read_json(path)
        return [str(int(q)) for q in self.arrays["question_id"]]


def epoch_positions(n: int, epoch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The ``epoch_size`` positions of ``epoch`` when epochs walk through a stream of seeded
    permutations of ``0..n-1`` (permutation k drawn from ``(seed, k)``), ``epoch_size`` at a time.

    Consecutive epochs take consecutive slices, so they see different questions until the stream
    has used all ``n``; an epoch that straddles two permutations takes the end of one and the start
    of the next.
    """
    start, stop = epoch * epoch_size, (epoch + 1) * epoch_size
    chunks, pos = [], start
    while pos < stop:
        cycle, offset = divmod(pos, n)
        take = min(n - offset, stop - pos)
        chunks.append(np.random.default_rng([seed, cycle, 0x5EED]).permutation(n)[offset : offset + take])
        pos += take
    return np.concatenate(chunks)


def shard_order(n: int, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                drop_last: bool = False, epoch_size: int = 0) -> np.ndarray:  # fmt: skip
    """Positions ``0..n-1`` one rank visits in one epoch (`ArrayDataset.shard_order` explains the rule)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if epoch_size and shuffle:
        order = epoch_positions(n, epoch_size, seed, epoch)
        n = len(order)
    else:
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if world_size > 1:
        if drop_last:
            order = order[: n - n % world_size]
        elif n % world_size:
            order = np.concatenate([order, order[: world_size - n % world_size]])
        order = order[rank::world_size]
    return order


def num_batches(n: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Batches per epoch per rank over ``n`` samples, as `shard_order` shards them."""
    if world_size > 1:
        n = n // world_size if drop_last else -(-n // world_size)
    return n // batch_size if drop_last else -(-n // batch_size)


@dataclass
class ArrayDataset:
    """Questions with their images' region features; yields ready batches of torch tensors.

    Build with `ArrayDataset.from_parts`. ``len()`` is the number of questions. ``human_answers``
    (set by the task's ``load`` on evaluation datasets whose questions have them) holds the human
    answer strings the official VQA accuracy scores against; ``None`` = only soft labels exist.
    """

    answers: list[str]
    arrays: dict[str, np.ndarray]
    store_id: np.ndarray | None  # (N,) int8, which feature store; None with a single store
    stores: list[FeatureStore]
    answer_type_names: list[str]
    question_type_names: list[str]
    parts: list[QuestionPart] = field(repr=False, default_factory=list)
    _offsets: np.ndarray = field(repr=False, default=None)
    _qid_order: np.ndarray | None = field(repr=False, default=None)
    _texts: list[str] | None = field(repr=False, default=None)
    _raw: list[dict] | None = field(repr=False, default=None)
    _source_ids: list[str] | None = field(repr=False, default=None)
    human_answers: HumanAnswers | None = field(repr=False, default=None)
    #: Questions per shuffled epoch (0 = all); see `epoch_positions`. Set by ``tasks.load``.
    epoch_size: int = field(repr=False, default=0)

    @classmethod
    def from_parts(cls, parts: list[QuestionPart], answers: list[str], limit: int = 0) -> ArrayDataset:
        """Concatenate split parts (in order), keeping only the first ``limit`` questions if > 0.

        A single part stays memory-mapped (no copy); several parts are concatenated in memory
        (question arrays only, a few bytes per question; features stay in their stores).

        Raises:
            ValueError: parts with different region / feature / token shapes, or duplicate ids.
        """
        if not parts:
            raise ValueError("ArrayDataset needs at least one split")
        if limit:
            kept, left = [], limit
            for p in parts:
                if left <= 0:
                    break
                kept.append((p, min(left, len(p))))
                left -= len(p)
        else:
            kept = [(p, len(p)) for p in parts]
        first = parts[0]
        for p, _ in kept:
            for what, a, b in (
                ("regions x features", p.features.feats.shape[1:], first.features.feats.shape[1:]),
                ("tokens", p.arrays["input_ids"].shape[1:], first.arrays["input_ids"].shape[1:]),
                ("images per question", p.arrays["image_index"].shape[1:], first.arrays["image_index"].shape[1:]),
            ):
                if a != b:
                    raise ValueError(f"cannot concatenate {p.path} with {first.path}: {what} {a} != {b}")
        stores: list[FeatureStore] = []
        for p, _ in kept:
            if all(s.path != p.features.path for s in stores):
                stores.append(p.features)
        at_names = _union([p.meta["answer_type_names"] for p, _ in kept])
        qt_names = _union([p.meta["question_type_names"] for p, _ in kept])
        if len(kept) == 1:
            p, n = kept[0]
            arrays = {k: v[:n] for k, v in p.arrays.items()}
            store_id = None
        else:
            k_max = max(p.arrays["label_idx"].shape[1] for p, _ in kept)
            arrays = {}
            for k in QUESTION_ARRAYS:
                chunks = []
                for p, n in kept:
                    a = np.asarray(p.arrays[k][:n])
                    if k in ("label_idx", "label_score") and a.shape[1] < k_max:
                        pad = np.full((n, k_max - a.shape[1]), -1 if k == "label_idx" else 0, a.dtype)
                        a = np.concatenate([a, pad], axis=1)
                    if k == "answer_type":
                        a = _remap(a, p.meta["answer_type_names"], at_names)
                    if k == "question_type":
                        a = _remap(a, p.meta["question_type_names"], qt_names)
                    chunks.append(a)
                arrays[k] = np.concatenate(chunks)
            store_of = {id(s): i for i, s in enumerate(stores)}
            sid = [np.full(n, store_of[id(_same(stores, p.features))], np.int8) for p, n in kept]
            store_id = np.concatenate(sid)
        offsets = np.cumsum([0] + [n for _, n in kept])
        ds = cls(answers, arrays, store_id, stores, at_names, qt_names, [p for p, _ in kept], offsets)
        ds._check_unique_ids()
        return ds

    # ----------------------------------------------------------------- shape information
    def __len__(self) -> int:
        return len(self.arrays["question_id"])

    @property
    def num_regions(self) -> int:
        return self.stores[0].feats.shape[1]

    @property
    def visual_feat_dim(self) -> int:
        return self.stores[0].feats.shape[2]

    @property
    def max_seq_len(self) -> int:
        return self.arrays["input_ids"].shape[1]

    @property
    def question_ids(self) -> np.ndarray:
        """(N,) int64 question ids, in dataset order."""
        return np.asarray(self.arrays["question_id"])

    # ----------------------------------------------------------------- iteration
    def shard_order(
        self, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False
    ) -> np.ndarray:
        """The question positions one rank visits in one epoch.

        The order is a permutation drawn from ``(seed, epoch)`` (identical on every rank), or
        ``0..N-1`` without shuffling. Rank ``r`` takes every ``world_size``-th position starting at
        ``r``, so ranks are disjoint and equal-sized: with ``drop_last`` the last ``N % world_size``
        positions of the order are dropped; without it the order is padded by repeating its first
        ``(-N) % world_size`` positions (as ``torch.utils.data.DistributedSampler`` does), so up to
        ``world_size - 1`` questions appear twice; deduplicate by ``question_id`` for exact metrics.

        Returns:
            (N_rank,) int64 positions.
        """
        return shard_order(len(self), shuffle, seed, epoch, rank, world_size, drop_last, self.epoch_size)

    @property
    def epoch_length(self) -> int:
        """Questions in one shuffled (training) epoch: ``epoch_size`` when set, else all."""
        return self.epoch_size or len(self)

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches per epoch per rank, as `batches` yields them (shuffled: `epoch_length` questions)."""
        return num_batches(self.epoch_length, batch_size, world_size, drop_last)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches (the dict documented in docs/interfaces.md) for one epoch on one rank.

        Args:
            batch_size: questions per batch.
            shuffle: draw a fresh order from ``(seed, epoch)``; otherwise dataset order.
            seed: base seed of the order (same on every rank).
            epoch: epoch number; a different epoch gives a different order.
            rank: this process's rank in data-parallel training.
            world_size: number of ranks; each gets a disjoint, equal-size shard (see `shard_order`).
            drop_last: drop the last, short batch (and the shard remainder with several ranks).

        Yields:
            ``input_ids`` (B, T) int64, ``attention_mask`` (B, T) int64, ``token_type_ids`` (B, T)
            int64, ``visual_feats`` (B, R, F) float32, ``visual_pos`` (B, R, 4) float32 (with K
            images per question: (B, K, R, F) and (B, K, R, 4)), ``targets`` (B, A) float32,
            ``question_id`` (B,) int64.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        order = self.shard_order(shuffle, seed, epoch, rank, world_size, drop_last)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            yield self.get_batch(order[start : start + batch_size])

    def get_batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """Assemble the batch of the questions at ``positions`` (B,) with vectorised gathers.

        With several feature stores the batch is reordered so each store's rows are contiguous
        (one ``np.take`` per store straight into the output); ``question_id`` says who is where.
        """
        idx = np.asarray(positions, dtype=np.int64)
        if self.store_id is not None:
            idx = idx[np.argsort(self.store_id[idx], kind="stable")]
        b = len(idx)
        a = self.arrays
        img = a["image_index"][idx]
        r, f = self.stores[0].feats.shape[1:]
        k = img.shape[1:]  # () with one image per question, (K,) with K
        feats = np.empty((b, *k, r, f), np.float32)
        boxes = np.empty((b, *k, r, 4), np.float32)
        if self.store_id is None:
            spans = [(0, b, self.stores[0])]
        else:
            sid = self.store_id[idx]
            cuts = np.flatnonzero(np.diff(sid)) + 1
            starts, ends = np.r_[0, cuts], np.r_[cuts, b]
            spans = [(s, e, self.stores[sid[s]]) for s, e in zip(starts, ends)]
        for s, e, fs in spans:
            # mode="clip" skips numpy's buffered bounds check (a second copy); indices are valid.
            np.take(fs.feats, img[s:e], axis=0, out=feats[s:e], mode="clip")
            np.take(fs.boxes, img[s:e], axis=0, out=boxes[s:e], mode="clip")
        ids = a["input_ids"][idx].astype(np.int64)
        t = ids.shape[1]
        mask = (np.arange(t) < a["lengths"][idx][:, None]).astype(np.int64)
        targets = np.zeros((b, len(self.answers)), np.float32)
        li, ls = a["label_idx"][idx], a["label_score"][idx]
        rows, cols = np.nonzero(li >= 0)
        targets[rows, li[rows, cols]] = ls[rows, cols]
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "token_type_ids": torch.zeros((b, t), dtype=torch.int64),
            "visual_feats": torch.from_numpy(feats),
            "visual_pos": torch.from_numpy(boxes),
            "targets": torch.from_numpy(targets),
            "question_id": torch.from_numpy(a["question_id"][idx].astype(np.int64)),
        }

    # ----------------------------------------------------------------- per-question lookups
    def positions(self, question_ids: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
        """Dataset positions of ``question_ids`` (K,) -> (K,) int64.

        Raises:
            KeyError: naming the first id that is not in this dataset.
        """
        q = np.asarray(question_ids, dtype=np.int64).reshape(-1)
        all_ids = self.question_ids
        if self._qid_order is None:
            self._qid_order = np.argsort(all_ids, kind="stable")
        sorted_ids = all_ids[self._qid_order]
        at = np.searchsorted(sorted_ids, q).clip(max=len(sorted_ids) - 1)
        bad = sorted_ids[at] != q if len(sorted_ids) else np.ones(len(q), bool)
        if bad.any():
            raise KeyError(f"question_id {int(q[np.argmax(bad)])} is not in this dataset")
        return self._qid_order[at]

    def answer_type_of(self, question_ids) -> list[str]:
        """Answer type (``yes/no``, ``number``, ``other``) of each question id."""
        codes = self.arrays["answer_type"][self.positions(question_ids)]
        return [self.answer_type_names[c] for c in codes]

    def question_type_of(self, question_ids) -> list[str]:
        """Question type (VQA: e.g. ``what color is the``; easy-VQA: ``what shape``, ...) per id."""
        codes = self.arrays["question_type"][self.positions(question_ids)]
        return [self.question_type_names[c] for c in codes]

    def question_texts(self) -> list[str]:
        """Every question as written in its source file, in dataset order."""
        if self._texts is None:
            self._texts = [t for p in self.parts for t in p.texts()[: self._part_len(p)]]
        return self._texts

    def question_text(self, question_id: int) -> str:
        """The question as written in its source file."""
        return self.question_texts()[int(self.positions([question_id])[0])]

    def labels(self, question_id: int) -> dict[str, float]:
        """In-vocabulary soft labels ``{answer: score}`` of one question (what ``targets`` holds)."""
        pos = int(self.positions([question_id])[0])
        li, ls = self.arrays["label_idx"][pos], self.arrays["label_score"][pos]
        return {self.answers[i]: round(float(s), 6) for i, s in zip(li, ls) if i >= 0}  # float32 -> 0.3, not 0.30000001

    def raw_labels(self, question_id: int) -> dict[str, float]:
        """Soft labels as written in the source, including answers outside the vocabulary."""
        if self._raw is None:
            self._raw = [r for p in self.parts for r in p.raw_labels()[: self._part_len(p)]]
        return self._raw[int(self.positions([question_id])[0])]

    def source_id_of(self, question_ids) -> list[str]:
        """Each question's id as its source file writes it: GQA's question id string (e.g.
        ``"07333408"``), NLVR2's identifier (``"dev-850-0-0"``); ``str(question_id)`` for VQA."""
        if self._source_ids is None:
            self._source_ids = [i for p in self.parts for i in p.source_ids()[: self._part_len(p)]]
        return [self._source_ids[int(i)] for i in self.positions(question_ids)]

    def _part_len(self, part: QuestionPart) -> int:
        i = next(k for k, p in enumerate(self.parts) if p is part)
        return int(self._offsets[i + 1] - self._offsets[i])

    def _check_unique_ids(self) -> None:
        q = self.question_ids
        s = np.sort(q)
        dup = s[1:][s[1:] == s[:-1]]
        if len(dup):
            raise ValueError(f"question_id {int(dup[0])} occurs more than once in {[str(p.path) for p in self.parts]}")


def _union(name_lists: list[list[str]]) -> list[str]:
    out: list[str] = []
    for names in name_lists:
        out += [n for n in names if n not in out]
    return out


def _remap(codes: np.ndarray, names: list[str], into: list[str]) -> np.ndarray:
    table = np.array([into.index(n) for n in names] or [0], dtype=codes.dtype)
    return table[codes]


def _same(stores: list[FeatureStore], fs: FeatureStore) -> FeatureStore:
    return next(s for s in stores if s.path == fs.path)


@dataclass
class TaskData:
    """What `tasks.load` returns: both datasets and the shapes a model is built from.

    Attributes:
        train: training questions (``train_splits`` concatenated, ``train_limit`` applied).
        eval: evaluation questions (``eval_split``, ``eval_limit`` applied).
        answers: the answer vocabulary; ``targets[:, i]`` scores ``answers[i]``.
        summary: counts for logging: questions and images per dataset, out-of-vocabulary answers
            dropped from targets, truncated questions, and the resolved config.
    """

    train: ArrayDataset
    eval: ArrayDataset
    answers: list[str]
    summary: dict = field(default_factory=dict)

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    @property
    def visual_feat_dim(self) -> int:
        return self.train.visual_feat_dim

    @property
    def num_regions(self) -> int:
        return self.train.num_regions

    @property
    def max_seq_len(self) -> int:
        return self.train.max_seq_len


def summarize(train: ArrayDataset, ev: ArrayDataset) -> dict:
    """Counts for logging (flat keys): questions, images, dropped answers, truncated questions."""
    out: dict[str, object] = {}
    for name, ds in (("train", train), ("eval", ev)):
        a = ds.arrays
        out[f"{name}.questions"] = len(ds)
        images = np.asarray(a["image_index"]).astype(np.int64)
        if ds.store_id is not None:  # an image is a (store, row) pair
            images = images * 256 + (ds.store_id if images.ndim == 1 else ds.store_id[:, None])
        out[f"{name}.images"] = int(len(np.unique(images)))
        out[f"{name}.oov_labels_dropped"] = int(np.asarray(a["n_oov"]).sum())
        out[f"{name}.questions_with_oov"] = int((np.asarray(a["n_oov"]) > 0).sum())
        out[f"{name}.truncated"] = int((np.asarray(a["lengths"]) > ds.max_seq_len).sum())
        out[f"{name}.longest"] = int(np.asarray(a["lengths"]).max()) if len(ds) else 0
    out["num_answers"] = len(train.answers)
    out["num_regions"] = train.num_regions
    out["visual_feat_dim"] = train.visual_feat_dim
    out["max_seq_len"] = train.max_seq_len
    return out
