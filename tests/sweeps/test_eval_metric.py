"""What a trial reports as ``eval/acc``: the official VQA accuracy when the evaluation questions
carry their human answers, else LXMERT's soft score, and the ``eval.metric`` tag that says which.

Tiny real trials (one epoch, in-process) log into a real MLflow SQLite store through
`sweeps.tracking.TrialTracker`; the expected numbers are recomputed here from the predictions the
trial logged and from the human answers as this test wrote them (or as the easy-VQA package holds
them), not through the evaluation code path.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

import tasks
from sweeps.config import parse_cli_overrides
from sweeps.grid import expand, load_grid, load_preset
from sweeps.loop import TrialLoop, prepared_config
from sweeps.tracking import SweepTracker, TrialTracker
from tasks import easyvqa
from tasks.metrics import official_accuracy
from tasks.vqa import synthetic

pytestmark = pytest.mark.slow  # easy-VQA features are prepared once (~20 s) and MLflow's schema created


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """``(client, context)`` of a fresh MLflow SQLite store with a parent run."""
    runs = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    sweeper = SweepTracker(uri, "eval-metric", "eval-metric", runs)
    parent = sweeper.start({}, {})
    context = {"tracking_uri": uri, "experiment_id": sweeper.experiment_id, "parent_run_id": parent,
               "sweep_id": "eval-metric", "tags": {}}
    return sweeper.client, context


def config(*overrides: str):
    over = parse_cli_overrides(["train.epochs=1", "train.batch_size=16", *overrides])
    cfg = expand(load_grid("paper"), load_preset("smoke"), cli_overrides=over, cells=["softmax"]).trials[0].config
    return prepared_config(cfg)


def logged_trial(store, cfg, key: str) -> tuple[TrialLoop, dict[str, float], dict[str, str], list[dict]]:
    """Fit ``cfg`` for its epochs with a real tracker; return (loop, metrics, tags, predictions.csv rows)."""
    import torch

    torch.set_num_threads(1)
    client, context = store
    loop = TrialLoop(cfg, log=lambda _m: None)
    tracker = TrialTracker(context, key)
    tracker.start({}, {})
    loop.fit(lambda metrics, state: None, tracker)
    run = client.get_run(tracker.run_id)
    text = Path(client.download_artifacts(tracker.run_id, "eval/predictions.csv")).read_text()
    return loop, run.data.metrics, run.data.tags, list(csv.DictReader(io.StringIO(text)))


def test_easyvqa_reports_the_official_accuracy(store, tmp_path):
    cfg = config(f"data.cache_dir={tmp_path}", "data.train_limit=256", "data.eval_limit=128")
    loop, metrics, tags, rows = logged_trial(store, cfg, "easyvqa")
    assert tags["eval.metric"] == "vqa_official"
    # The package's own answers, each counted as ten identical human answers.
    package = json.loads((easyvqa.package_data() / "test" / "questions.json").read_text())
    truth = {i: r[1] for i, r in enumerate(package)}
    assert len(rows) == 128
    official = [official_accuracy(r["answer"], [truth[int(r["question_id"])]] * 10) for r in rows]
    assert metrics["eval/acc"] == pytest.approx(np.mean(official), abs=1e-12)
    assert metrics["best/acc"] == metrics["eval/acc"]
    # By the unanimity rule that is the exact-match rate of the unnormalised prediction ...
    assert metrics["eval/acc"] == pytest.approx(np.mean([r["answer"] == truth[int(r["question_id"])] for r in rows]))
    # ... which on easy-VQA is also the soft score (its one label scores 1.0), logged separately.
    assert metrics["eval/soft_score"] == pytest.approx(np.mean([float(r["soft_score"]) for r in rows]), abs=1e-4)
    assert metrics["eval/soft_score"] == pytest.approx(metrics["eval/acc"])
    assert [float(r["score"]) for r in rows] == pytest.approx(official, abs=1e-4)
    for t in ("yes_no", "other"):
        assert f"eval/acc_{t}" in metrics and f"eval/soft_score_{t}" in metrics


@pytest.fixture(scope="module")
def vqa_root(tmp_path_factory):
    """A small LXMERT data folder (4 regions x 16 features) and its minival questions."""
    root = tmp_path_factory.mktemp("lxmert")
    truth = synthetic.write_dataset(root, images_per_file=8, questions_per_image=3, num_boxes=4, feat_dim=16)
    return root, truth


# How the "humans" of the annotation file spell each answer: when a question's answers differ, the
# official rules normalise all of them (and the prediction) back to the vocabulary's form.
SPELLING = {"yes": "Yes", "no": "No.", "2": "two", "red": "Red!", "dog": "a dog", "cat": "the cat",
            "tennis": "tennis", "blue": " blue\n"}  # fmt: skip


def human_answers(entry: dict, answers: list[str]) -> list[str]:
    """10 human answers whose official score differs from the soft label for every vocabulary answer:
    each vocabulary answer once (0.3; soft 0 or 1.0), the 0.3-labelled one twice (0.6), the rest
    out of the vocabulary."""
    weak = [a for a, s in entry["label"].items() if s < 1.0 and a in answers]
    humans = [SPELLING[a] for a in answers] + [SPELLING[a] for a in weak]
    return humans + ["giraffe"] * (10 - len(humans))


def vqa_config(root: Path, cache: Path, *extra: str):
    return config("data.name=vqa", f"data.root={root}", f"data.cache_dir={cache}", "data.train_limit=0",
                  "data.eval_limit=0", *extra)


def test_vqa_without_annotations_reports_the_soft_score(store, vqa_root, tmp_path):
    root, truth = vqa_root
    loop, metrics, tags, rows = logged_trial(store, vqa_config(root, tmp_path), "vqa-soft")
    assert loop.final.adapter.data.eval.human_answers is None
    assert tags["eval.metric"] == "soft_score"
    labels = {e["question_id"]: e["label"] for e in truth["questions"]["minival"]}
    soft = [labels[int(r["question_id"])].get(r["answer"], 0.0) for r in rows]
    assert len(rows) == len(labels) == 12
    assert metrics["eval/acc"] == metrics["eval/soft_score"] == pytest.approx(np.mean(soft), abs=1e-6)
    assert [float(r["score"]) for r in rows] == [float(r["soft_score"]) for r in rows]


def test_vqa_with_the_official_annotation_file_reports_the_official_accuracy(store, vqa_root, tmp_path):
    root, truth = vqa_root
    answers = truth["answers"]
    entries = truth["questions"]["minival"] + truth["questions"]["nominival"]
    humans = {e["question_id"]: human_answers(e, answers) for e in entries}
    path = root / "vqa" / "v2_mscoco_val2014_annotations.json"
    path.write_text(json.dumps({"annotations": [
        {"question_id": q, "image_id": 0, "question_type": "what color is the", "answer_type": "other",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(h)]}
        for q, h in humans.items()]}))  # fmt: skip
    try:
        loop, metrics, tags, rows = logged_trial(store, vqa_config(root, tmp_path), "vqa-official")
    finally:
        path.unlink()  # the module's other test reads the same folder without it
    assert tags["eval.metric"] == "vqa_official"
    official = [official_accuracy(r["answer"], humans[int(r["question_id"])]) for r in rows]
    labels = {e["question_id"]: e["label"] for e in entries}
    soft = [labels[int(r["question_id"])].get(r["answer"], 0.0) for r in rows]
    assert len(rows) == 12
    assert metrics["eval/acc"] == pytest.approx(np.mean(official), abs=1e-12)
    assert metrics["eval/soft_score"] == pytest.approx(np.mean(soft), abs=1e-6)
    assert metrics["eval/acc_other"] == metrics["eval/acc"] and "eval/soft_score_other" in metrics
    assert metrics["best/acc"] == metrics["eval/acc"]
    assert [float(r["score"]) for r in rows] == pytest.approx(official, abs=1e-4)
    assert [float(r["soft_score"]) for r in rows] == pytest.approx(soft, abs=1e-4)
    assert all(a != s for a, s in zip(official, soft))  # the file, not the soft labels, was scored


def test_annotation_settings(vqa_root, tmp_path):
    root, _ = vqa_root
    with pytest.raises(FileNotFoundError, match=r"missing .*nothere\.json \(DataConfig\.annotations\)"):
        tasks.prepare(tasks.DataConfig(name="vqa", root=str(root), cache_dir=str(tmp_path),
                                       annotations="nothere.json"))  # fmt: skip
    wrong = tmp_path / "train_annotations.json"  # a file that lacks the evaluation questions
    wrong.write_text(json.dumps({"annotations": [
        {"question_id": 1, "question_type": "is", "answer_type": "yes/no",
         "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1}]}]}))  # fmt: skip
    with pytest.raises(KeyError, match=r"question_id \d+ has no human answers in .*train_annotations\.json"):
        tasks.load(tasks.DataConfig(name="vqa", root=str(root), cache_dir=str(tmp_path), annotations=str(wrong)))
    with pytest.raises(tasks.ConfigError, match=r"annotations='x\.json' applies to name=vqa only"):
        tasks.DataConfig(name="easyvqa", annotations="x.json")
