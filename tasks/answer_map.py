"""A task's answer head initialised from LXMERT's pretraining image-QA head (9,500 answers).

LXMERT pretrains an image-QA head over the 9,500 answers of ``data/lxmert/all_ans.json`` (in that
order: the rows of ``answer_head.logit_fc.3`` in ``model_LXRT.pth`` and in HuggingFace's
``unc-nlp/lxmert-base-uncased``). Fine-tuning on VQA or GQA starts the task head's last layer from
those rows (LXMERT's ``--loadLXMERTQA``, ``load_lxmert_qa``): each task answer is normalised with
LXMERT's ``AnswerTable.convert_ans`` (`tasks.pretrain.lxmert.convert_ans`) and, when the table holds
the result, takes that answer's row. With LXMERT's files this maps 1,736 of GQA's 1,842 answers and
3,124 of VQA's 3,129.

`qa_answer_map` builds the ``{task answer index: table index}`` map that
`models.checkpoint.load_pretrained` takes (``answer_map=``); the load report then lists the head's
last layer as ``partial: head.fc2.weight: 1736/1842 rows from the answer map, the rest fresh``,
as for VQA. One difference from LXMERT's code: it sets the unmapped rows (weights and bias) to
zero; here they keep the head's initialisation (normal, std 0.02; bias 0).

Usage::

    from models.checkpoint import load_pretrained
    from tasks.answer_map import describe, qa_answer_map, read_qa_table
    table = read_qa_table("/data/lxmert")                    # <root>/lxmert/all_ans.json
    amap = qa_answer_map(data.answers, table)
    print(describe(data.answers, amap))                      # "1736 of 1842 answers ..."
    load_pretrained(model, "snap/pretrained/model_LXRT.pth", answer_map=amap)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from models.checkpoint import answer_map_from_labels
from tasks.pretrain.lxmert import convert_ans

#: The pretraining QA answers, relative to LXMERT's data folder.
QA_TABLE = "lxmert/all_ans.json"
QA_TABLE_SOURCE = "it ships in LXMERT's repository under data/lxmert/ (https://github.com/airsplay/lxmert)"


def read_qa_table(root: str | Path) -> list[str]:
    """The 9,500 pretraining QA answers in head-row order, from ``<root>/lxmert/all_ans.json``
    (``[{"ans": str, "dsets": [...]}, ...]``) or from that file's path.

    Raises:
        FileNotFoundError: naming the file and where it comes from.
        ValueError: not a list of ``{"ans": str, ...}`` (naming the file and the entry).
    """
    path = Path(root)
    if path.is_dir() or not path.suffix:
        path = path / QA_TABLE
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: LXMERT's pretraining QA answers; {QA_TABLE_SOURCE}")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(table, list):
        raise ValueError(f"{path}: expected a list of {{'ans': ..., 'dsets': [...]}}, got a {type(table).__name__}")
    answers = []
    for i, entry in enumerate(table):
        if not isinstance(entry, dict) or not isinstance(entry.get("ans"), str):
            raise ValueError(f"{path}: entry {i} is not {{'ans': str, 'dsets': [...]}}: {str(entry)[:80]!r}")
        answers.append(entry["ans"])
    return answers


def qa_answer_map(answers: Sequence[str], table: Sequence[str]) -> dict[int, int]:
    """``{task answer index: pretraining QA row}`` as LXMERT's ``load_lxmert_qa`` pairs them.

    Args:
        answers: the task's answer vocabulary (``trainval_label2ans.json``), in head-row order.
        table: the pretraining answers in head-row order (`read_qa_table`).
    """
    return answer_map_from_labels([convert_ans(a) for a in answers], table)


def describe(answers: Sequence[str], mapping: dict[int, int], shown: int = 8) -> str:
    """One line for the log: how many answers start from the pretrained head, and which do not."""
    fresh = [answers[i] for i in range(len(answers)) if i not in mapping]
    line = f"{len(mapping)} of {len(answers)} answers initialised from the pretraining QA head"
    if fresh:
        line += f"; {len(fresh)} fresh (e.g. {', '.join(repr(a) for a in fresh[:shown])})"
    return line
