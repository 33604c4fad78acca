"""Official VQA accuracy on hand-made cases; soft-score accuracy; per-type reports; results files.

Expected values are worked out by hand from the official definition (GT-Vision-Lab/VQA
``vqaEval.py``): the prediction is always normalised (whitespace, punctuation, number words,
articles, contractions); the 10 human answers get the punctuation step only, and only when they
are not all identical; accuracy = mean over the 10 leave-one-out subsets of min(1, matches / 3),
i.e. 1 matching human -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tasks import metrics as m


def test_leave_one_out_counts():
    for k, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        humans = ["cat"] * k + ["dog"] * (10 - k)
        assert m.official_accuracy("cat", humans) == pytest.approx(want), k


@pytest.mark.parametrize(
    "pred, humans, want",
    [
        # disagreeing annotators: 2 of 10 said "2" -> 0.6; 8 said "3" -> 1.0
        ("2", ["2"] * 2 + ["3"] * 8, 0.6),
        ("3", ["2"] * 2 + ["3"] * 8, 1.0),
        # number words -> digits (prediction side): "two" -> "2", "none" -> "0"
        ("two", ["2"] * 2 + ["3"] * 8, 0.6),
        ("Two", ["2"] * 10, 1.0),  # the prediction is normalised even when the humans agree
        ("none", ["0"] * 3 + ["no"] * 7, 0.9),
        # articles removed (and "one" is a number word): "the red one" -> "red 1"
        ("a dog", ["dog"] * 10, 1.0),
        ("the red one", ["red 1"] * 1 + ["red"] * 9, 0.3),
        # contractions fixed: "dont know" -> "don't know", "isnt" -> "isn't"
        ("dont know", ["don't know"] * 3 + ["no"] * 7, 0.9),
        ("isnt", ["isn't"] * 4 + ["is"] * 6, 1.0),
        # punctuation: "-" with no space beside it becomes a space ...
        ("hot-dog", ["hot dog"] * 4 + ["hot-dog"] * 3 + ["hotdog"] * 3, 1.0),  # humans: 7 x "hot dog"
        ("hotdog", ["hot dog"] * 4 + ["hot-dog"] * 3 + ["hotdog"] * 3, 0.9),
        # ... parentheses likewise, then whitespace is collapsed by the word step
        ("(tennis)", ["tennis"] * 2 + ["baseball"] * 8, 0.6),
        # a period not followed by a digit is removed; "3.5" keeps its point
        ("yes.", ["yes"] * 10, 1.0),
        ("3.5", ["3.5"] * 3 + ["3"] * 7, 0.9),
        # a digit-comma-digit group deletes punctuation outright: "1,000" -> "1000" on both sides
        ("1,000", ["1000"] * 2 + ["1,000"] * 1 + ["one thousand"] * 7, 0.9),
        # "?" beside a space is deleted rather than replaced
        ("yes ?", ["yes"] * 2 + ["no"] * 8, 0.6),
        # newlines and tabs become spaces, ends trimmed
        ("red\tcar\n", ["red car"] * 5 + ["car"] * 5, 1.0),
        # human answers are only punctuation-processed (no lower-casing) and only when they differ:
        ("yes", ["Yes"] * 10, 0.0),  # all agree: "Yes" stays, the prediction becomes "yes"
        ("yes", ["Yes"] * 5 + ["yes"] * 5, 1.0),  # differ: still "Yes" x 5, but "yes" x 5 match
        ("2", ["two"] * 6 + ["2"] * 4, 1.0),  # human "two" is not turned into "2"; 4 humans said "2"
        ("two", ["two"] * 6 + ["3"] * 4, 0.0),  # the prediction becomes "2", no human said "2"
    ],
)
def test_official_accuracy_hand_made(pred, humans, want):
    assert m.official_accuracy(pred, humans) == pytest.approx(want)


def test_normalisation_steps():
    assert m.process_punctuation("hot-dog") == "hot dog"
    assert m.process_punctuation("hot - dog") == "hot  dog"  # deleted: " -" occurs in the text
    assert m.process_punctuation("1,000 (approx)") == "1000 approx"  # digit,digit: delete all
    assert m.process_punctuation("e.g. 2.5.") == "eg 2.5"
    assert m.process_digit_article("The Three Dogs") == "3 dogs"
    assert m.process_digit_article("an apple") == "apple"
    assert m.process_digit_article("youre right") == "you're right"
    assert m.normalize_prediction("  A Cat!\n") == "cat"


def write_official_files(tmp_path):
    anns = {
        "annotations": [
            {"question_id": 1, "question_type": "is the", "answer_type": "yes/no",
             "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
            {"question_id": 2, "question_type": "how many", "answer_type": "number",
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                         for i, a in enumerate(["2"] * 2 + ["3"] * 8)]},
            {"question_id": 3, "question_type": "what color is the", "answer_type": "other",
             "answers": [{"answer": a, "answer_confidence": "maybe", "answer_id": i + 1}
                         for i, a in enumerate(["red"] * 1 + ["blue"] * 9)]},
            {"question_id": 4, "question_type": "how many", "answer_type": "number",
             "answers": [{"answer": "1", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
        ]
    }  # fmt: skip
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    path.write_text(json.dumps(anns))
    return path


def test_official_report_per_type(tmp_path):
    ann = write_official_files(tmp_path)
    preds = [
        {"question_id": 1, "answer": "yes"},  # 1.0
        {"question_id": 2, "answer": "two"},  # 0.6
        {"question_id": 3, "answer": "red"},  # 0.3
        {"question_id": 4, "answer": "one"},  # 1.0
    ]
    r = m.official_vqa_accuracy(preds, ann)
    assert r.n == 4
    assert r.overall == pytest.approx(100 * (1.0 + 0.6 + 0.3 + 1.0) / 4)
    assert r.per_answer_type == pytest.approx({"yes/no": 100.0, "number": 80.0, "other": 30.0})
    assert r.per_question_type == pytest.approx({"is the": 100.0, "how many": 80.0, "what color is the": 30.0})
    assert r.to_flat("val")["val/answer_type/number"] == pytest.approx(80.0)
    # results file round trip, and a subset of the annotated questions is fine
    path = m.write_results(tmp_path / "res.json", [1, 3], np.array([0, 2]), ["yes", "no", "red"])
    assert json.loads(path.read_text()) == [{"question_id": 1, "answer": "yes"}, {"question_id": 3, "answer": "red"}]
    assert m.official_vqa_accuracy(path, ann).overall == pytest.approx(65.0)
    with pytest.raises(KeyError, match="question_id 99"):
        m.official_vqa_accuracy({99: "yes"}, ann)
    with pytest.raises(FileNotFoundError, match=r"missing .*nothere\.json.*visualqa\.org"):
        m.load_official_annotations(tmp_path / "nothere.json")


def test_soft_score_accuracy_and_types():
    targets = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.6, 0.9], [0.0, 0.0, 0.0], [0.3, 0.0, 1.0]])
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(m.soft_scores(logits, targets), [1.0, 0.6, 0.0, 1.0])
    r = m.soft_score_accuracy(logits, targets, ["yes/no", "other", "other", "number"], ["a", "b", "b", "c"])
    assert r.overall == pytest.approx(65.0)
    assert r.per_answer_type == pytest.approx({"yes/no": 100.0, "other": 30.0, "number": 100.0})
    assert r.counts["question_type/b"] == 2
    assert m.soft_score_accuracy(np.array([0, 2, 1, 0]), targets).overall == pytest.approx(100 * 2.2 / 4)


def test_results_rejects_duplicates(tmp_path):
    with pytest.raises(ValueError, match="question_id 5 is predicted twice"):
        m.write_results(tmp_path / "r.json", [5, 5], [0, 1], ["a", "b"])
