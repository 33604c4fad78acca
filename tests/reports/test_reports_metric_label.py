"""The report names what its accuracy columns measure, from the trials' ``eval.metric`` tag."""

from __future__ import annotations

import pytest

from reports import render
from reports.store import connect, load_sweep
from reports.tables import compute


@pytest.fixture(scope="module")
def sweep(synthetic_sweep):
    uri, sweep_id, experiment = synthetic_sweep
    return load_sweep(connect(uri), uri, sweep_id, experiment)


def markdown(sweep, tags: dict[str, str | None]) -> tuple[dict, str]:
    """The report's tables and Markdown with each usable trial's ``eval.metric`` set as given
    (``None`` removes the tag; trials not named keep none)."""
    for t in sweep.trials:
        t.tags.pop("eval.metric", None)
        value = tags.get(t.key, tags.get("*"))
        if value is not None:
            t.tags["eval.metric"] = value
    tables = compute(sweep)
    return tables, render.to_markdown(render.document(tables, {"files": [], "missing": {}}))


def test_soft_score_runs_are_labelled_soft_score(sweep):
    tables, md = markdown(sweep, {"*": "soft_score"})
    assert tables["metric"] == "soft_score"
    assert "Table 1: soft score on the evaluation split" in md
    assert "Soft score (best epoch) mean ± std" in md and "yes/no soft score" in md
    # the only mention of the VQA accuracy is the definition saying that this is not it
    assert "VQA acc." not in md and md.count("VQA accuracy") == md.count("not the official VQA accuracy") == 1
    assert tables["definitions"]["accuracy"].startswith("Soft score, not the official VQA accuracy")


def test_runs_without_the_tag_reported_the_soft_score(sweep):
    tables, md = markdown(sweep, {})
    assert tables["metric"] == "soft_score" and "Soft score (best epoch) mean ± std" in md


def test_official_runs_are_labelled_vqa_accuracy(sweep):
    tables, md = markdown(sweep, {"*": "vqa_official"})
    assert tables["metric"] == "vqa_official"
    assert "Table 1: VQA accuracy on the evaluation split" in md
    assert "VQA acc. (best epoch) mean ± std" in md and "yes/no acc." in md
    assert "Soft score" not in md and "soft score" not in md
    assert tables["definitions"]["accuracy"].startswith("VQA accuracy: the official VQA metric")


def test_mixed_metrics_are_said_to_be_mixed(sweep):
    first = next(t.key for t in sweep.trials if t.usable)
    tables, md = markdown(sweep, {"*": "vqa_official", first: "soft_score"})
    assert tables["metric"] == "mixed"
    assert "mixed" in md and "not comparable" in tables["definitions"]["accuracy"]
