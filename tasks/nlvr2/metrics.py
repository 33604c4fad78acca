"""NLVR2 accuracy, consistency and the results file.

**Accuracy**: the share of examples whose predicted class equals the label (LXMERT's
``NLVR2Evaluator``; 74.95 on ``valid`` there), in percent over the labelled examples.

**Consistency** (NLVR2's official ``nlvr2/eval/metrics.py``, github.com/lil-lab/nlvr): the share of
*sentences* all of whose examples are right. An identifier is ``split-set_id-pair_id-sentence_id``
(``dev-850-0-0``); one sentence, written for one eight-image set, is paired with several image
pairs of that set, so the official script groups examples by the identifier with its
``pair_id`` blanked (``dev-850-0-0`` and ``dev-850-2-0`` -> ``dev-850--0``; ``dev-850-0-1`` is
another sentence of the same set). It is computed only when every identifier has those four
parts; otherwise it is left out (``None``).

**Results file** (as LXMERT's ``dump_result`` writes it, the input of the official script): one
line per example, ``identifier,True`` or ``identifier,False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.lxmert_task import labelled_mask
from tasks.metrics import as_ids, check_unique, label_scores, predicted_indices
from tasks.nlvr2.data import ANSWERS


def sentence_key(identifier: str) -> str | None:
    """The official consistency group of an identifier: ``dev-850-0-0`` -> ``dev-850--0``
    (the pair id blanked); ``None`` when it is not ``split-set_id-pair_id-sentence_id``."""
    parts = identifier.split("-")
    if len(parts) != 4 or not all(parts):
        return None
    parts[2] = ""
    return "-".join(parts)


@dataclass
class NLVR2Report:
    """Accuracy and consistency in percent (0-100).

    Attributes:
        accuracy: share of labelled examples predicted right.
        consistency: share of sentences whose every labelled example is right; ``None`` when the
            identifiers do not name their sentence.
        n: labelled examples scored.
        sentences: sentences (consistency groups) scored; 0 without consistency.
    """

    accuracy: float
    consistency: float | None
    n: int
    sentences: int = 0

    def to_flat(self, prefix: str = "") -> dict[str, float]:
        """``{prefix + "acc": ..., prefix + "consistency": ...}`` (consistency only when computed)."""
        out = {f"{prefix}acc": self.accuracy}
        if self.consistency is not None:
            out[f"{prefix}consistency"] = self.consistency
        return out

    def __str__(self) -> str:
        cons = "n/a" if self.consistency is None else f"{self.consistency:.2f}"
        return f"accuracy {self.accuracy:.2f}, consistency {cons} over {self.n} examples / {self.sentences} sentences"


def score(identifiers: Sequence[str], correct: Sequence[bool] | np.ndarray) -> NLVR2Report:
    """Accuracy and consistency of per-example outcomes.

    Args:
        identifiers: N NLVR2 identifiers.
        correct: N booleans, whether each example was predicted right.
    """
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    if len(ok) != len(identifiers):
        raise ValueError(f"{len(identifiers)} identifiers for {len(ok)} outcomes")
    n = len(ok)
    acc = 100.0 * float(ok.mean()) if n else 0.0
    keys = [sentence_key(i) for i in identifiers]
    if not n or any(k is None for k in keys):
        return NLVR2Report(acc, None, n)
    groups: dict[str, bool] = {}
    for k, right in zip(keys, ok):
        groups[k] = groups.get(k, True) and bool(right)
    return NLVR2Report(acc, 100.0 * sum(groups.values()) / len(groups), n, len(groups))


def evaluate(dataset, question_ids, predictions) -> NLVR2Report:
    """Accuracy and consistency of predictions on an NLVR2 `tasks.dataset.ArrayDataset`.

    Args:
        dataset: the evaluation dataset the question ids come from.
        question_ids: (N,) integer ids (``batch["question_id"]`` concatenated), unique.
        predictions: (N, 2) logits or (N,) class indices (1 = True), in the same order.
    """
    q = as_ids(question_ids)
    check_unique(q)
    right = label_scores(dataset, q, predictions) > 0.5
    keep = labelled_mask(dataset, dataset.positions(q))
    return score([s for s, k in zip(dataset.source_id_of(q), keep) if k], right[keep])


def results_lines(dataset, question_ids, predictions) -> list[str]:
    """``identifier,True|False`` per example, in the given order (LXMERT's ``dump_result``)."""
    q, idx = as_ids(question_ids), predicted_indices(predictions)
    if len(idx) != len(q):
        raise ValueError(f"{len(q)} question ids for {len(idx)} predictions")
    check_unique(q)
    return [f"{ident},{ANSWERS[int(c)]}" for ident, c in zip(dataset.source_id_of(q), idx)]


def write_results(path: str | Path, dataset, question_ids, predictions) -> Path:
    """Write `results_lines` as the CSV the official ``metrics.py`` reads (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in results_lines(dataset, question_ids, predictions)))
    tmp.replace(path)
    return path
