"""GQA in LXMERT's files: where they live, where they come from, how an entry is read.

Layout under ``DataConfig.root`` (LXMERT's ``data`` folder, https://github.com/airsplay/lxmert#gqa)::

    gqa/train.json, gqa/valid.json, gqa/testdev.json, gqa/submit.json
    gqa/trainval_ans2label.json   {answer: label}   (1,842 answers)
    gqa/trainval_label2ans.json   [answer, ...]
    vg_gqa_imgfeat/vg_gqa_obj36.tsv        Visual Genome + GQA test images (train, valid, submit)
    vg_gqa_imgfeat/gqa_testdev_obj36.tsv   test-dev images

An entry is ``{"question_id": "07333408", "img_id": "2375429", "sent": "What is on the white
wall?", "label": {"pipe": 1.0}}`` (LXMERT's ``process_data.py`` over GQA's balanced questions:
one answer of score 1.0; ``submit`` entries have no label). Question ids are strings of digits
whose leading zeros matter: they are kept as written for the submission file, and the batch's
integer ``question_id`` is `tasks.lxmert_task.Layout.question_id`.

Splits map to feature files as in LXMERT's ``GQABufferLoader``: ``testdev`` ->
``gqa_testdev_obj36.tsv``, every other split -> ``vg_gqa_obj36.tsv`` (which LXMERT pretraining
also reads; it is converted once for both).
"""

from __future__ import annotations

import math
from pathlib import Path

from tasks import lxmert_task as lt
from tasks.config import DataConfig
from tasks.dataset import TaskData

SPLIT_FILES = {s: f"gqa/{s}.json" for s in ("train", "valid", "testdev", "submit")}
ANS2LABEL = "gqa/trainval_ans2label.json"
LABEL2ANS = "gqa/trainval_label2ans.json"
VG_TSV = "vg_gqa_imgfeat/vg_gqa_obj36.tsv"
TESTDEV_TSV = "vg_gqa_imgfeat/gqa_testdev_obj36.tsv"
SPLIT_TSV = {"train": VG_TSV, "valid": VG_TSV, "testdev": TESTDEV_TSV, "submit": VG_TSV}
LXMERT_URL = "https://nlp.cs.unc.edu/data/lxmert_data"
README = "https://github.com/airsplay/lxmert#gqa"


def producer(rel: str) -> str:
    """How to obtain the GQA file ``rel`` (relative to the data root), for error messages."""
    name = Path(rel).name
    if rel in (ANS2LABEL, LABEL2ANS):
        return f"it ships in LXMERT's repository under data/gqa/ ({README})"
    if rel.endswith(".json"):
        return f"LXMERT's re-distributed GQA split: wget {LXMERT_URL}/gqa/{name} -P <root>/gqa/ ({README})"
    stem = name[: -len(".tsv")]
    return (
        f"LXMERT's Faster R-CNN features of the GQA images: wget {LXMERT_URL}/vg_gqa_imgfeat/{stem}.zip and "
        f"unzip it so that the file is <root>/{rel} ({README})"
    )


def read_entries(items: list, path: Path) -> list[lt.Entry]:
    """Validate LXMERT's GQA entries and return them as `tasks.lxmert_task.Entry` records.

    Raises:
        tasks.lxmert_task.EntryFormatError: naming ``path``, the entry (index, question_id) and the
            key at fault: not an object, a missing key, an id that is neither a string nor an
            integer, an empty ``sent``, a ``label`` that is not ``{answer: score}`` with finite
            scores in [0, 1].
    """
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise lt.EntryFormatError(f"{path}: entry {i} is a {type(item).__name__}, not a question object")
        ids = {}
        for key in ("question_id", "img_id"):
            if key not in item:
                raise lt.entry_error(path, i, item, "question_id", f"lacks {key!r}")
            value = item[key]
            # LXMERT's files write both as strings; an integer is the same id without quotes.
            if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
                raise lt.entry_error(path, i, item, "question_id", f"{key} must be a string, got {value!r}")
            ids[key] = str(value)
        sent = lt.require_str(path, i, item, "sent", "question_id")
        label = item.get("label")
        if label is not None:
            if not isinstance(label, dict):
                raise lt.entry_error(path, i, item, "question_id", f"label must be {{answer: score}}, got {label!r}")
            for answer, score in label.items():
                ok = isinstance(score, (int, float)) and not isinstance(score, bool)
                if not ok or not math.isfinite(score) or not 0.0 <= score <= 1.0:
                    raise lt.entry_error(path, i, item, "question_id",
                                         f"label[{answer!r}] must be a number in [0, 1], got {score!r}")  # fmt: skip
            label = {str(a): float(s) for a, s in label.items()}
        out.append(lt.Entry(ids["question_id"], sent, (ids["img_id"],), label))
    return out


LAYOUT = lt.Layout(
    task="gqa",
    split_files=SPLIT_FILES,
    split_tsv=SPLIT_TSV,
    producer=producer,
    read_entries=read_entries,
    vocab=(ANS2LABEL, LABEL2ANS),
)


def prepare(cfg: DataConfig) -> dict:
    """Convert the feature files and tokenise the question files ``cfg`` needs (once).

    Args:
        cfg: a resolved `DataConfig` with ``name="gqa"``.
    """
    return lt.prepare(cfg, LAYOUT)


def load(cfg: DataConfig) -> TaskData:
    """Memory-map the prepared GQA arrays (preparing them first if needed).

    Args:
        cfg: a resolved `DataConfig` with ``name="gqa"``.

    Returns:
        `TaskData`: batches as VQA's (``targets`` (B, 1,842) with the answer's score 1.0);
        ``ds.source_id_of(qids)`` gives GQA's question id strings.
    """
    return lt.load(cfg, LAYOUT)
