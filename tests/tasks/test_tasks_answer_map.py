"""The answer head initialised from LXMERT's pretraining QA head: the map (LXMERT's rule: each task
answer normalised by convert_ans, looked up in all_ans.json) and the weight import it drives.

(With LXMERT's real files, data/lxmert/all_ans.json and data/gqa/trainval_label2ans.json, the map
was checked once against LXMERT's own AnswerTable: the same 1,736 of 1,842 pairs; for VQA 3,124 of
3,129. The files are not shipped here; these tests pin the rule on small tables.)
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import one_thread

from models import build_model, lxmert_pretraining, lxmert_tiny
from models.checkpoint import load_pretrained, to_hf_state_dict
from tasks.answer_map import describe, qa_answer_map, read_qa_table

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_thread)

# A stand-in for the 9,500-answer table (all_ans.json order) and a GQA-like vocabulary.
TABLE = ["man", "2", "gray", "yes", "no", "cat", "hair", "red", "woman", "1"]
ANSWERS = ["yes", "hair clip", "two", "grey", "the man", "cat", "a woman", "napkin dispenser", "one"]


def test_map_follows_lxmert_convert_ans():
    amap = qa_answer_map(ANSWERS, TABLE)
    # "two" -> "2", "grey" -> "gray", "the man" -> "man", "a woman" -> "woman", "one" -> "1";
    # "hair clip" and "napkin dispenser" are not in the table (as in LXMERT's real files)
    assert amap == {0: 3, 2: 1, 3: 2, 4: 0, 5: 5, 6: 8, 8: 9}
    assert describe(ANSWERS, amap) == (
        "7 of 9 answers initialised from the pretraining QA head; 2 fresh (e.g. 'hair clip', 'napkin dispenser')"
    )


def test_read_qa_table_names_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lxmert/all_ans\.json: .*data/lxmert/"):
        read_qa_table(tmp_path)
    (tmp_path / "lxmert").mkdir()
    path = tmp_path / "lxmert/all_ans.json"
    path.write_text(json.dumps([{"ans": a, "dsets": ["vqa"]} for a in TABLE]))
    assert read_qa_table(tmp_path) == TABLE == read_qa_table(path)
    path.write_text(json.dumps([{"ans": "man", "dsets": []}, {"answer": "2"}]))
    with pytest.raises(ValueError, match=r"all_ans\.json: entry 1 is not \{'ans': str"):
        read_qa_table(tmp_path)


def test_pretraining_qa_head_initialises_the_task_head_through_the_map():
    torch.manual_seed(0)
    pretrained = lxmert_pretraining(lxmert_tiny(), num_qa_answers=len(TABLE))
    state = to_hf_state_dict(pretrained, task_model=True)  # as LXMERT's / HF's checkpoints name it
    model = build_model(lxmert_tiny(num_answers=len(ANSWERS)))
    fresh_rows = model.head.fc2.weight[[1, 7]].detach().clone()
    amap = qa_answer_map(ANSWERS, TABLE)
    report = load_pretrained(model, state, answer_map=amap, verbose=False)
    assert report.partial == {"head.fc2.weight": "7/9 rows", "head.fc2.bias": "7/9 rows"}
    assert "partial: head.fc2.weight: 7/9 rows from the answer map, the rest fresh" in str(report)
    qa = pretrained.heads["qa"]
    for ours, theirs in amap.items():
        assert torch.equal(model.head.fc2.weight[ours], qa.fc2.weight[theirs])
        assert torch.equal(model.head.fc2.bias[ours], qa.fc2.bias[theirs])
    assert torch.equal(model.head.fc2.weight[[1, 7]], fresh_rows)  # unmapped rows keep their init
    assert torch.equal(model.head.fc1.weight, qa.fc1.weight)
