"""The GQA and NLVR2 task adapters on the one training loop, from files in LXMERT's exact formats.

Each task trains one epoch of the real loop (``sweeps.loop.TrialLoop``) on the synthetic folder its
writer produces; its logged metrics are then recomputed from the source JSON files and the result
files the adapter writes, read here as a user would (plain ``json`` / ``csv``, not the data layer):
GQA's accuracy from ``eval/gqa_submission.json`` against ``gqa/testdev.json``; NLVR2's accuracy and
consistency (grouping by the identifier with its pair id blanked, as NLVR2's official script does)
from ``eval/nlvr2_results.csv`` against ``nlvr2/valid.json``. Also: NLVR2's pair encoding on the
adapter's own model, GQA's answer head started from a pretraining QA head through the loop's
import, and bad files refused before any work.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import one_thread

import schema
from sweeps.config import ExperimentConfig, apply_overrides
from sweeps.loop import TrialLoop, prepared_config
from tasks.base import get_task, task_for_data

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_thread)

TINY = {"model.hidden_size": "32", "model.num_heads": "2", "model.intermediate_size": "64", "model.l_layers": "1",
        "model.x_layers": "1", "model.r_layers": "1", "train.epochs": "1", "train.batch_size": "32",
        "train.eval_batch_size": "64"}  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One synthetic LXMERT data folder with both tasks (as docs/tasks.md writes it)."""
    from tasks.gqa import synthetic as gqa_syn
    from tasks.nlvr2 import synthetic as nlvr2_syn

    path = tmp_path_factory.mktemp("lxmert-synthetic")
    gqa_syn.write_dataset(path, train_images=40, valid_images=8, testdev_images=16, submit_images=4,
                          questions_per_image=3, feat_dim=32)  # fmt: skip
    nlvr2_syn.write_dataset(path, train_sets=12, valid_sets=6, test_sets=1, feat_dim=32)
    return path


def config(root, cache, name: str, **extra: str) -> ExperimentConfig:
    cfg = apply_overrides(ExperimentConfig(), {"data.name": name, "data.root": str(root), "data.cache_dir": str(cache),
                                               **TINY, **extra}, source="test")  # fmt: skip
    cfg = prepared_config(cfg)
    cfg.validate()
    return cfg


def fit(cfg: ExperimentConfig):
    loop = TrialLoop(cfg, log=lambda _m: None)
    out = loop.fit(lambda metrics, state: None)
    stage = loop.final
    result = stage.adapter.evaluate(stage.trainable, stage.context())  # the weights the last epoch scored
    return loop, out, result


def test_data_names_select_the_adapters():
    assert task_for_data("gqa") == "gqa" and task_for_data("nlvr2") == "nlvr2"
    assert get_task("gqa").primary_metric == get_task("nlvr2").primary_metric == "acc"


def test_gqa_trains_one_epoch_and_its_accuracy_and_submission_match_the_source_file(root, tmp_path):
    cfg = config(root, tmp_path / "cache", "gqa")
    loop, out, result = fit(cfg)
    adapter = loop.final.adapter
    assert out["epoch"] == 1.0 and np.isfinite(out["train/loss"])
    assert adapter.tags()[schema.EVAL_METRIC_TAG] == schema.EVAL_METRIC_GQA
    files = adapter.artifacts(result)
    submission = files[schema.GQA_SUBMISSION_ARTIFACT]
    source = json.loads((root / "gqa/testdev.json").read_text())
    # GQA's server format: every test-dev question once, its id as written (leading zeros kept)
    assert sorted(r["questionId"] for r in submission) == sorted(e["question_id"] for e in source)
    assert all(set(r) == {"questionId", "prediction"} and r["questionId"].startswith("0") for r in submission)
    predicted = {r["questionId"]: r["prediction"] for r in submission}
    expected = np.mean([e["label"].get(predicted[e["question_id"]], 0.0) for e in source])
    assert result.metrics["acc"] == pytest.approx(expected) == pytest.approx(out["eval/acc"])
    assert out["eval/n_labelled"] == out["eval/n"] == len(source)
    assert out["best/acc"] == out["eval/acc"]
    header = files[schema.PREDICTIONS_ARTIFACT].splitlines()[0]
    assert header.startswith("question_id,answer,score")


def test_gqa_submit_split_has_no_labels_and_scores_nothing(root, tmp_path):
    cfg = config(root, tmp_path / "cache", "gqa", **{"data.eval_split": "submit"})
    loop, out, result = fit(cfg)
    assert out["eval/n"] == 4 * 3 and out["eval/n_labelled"] == 0 and out["eval/acc"] == 0.0
    submission = loop.final.adapter.artifacts(result)[schema.GQA_SUBMISSION_ARTIFACT]
    assert len(submission) == 12  # still written: it is what GQA's server takes


def _official_consistency(identifiers: list[str], right: dict[str, bool]) -> float:
    """NLVR2's consistency as its official script groups examples: identifier minus its pair id."""
    groups: dict[str, list[bool]] = {}
    for ident in identifiers:
        split, set_id, _pair, sentence = ident.split("-")
        groups.setdefault(f"{split}-{set_id}--{sentence}", []).append(right[ident])
    return float(np.mean([all(v) for v in groups.values()]))


def test_nlvr2_trains_one_epoch_and_its_metrics_match_the_results_file(root, tmp_path):
    cfg = config(root, tmp_path / "cache", "nlvr2")
    loop, out, result = fit(cfg)
    adapter = loop.final.adapter
    assert out["epoch"] == 1.0 and np.isfinite(out["train/loss"])
    assert adapter.tags()[schema.EVAL_METRIC_TAG] == schema.EVAL_METRIC_NLVR2
    text = adapter.artifacts(result)[schema.NLVR2_RESULTS_ARTIFACT]
    lines = text.splitlines()
    source = json.loads((root / "nlvr2/valid.json").read_text())
    assert len(lines) == len(source) and all(line.rsplit(",", 1)[1] in ("True", "False") for line in lines)
    answer = dict(line.rsplit(",", 1) for line in lines)
    right = {e["identifier"]: answer[e["identifier"]] == ("True" if e["label"] == 1 else "False") for e in source}
    assert result.metrics["acc"] == pytest.approx(np.mean(list(right.values())))
    assert result.metrics["consistency"] == pytest.approx(_official_consistency([e["identifier"] for e in source], right))
    assert out["eval/acc"] == result.metrics["acc"] and out["eval/consistency"] == result.metrics["consistency"]
    assert out["eval/sentences"] == 6 * 2  # each set: sentence 0 on four pairs, sentence 1 on two
    # the model's size and cost as built: the pair head, two encoder passes per statement
    described = adapter.describe()
    assert described["model/params"] == sum(p.numel() for p in loop.final.model.parameters())


def test_nlvr2_adapter_model_swapping_images_and_head_halves_gives_the_same_logits(root, tmp_path):
    cfg = config(root, tmp_path / "cache", "nlvr2")
    adapter = get_task("nlvr2")(cfg, log=lambda _m: None)
    torch.manual_seed(0)
    model, other = adapter.build_model().eval(), adapter.build_model().eval()
    other.load_state_dict(model.state_dict())
    h = cfg.model.hidden_size
    with torch.no_grad():
        w = model.head.fc1.weight  # (2H, 2H): input columns [0, H) read img0's pooled output, [H, 2H) img1's
        other.head.fc1.weight.copy_(torch.cat([w[:, h:], w[:, :h]], 1))
    batch = adapter.data.eval.get_batch(np.arange(8))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos")}
    swapped = {**inputs, "visual_feats": inputs["visual_feats"].flip(1), "visual_pos": inputs["visual_pos"].flip(1)}
    with torch.no_grad():
        logits = model(**inputs)
        torch.testing.assert_close(other(**swapped), logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(**swapped), logits, atol=1e-4)  # the order of the images matters


def test_gqa_head_starts_from_the_pretraining_qa_head_through_the_loops_import(root, tmp_path):
    import shutil

    from models import lxmert_pretraining
    from models.checkpoint import to_hf_state_dict

    root = shutil.copytree(root, tmp_path / "root")
    cfg = config(root, tmp_path / "cache", "gqa")
    table = [e["ans"] for e in json.loads((root / "lxmert/all_ans.json").read_text())]
    table = ["unused", *reversed(table)]  # another order than the task's: the map, not the position, decides
    torch.manual_seed(1)
    pretrained = lxmert_pretraining(cfg.model, num_qa_answers=len(table), num_object_labels=16, num_attr_labels=8)
    (root / "lxmert/all_ans.json").write_text(json.dumps([{"ans": a, "dsets": ["gqa"]} for a in table]))
    checkpoint = tmp_path / "lxmert_pretrained.pt"
    torch.save(to_hf_state_dict(pretrained, task_model=True), checkpoint)
    cfg = config(root, tmp_path / "cache", "gqa", **{"train.init_checkpoint": str(checkpoint)})
    logged = []
    loop = TrialLoop(cfg, log=logged.append)
    adapter, head = loop.final.adapter, loop.final.model.head
    qa = pretrained.heads["qa"]
    for i, answer in enumerate(adapter.data.answers):
        torch.testing.assert_close(head.fc2.weight[i], qa.fc2.weight[table.index(answer)])
        torch.testing.assert_close(head.fc2.bias[i], qa.fc2.bias[table.index(answer)])
    torch.testing.assert_close(head.fc1.weight, qa.fc1.weight)
    line = f"{len(adapter.data.answers)} of {len(adapter.data.answers)} answers initialised from the pretraining QA head"
    assert adapter.tags()[schema.INIT_ANSWER_MAP] == line and any(line in m for m in logged)


@pytest.mark.parametrize(("name", "rel", "entry", "message"), [
    ("gqa", "gqa/train.json", 1, r"entry 1 \(question_id=.*\): lacks 'img_id'"),
    ("nlvr2", "nlvr2/train.json", 2, r"entry 2 \(identifier=.*\): label must be 0 \(False\) or 1 \(True\), got 'True'"),
])  # fmt: skip
def test_a_wrong_format_file_is_refused_naming_file_entry_and_line_before_any_trial(root, tmp_path, name, rel, entry, message):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    items = json.loads((bad / rel).read_text())
    if name == "gqa":
        del items[entry]["img_id"]
    else:
        items[entry]["label"] = "True"
    text = json.dumps(items, indent=4)
    (bad / rel).write_text(text)
    line = [n for n, row in enumerate(text.splitlines(), 1) if row == "    {"][entry]  # where the entry opens
    with pytest.raises(ValueError, match=rf"{bad / rel}: {message} \(the entry starts on line {line} of {bad / rel}\)"):
        config(bad, tmp_path / "cache", name)


@pytest.mark.parametrize("name", ["gqa", "nlvr2"])
def test_the_paper_grid_applies_to_the_task_from_the_command_line(root, name):
    from sweeps.config import ConfigError
    from sweeps.grid import expand, load_grid, load_preset

    grid, preset = load_grid("paper"), load_preset("default")
    cli = {"data.name": name, "data.root": str(root)}
    # the pretraining cells' default corpus is easy-VQA's: refused before any trial, saying what to set
    with pytest.raises(ConfigError, match=r"cell 'pretrain_equal', 'grad_std': pretrain.corpus=synthetic needs "
                                          r"data.name=easyvqa .* set pretrain.corpus=lxmert"):  # fmt: skip
        expand(grid, preset, cli_overrides=cli)
    plan = expand(grid, preset, cli_overrides={**cli, "pretrain.corpus": "lxmert"})
    assert len(plan.trials) == len(grid.cells) * 3
    for trial in plan.trials:
        assert trial.config.data.name == name and trial.config.stages()[-1] == ("finetune", name)
    smoke = expand(grid, load_preset("smoke_tasks"), cli_overrides=cli)
    assert [t.key for t in smoke.trials] == ["softmax-s0", "entmax-s0", "layerdrop_955-s0", "pretrain_equal-s0"]
