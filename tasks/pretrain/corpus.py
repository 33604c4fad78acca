"""`PretrainCorpus`: image-sentence pairs as memory-mapped arrays, and the masked batches the
pretraining objectives read.

On disk a corpus split is one *sentence part* pointing into one or more *image stores*
(``tasks.pretrain.synthetic`` and ``tasks.pretrain.lxmert`` write them; an image store has the
layout of a converted LXMERT feature TSV, ``tasks.vqa.convert``):

=======================  ===============  =======================================================
array                    shape / dtype    meaning
=======================  ===============  =======================================================
``input_ids``            (N, T) int32     WordPiece ids, ``[CLS] ... [SEP]``, padded with 0
``lengths``              (N,) int32       tokens before truncation
``image_index``          (N,) int32       row of the sentence's image in its image store
``store_id``             (N,) int8        which image store (``meta["stores"]``)
``label_idx``            (N, K) int32     image-QA answers of a question, -1 = none (captions)
``label_score``          (N, K) float32   their scores (one is drawn per step, in proportion)
``kind``                 (N,) int8        0 caption, 1 question
image store ``feats``    (M, R, F) f32    region features
image store ``boxes``    (M, R, 4) f32    (x1, y1, x2, y2) / (w, h, w, h)
``objects_id`` / ``attrs_id`` (M, R) int  detected object / attribute label per region
``objects_conf`` / ``attrs_conf`` (M, R)  the detector's confidence (LXMERT weighs the label losses by it)
``image_key``            (M,) int64       optional: images with equal keys are not used as each
                                          other's mismatched pairs (synthetic: the shape class)
=======================  ===============  =======================================================

A batch (:meth:`PretrainCorpus.batches`) is LXMERT's pretraining example, vectorised: a sentence
replaced by another image's with probability ``mismatch_prob`` (``match_labels`` 0; only among
the corpus' ``match_kinds`` of sentence when it names them, see :meth:`PretrainCorpus.match_pool`), 15% of the
tokens masked (80% ``[MASK]``, 10% a random word, 10% kept; ``mlm_labels`` holds the original id,
-1 elsewhere), 15% of the regions masked (80% zeroed, 10% another region's feature, 10% kept;
``region_mask``, with the original features in ``feat_targets``), and for a matched question one
of its answers drawn in proportion to its score (``qa_labels``, -1 for captions and mismatches).
All randomness comes from a generator seeded by ``(seed, epoch, rank, batch)``: a batch is the
same whenever it is rebuilt (resume, paired comparisons), and never touches the global RNG.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tasks import store as st
from tasks.dataset import num_batches, shard_order

SENTENCE_ARRAYS = ("input_ids", "lengths", "image_index", "store_id", "label_idx", "label_score", "kind")
IMAGE_ARRAYS = ("feats", "boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf")
#: Tries at drawing a mismatched sentence whose image key differs; the rare leftover stays matched.
MISMATCH_TRIES = 16


@dataclass
class ImageStore:
    """Region features and detected labels of M images, memory-mapped (see the module table)."""

    path: Path
    arrays: dict[str, np.ndarray]
    image_key: np.ndarray | None

    @classmethod
    def open(cls, path: Path, limit: int = 0) -> ImageStore:
        arrays = {k: st.open_array(path, k) for k in IMAGE_ARRAYS}
        if limit:
            arrays = {k: v[:limit] for k, v in arrays.items()}
        key = st.open_array(path, "image_key") if (path / "image_key.npy").is_file() else None
        return cls(path, arrays, key[:limit] if key is not None and limit else key)

    def __len__(self) -> int:
        return len(self.arrays["feats"])


@dataclass
class Masking:
    """What :meth:`PretrainCorpus.batches` corrupts (the objectives' recipes; LXMERT's defaults).

    Attributes:
        tasks: Objectives that read the batch: token masking only for ``mlm``, region masking only
            for ``mor``, mismatched sentences only for ``match``.
        mlm_prob: Token masking rate (80% [MASK], 10% random word, 10% kept).
        mor_prob: Region masking rate (80% zeroed, 10% another region's feature, 10% kept).
        mismatch_prob: Fraction of sentences replaced by one from another image.
    """

    tasks: tuple[str, ...] = ("mlm", "mor", "match", "qa")
    mlm_prob: float = 0.15
    mor_prob: float = 0.15
    mismatch_prob: float = 0.5


@dataclass
class PretrainCorpus:
    """One corpus split: sentences with their images; yields masked batches of torch tensors.

    Attributes:
        path: The sentence part's directory.
        arrays: The sentence arrays (module table), memory-mapped.
        stores: The image stores the sentences point into.
        meta: The corpus' ``meta.json`` (answers, label names, ``mask_id``, ``vocab_size`` ...).
    """

    path: Path
    arrays: dict[str, np.ndarray]
    stores: list[ImageStore]
    meta: dict
    _keys: np.ndarray | None = field(default=None, repr=False)
    _pool: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: Path, stores: list[ImageStore], meta: dict) -> PretrainCorpus:
        arrays = {k: st.open_array(path, k) for k in SENTENCE_ARRAYS}
        return cls(path, arrays, stores, meta)

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    @property
    def num_regions(self) -> int:
        return self.stores[0].arrays["feats"].shape[1]

    @property
    def visual_feat_dim(self) -> int:
        return self.stores[0].arrays["feats"].shape[2]

    @property
    def max_seq_len(self) -> int:
        return self.arrays["input_ids"].shape[1]

    def match_pool(self) -> np.ndarray | None:
        """Sorted rows that take part in image-sentence matching, or None for all of them.

        The synthetic corpus matches captions only (``meta["match_kinds"] = [0]``): its questions
        often name what is *not* in the image ("is there a circle?" on a square), so whether a
        question "matches" its image is undefined there. LXMERT's corpus matches every sentence.
        """
        kinds = self.meta.get("match_kinds")
        if kinds is None:
            return None
        if self._pool is None:
            self._pool = np.flatnonzero(np.isin(np.asarray(self.arrays["kind"]), kinds))
        return self._pool

    def image_keys(self) -> np.ndarray:
        """(N,) int64 key of each sentence's image (mismatched pairs need different keys)."""
        if self._keys is None:
            sid = np.asarray(self.arrays["store_id"], np.int64)
            row = np.asarray(self.arrays["image_index"], np.int64)
            keys = np.empty(len(self), np.int64)
            for s, fs in enumerate(self.stores):
                sel = sid == s
                # Without an explicit key every image is its own (LXMERT: any other image).
                keys[sel] = fs.image_key[row[sel]] if fs.image_key is not None else (s << 40) + row[sel]
            self._keys = keys
        return self._keys

    # ------------------------------------------------------------------------------ iteration
    def shard_order(self, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                    drop_last: bool = False) -> np.ndarray:  # fmt: skip
        """Positions this rank visits in one epoch (as ``tasks.dataset.ArrayDataset.shard_order``)."""
        return shard_order(len(self), shuffle, seed, epoch, rank, world_size, drop_last)

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        return num_batches(len(self), batch_size, world_size, drop_last)

    def batches(self, batch_size: int, masking: Masking, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
        """Yield one epoch of masked batches for one rank.

        Args:
            batch_size: Sentences per batch.
            masking: What to corrupt (:class:`Masking`).
            shuffle: A fresh order from ``(seed, epoch)``; otherwise corpus order.
            seed, epoch, rank: Seed the order and every batch's corruption.
            world_size: Ranks; each gets a disjoint shard.
            drop_last: Drop the short last batch.

        Yields:
            ``input_ids``, ``attention_mask``, ``token_type_ids`` (B, T) int64; ``visual_feats``
            (B, R, F) float32 (masked); ``visual_pos`` (B, R, 4); ``mlm_labels`` (B, T) int64;
            ``region_mask`` (B, R) bool; ``feat_targets`` (B, R, F); ``obj_labels``,
            ``attr_labels`` (B, R) int64; ``obj_conf``, ``attr_conf`` (B, R) float32;
            ``match_labels`` (B,) int64 (1 = matched, 0 = mismatched, -1 = not matched: see
            :meth:`match_pool`); ``qa_labels`` (B,) int64 (-1 = none);
            ``sentence_id`` (B,) int64 (the row of the sentence the image came with); ``text_id``
            (B,) int64 (the row whose words the batch shows: another one when mismatched);
            ``image_key`` (B,) int64 (the image's key, :meth:`image_keys`: rows with equal keys are
            not each other's contrastive negatives).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        order = self.shard_order(shuffle, seed, epoch, rank, world_size, drop_last)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for b, start in enumerate(range(0, stop, batch_size)):
            rng = np.random.default_rng([seed, epoch, rank, b])
            yield self.get_batch(order[start : start + batch_size], masking, rng)

    def get_batch(self, positions: np.ndarray, masking: Masking, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The masked batch of the sentences at ``positions`` (B,), corrupted with ``rng``."""
        idx = np.asarray(positions, np.int64)
        b = len(idx)
        a = self.arrays
        tasks = set(masking.tasks)

        # Image-sentence matching: the image stays, the sentence may come from another image.
        text_idx = idx.copy()
        matched = np.ones(b, np.int64)
        pool = self.match_pool()
        if pool is not None:  # only these kinds of sentence take part in matching (corpus meta)
            matched[~np.isin(idx, pool)] = -1
        if "match" in tasks and masking.mismatch_prob > 0 and len(self) > 1:
            swap = (rng.random(b) < masking.mismatch_prob) & (matched == 1)
            keys = self.image_keys()
            todo = np.flatnonzero(swap)
            candidates = pool if pool is not None else None
            for _ in range(MISMATCH_TRIES):
                if not len(todo) or (candidates is not None and not len(candidates)):
                    break
                cand = (rng.integers(0, len(self), len(todo)) if candidates is None
                        else candidates[rng.integers(0, len(candidates), len(todo))])  # fmt: skip
                ok = keys[cand] != keys[idx[todo]]
                text_idx[todo[ok]] = cand[ok]
                matched[todo[ok]] = 0
                todo = todo[~ok]

        ids = np.asarray(a["input_ids"][text_idx], np.int64)
        t = ids.shape[1]
        lengths = np.minimum(np.asarray(a["lengths"][text_idx], np.int64), t)
        pos = np.arange(t)
        attention = (pos < lengths[:, None]).astype(np.int64)

        # Masked LM over the words ([CLS] at 0 and [SEP] at length-1 are never masked).
        mlm_labels = np.full((b, t), -1, np.int64)
        if "mlm" in tasks and masking.mlm_prob > 0:
            words = (pos >= 1) & (pos < lengths[:, None] - 1)
            draw = rng.random((b, t))
            chosen = words & (draw < masking.mlm_prob)
            mlm_labels[chosen] = ids[chosen]
            frac = draw / max(masking.mlm_prob, 1e-12)  # uniform in [0, 1) on chosen positions
            to_mask = chosen & (frac < 0.8)
            to_random = chosen & (frac >= 0.8) & (frac < 0.9)
            ids[to_mask] = int(self.meta["mask_id"])
            lo = int(self.meta.get("random_word_min", 0))
            ids[to_random] = rng.integers(lo, int(self.meta["vocab_size"]), int(to_random.sum()))

        feats, boxes, obj, obj_conf, attr, attr_conf = self._gather_images(idx)
        targets = feats.copy()
        r = feats.shape[1]
        region_mask = np.zeros((b, r), bool)
        if "mor" in tasks and masking.mor_prob > 0:
            draw = rng.random((b, r))
            region_mask = draw < masking.mor_prob
            frac = draw / max(masking.mor_prob, 1e-12)
            feats[region_mask & (frac < 0.8)] = 0.0
            to_random = region_mask & (frac >= 0.8) & (frac < 0.9)
            n_rand = int(to_random.sum())
            if n_rand:
                # LXMERT swaps in a random region of a random image; any region of the batch is
                # a random region of the corpus, and needs no extra read.
                src = rng.integers(0, b * r, n_rand)
                feats[to_random] = targets.reshape(b * r, -1)[src]

        qa = np.full(b, -1, np.int64)
        li = np.asarray(a["label_idx"][idx])
        ls = np.asarray(a["label_score"][idx], np.float64)
        has = (matched != 0) & (li[:, 0] >= 0)
        if has.any():
            # One answer per question, drawn in proportion to its score (LXMERT's choice).
            w = np.where(li >= 0, np.maximum(ls, 0), 0)[has]
            cum = np.cumsum(w, axis=1)
            total = cum[:, -1:]
            u = rng.random((len(w), 1)) * np.where(total > 0, total, 1)
            pick = np.minimum((cum <= u).sum(1), w.shape[1] - 1)
            qa[has] = np.where(total[:, 0] > 0, li[has][np.arange(len(w)), pick], li[has][:, 0])
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(attention),
            "token_type_ids": torch.zeros((b, t), dtype=torch.int64),
            "visual_feats": torch.from_numpy(feats),
            "visual_pos": torch.from_numpy(boxes),
            "mlm_labels": torch.from_numpy(mlm_labels),
            "region_mask": torch.from_numpy(region_mask),
            "feat_targets": torch.from_numpy(targets),
            "obj_labels": torch.from_numpy(obj),
            "obj_conf": torch.from_numpy(obj_conf),
            "attr_labels": torch.from_numpy(attr),
            "attr_conf": torch.from_numpy(attr_conf),
            "match_labels": torch.from_numpy(matched),
            "qa_labels": torch.from_numpy(qa),
            "sentence_id": torch.from_numpy(idx),
            "text_id": torch.from_numpy(text_idx),
            "image_key": torch.from_numpy(self.image_keys()[idx]),
        }

    def _gather_images(self, idx: np.ndarray) -> tuple[np.ndarray, ...]:
        """Features, boxes and labels of the images of sentences ``idx``, gathered per store."""
        a = self.arrays
        b = len(idx)
        rows = np.asarray(a["image_index"][idx], np.int64)
        sid = np.asarray(a["store_id"][idx], np.int64)
        r, f = self.stores[0].arrays["feats"].shape[1:]
        feats = np.empty((b, r, f), np.float32)
        boxes = np.empty((b, r, 4), np.float32)
        labels = {k: np.empty((b, r), np.int64 if k.endswith("_id") else np.float32)
                  for k in ("objects_id", "objects_conf", "attrs_id", "attrs_conf")}  # fmt: skip
        for s, fs in enumerate(self.stores):
            sel = np.flatnonzero(sid == s)
            if not len(sel):
                continue
            feats[sel] = np.take(fs.arrays["feats"], rows[sel], axis=0)
            boxes[sel] = np.take(fs.arrays["boxes"], rows[sel], axis=0)
            for k, out in labels.items():
                out[sel] = np.take(fs.arrays[k], rows[sel], axis=0)
        return (feats, boxes, labels["objects_id"], labels["objects_conf"], labels["attrs_id"],
                labels["attrs_conf"])  # fmt: skip


@dataclass
class PretrainData:
    """What :func:`tasks.pretrain.load` returns.

    Attributes:
        train: The training split.
        eval: The held-out split (per-task evaluation losses), or None.
        meta: The corpus' ``meta.json``: ``answers`` (image-QA vocabulary), ``object_names``,
            ``attr_names``, ``mask_id``, ``vocab_size``, provenance.
    """

    train: PretrainCorpus
    eval: PretrainCorpus | None
    meta: dict

    @property
    def answers(self) -> list[str]:
        return list(self.meta["answers"])

    @property
    def num_object_labels(self) -> int:
        return int(self.meta["num_object_labels"])

    @property
    def num_attr_labels(self) -> int:
        return int(self.meta["num_attr_labels"])

    @property
    def visual_feat_dim(self) -> int:
        return self.train.visual_feat_dim

    @property
    def num_regions(self) -> int:
        return self.train.num_regions

    @property
    def max_seq_len(self) -> int:
        return self.train.max_seq_len
