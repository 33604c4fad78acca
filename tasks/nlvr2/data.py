"""NLVR2 in LXMERT's files: where they live, where they come from, how an entry is read.

Layout under ``DataConfig.root`` (LXMERT's ``data`` folder, https://github.com/airsplay/lxmert#nlvr2)::

    nlvr2/train.json, nlvr2/valid.json, nlvr2/test.json
    nlvr2_imgfeat/train_obj36.tsv, valid_obj36.tsv, test_obj36.tsv

An entry is ``{"identifier": "train-10171-0-0", "img0": "train-10171-0-img0", "img1":
"train-10171-0-img1", "label": 0, "sent": "An image shows one leather pencil case, ...", "uid":
"nlvr2_train_0"}``: LXMERT's ``process_dataset.py`` over the official NLVR2 files (``dev`` is
``valid``, ``test1`` is ``test``), ``label`` 1 for "True", 0 for "False". The answers are the two
classes in that order, ``("False", "True")``, so ``targets`` (B, 2) is the one-hot label and its
arg-max the class LXMERT trains towards; the identifier is kept for the results file and the
consistency metric. Each split's images are in its own feature file.
"""

from __future__ import annotations

from pathlib import Path

from tasks import lxmert_task as lt
from tasks.config import DataConfig
from tasks.dataset import TaskData

SPLIT_FILES = {s: f"nlvr2/{s}.json" for s in ("train", "valid", "test")}
SPLIT_TSV = {s: f"nlvr2_imgfeat/{s}_obj36.tsv" for s in ("train", "valid", "test")}
#: Class index = LXMERT's label: 0 "False", 1 "True" (the strings of NLVR2's files and results).
ANSWERS = ("False", "True")
LXMERT_URL = "https://nlp.cs.unc.edu/data/lxmert_data"
README = "https://github.com/airsplay/lxmert#nlvr2"
OFFICIAL = {"train": "train", "valid": "dev", "test": "test1"}


def producer(rel: str) -> str:
    """How to obtain the NLVR2 file ``rel`` (relative to the data root), for error messages."""
    name = Path(rel).name
    if rel.endswith(".json"):
        split = name[: -len(".json")]
        return (
            f"LXMERT converts it from the official nlvr2/data/{OFFICIAL.get(split, split)}.json of "
            "https://github.com/lil-lab/nlvr: in LXMERT's repository run `git submodule update --init`, then "
            "`cd data/nlvr2/process_raw_data_scripts && python process_dataset.py`, which writes "
            f"data/nlvr2/{name} ({README})"
        )
    stem = name[: -len(".tsv")]
    return (
        f"LXMERT's Faster R-CNN features of the NLVR2 images: wget {LXMERT_URL}/nlvr2_imgfeat/{stem}.zip and "
        f"unzip it so that the file is <root>/{rel} ({README})"
    )


def read_entries(items: list, path: Path) -> list[lt.Entry]:
    """Validate LXMERT's NLVR2 entries and return them as `tasks.lxmert_task.Entry` records.

    Raises:
        tasks.lxmert_task.EntryFormatError: naming ``path``, the entry (index, identifier) and
            the key at fault: not an object; ``identifier``, ``img0``, ``img1`` or ``sent`` missing
            or not a non-empty string; ``label`` not 0 or 1; ``uid`` present but not a string.
    """
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise lt.EntryFormatError(f"{path}: entry {i} is a {type(item).__name__}, not an NLVR2 example")
        ident, img0, img1, sent = (lt.require_str(path, i, item, k, "identifier")
                                   for k in ("identifier", "img0", "img1", "sent"))  # fmt: skip
        if "uid" in item and not isinstance(item["uid"], str):
            raise lt.entry_error(path, i, item, "identifier", f"uid must be a string, got {item['uid']!r}")
        label = None
        if "label" in item:
            value = item["label"]
            if isinstance(value, bool) or value not in (0, 1):
                raise lt.entry_error(path, i, item, "identifier",
                                     f"label must be 0 (False) or 1 (True), got {value!r}")  # fmt: skip
            label = {ANSWERS[int(value)]: 1.0}
        out.append(lt.Entry(ident, sent, (img0, img1), label))
    return out


LAYOUT = lt.Layout(
    task="nlvr2",
    split_files=SPLIT_FILES,
    split_tsv=SPLIT_TSV,
    producer=producer,
    read_entries=read_entries,
    answers=ANSWERS,
    images_per_entry=2,
)


def prepare(cfg: DataConfig) -> dict:
    """Convert the feature files and tokenise the statement files ``cfg`` needs (once).

    Args:
        cfg: a resolved `DataConfig` with ``name="nlvr2"``.
    """
    return lt.prepare(cfg, LAYOUT)


def load(cfg: DataConfig) -> TaskData:
    """Memory-map the prepared NLVR2 arrays (preparing them first if needed).

    Args:
        cfg: a resolved `DataConfig` with ``name="nlvr2"``.

    Returns:
        `TaskData` whose batches hold ``visual_feats`` (B, 2, R, F) and ``visual_pos``
        (B, 2, R, 4) (``img0``, ``img1``), ``targets`` (B, 2) one-hot over ``("False", "True")``
        (all zero for an unlabelled entry); ``ds.source_id_of(qids)`` gives the identifiers.
    """
    return lt.load(cfg, LAYOUT)
