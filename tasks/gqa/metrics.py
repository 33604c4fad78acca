"""GQA accuracy and the submission file.

**Accuracy** (LXMERT's ``GQAEvaluator``): each question scores the label score of the predicted
answer (LXMERT's GQA labels are ``{answer: 1.0}``, so this is exact match: 1 when the arg-max
answer is the answer, else 0), averaged over the labelled questions and reported in percent.
A question whose answer is outside the 1,842-answer vocabulary can never be predicted and scores 0
(it still counts). Unlabelled questions (``submit``) are left out. This is LXMERT's local
evaluation (59.80 on test-dev there); GQA's own evaluator on the test server is 0.1-0.5 points
higher according to LXMERT's README (it also scores consistency, validity, plausibility, which need
GQA's scene-graph files).

**Submission** (GQA's evaluation server, as LXMERT's ``dump_result`` writes it): a JSON list
``[{"questionId": "<id>", "prediction": "<answer>"}, ...]`` with the question id as the string of
the source file (leading zeros kept).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.lxmert_task import labelled_mask
from tasks.metrics import AccuracyReport, aggregate, as_ids, check_unique, label_scores, predicted_indices


def accuracy(dataset, question_ids, predictions) -> AccuracyReport:
    """LXMERT's GQA accuracy of predictions on a GQA `tasks.dataset.ArrayDataset`.

    Args:
        dataset: the evaluation dataset the question ids come from.
        question_ids: (N,) integer ids (``batch["question_id"]`` concatenated), unique (a repeated
            id raises: remove DDP padding first).
        predictions: (N, A) logits or (N,) answer indices, in the same order.

    Returns:
        `tasks.metrics.AccuracyReport` in percent over the labelled questions (``n`` of them).
    """
    q = as_ids(question_ids)
    check_unique(q)
    scores = label_scores(dataset, q, predictions)
    return aggregate(scores[labelled_mask(dataset, dataset.positions(q))])


def results(dataset, question_ids, predictions) -> list[dict[str, str]]:
    """Predictions in GQA's submission format ``[{"questionId": str, "prediction": str}]``.

    Args:
        dataset: the dataset the question ids come from (its answers and source ids).
        question_ids: (N,) integer ids.
        predictions: (N, A) logits or (N,) answer indices.

    Raises:
        ValueError: lengths differ, or a question is predicted twice (DDP padding not removed).
    """
    q, idx = as_ids(question_ids), predicted_indices(predictions)
    if len(idx) != len(q):
        raise ValueError(f"{len(q)} question ids for {len(idx)} predictions")
    check_unique(q)
    sources = dataset.source_id_of(q)
    return [{"questionId": s, "prediction": dataset.answers[int(i)]} for s, i in zip(sources, idx)]


def write_results(path: str | Path, dataset, question_ids, predictions) -> Path:
    """Write `results` as the JSON file GQA's server takes (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = results(dataset, question_ids, predictions)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows))
    tmp.replace(path)
    return path
