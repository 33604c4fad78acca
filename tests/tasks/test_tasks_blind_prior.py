"""The VQA adapter's blind prior (answers from the question text alone) and the types a model
answers no better than it, checked against a plain-Python recomputation on real easy-VQA data."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from sweeps.config import ExperimentConfig, apply_overrides
from sweeps.loop import prepared_config
from tasks.vqa.adapter import VQAAdapter


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    cfg = apply_overrides(ExperimentConfig(), {"data.cache_dir": str(tmp_path_factory.mktemp("cache")),
                                               "data.train_limit": "3000", "data.eval_limit": "1500"}, source="test")
    return VQAAdapter(prepared_config(cfg))


def test_the_blind_prior_is_the_most_frequent_answer_of_the_same_question_text(adapter):
    train, ev = adapter.data.train, adapter.data.eval
    by_text: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for q, qt in zip(train.question_ids, train.question_type_of(train.question_ids)):
        for answer, score in train.labels(int(q)).items():
            by_text[train.question_text(int(q)).lower().strip()][answer] += score
            by_type[qt][answer] += score
    expected = []
    for q, qt in zip(ev.question_ids, ev.question_type_of(ev.question_ids)):
        counts = by_text.get(ev.question_text(int(q)).lower().strip()) or by_type[qt]
        top = max(counts.values())
        answer = min((a for a, c in counts.items() if c == top), key=adapter.data.answers.index)
        expected.append(ev.human_answers.scores([q], [answer])[0])
    scores, per_type, counts, overall = adapter.prior()
    np.testing.assert_allclose(scores, expected)
    assert overall == pytest.approx(np.mean(expected))
    assert sum(counts.values()) == len(ev) and set(per_type) == set(ev.question_type_of(ev.question_ids))


def test_a_model_answering_like_the_prior_is_at_it_and_a_perfect_one_is_not(adapter):
    ev = adapter.data.eval
    answers = adapter.data.answers
    gold = np.array([answers.index(max(ev.labels(int(q)).items(), key=lambda kv: kv[1])[0])
                     for q in ev.question_ids])
    perfect = {"question_id": ev.question_ids, "pred": gold, "score": np.ones(len(gold)), "loss_sum": 0.0,
               "n": len(gold)}
    at, _ = adapter.at_prior(perfect)
    assert at == []
    assert adapter.eval_metrics(perfect)["at_prior_share"] == 0.0
    # Answer every question of the presence types ("has ...") from the prior, the rest right.
    prior_scores, per_type, counts, _ = adapter.prior()
    qtypes = np.array(ev.question_type_of(ev.question_ids))
    blind = {**perfect, "acc": np.where(np.char.startswith(qtypes, "has"), prior_scores, 1.0)}
    at, _ = adapter.at_prior(blind)
    eligible = {t for t, p in per_type.items() if t.startswith("has") and p < 0.99 and counts[t] >= 20}
    assert eligible and {t for t, *_ in at} == eligible
    share = adapter.eval_metrics(blind)["at_prior_share"]
    assert share == pytest.approx(sum(counts[t] for t in eligible) / len(gold))
