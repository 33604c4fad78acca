"""LXMERT's VQA v2 files: where they live, what produces them, how to read (and write) them.

Layout under ``DataConfig.root`` (LXMERT's ``data`` folder)::

    vqa/train.json, vqa/nominival.json, vqa/minival.json, vqa/test.json
    vqa/trainval_ans2label.json   {answer: label}   (3,129 answers)
    vqa/trainval_label2ans.json   [answer, ...]
    mscoco_imgfeat/train2014_obj36.tsv, val2014_obj36.tsv, test2015_obj36.tsv

A question JSON is a list of entries ``{"question_id", "img_id", "sent", "label": {answer:
soft score}, "answer_type", "question_type"}`` (test entries have no label or types). A feature TSV
has one image per line, tab-separated `FIELDS`, the arrays base64-encoded: ``objects_id`` /
``attrs_id`` int64 (n,), ``objects_conf`` / ``attrs_conf`` float32 (n,), ``boxes`` float32 (n, 4)
in pixels (x1, y1, x2, y2), ``features`` float32 (n, 2048), n = ``num_boxes`` (36).

The feature-row codec (`parse_row`, `format_row`) and the JSON / vocabulary readers (`read_json`,
`read_vocab`, given another task's paths and sources) serve every LXMERT task: GQA and NLVR2 use
them through `tasks.lxmert_task`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
SPLIT_FILES = {s: f"vqa/{s}.json" for s in ("train", "nominival", "minival", "test")}
ANS2LABEL = "vqa/trainval_ans2label.json"
LABEL2ANS = "vqa/trainval_label2ans.json"
# Which feature file holds a split's images (LXMERT: minival/nominival are halves of val2014).
SPLIT_TSV = {
    "train": "mscoco_imgfeat/train2014_obj36.tsv",
    "nominival": "mscoco_imgfeat/val2014_obj36.tsv",
    "minival": "mscoco_imgfeat/val2014_obj36.tsv",
    "test": "mscoco_imgfeat/test2015_obj36.tsv",
}
LXMERT_URL = "https://nlp.cs.unc.edu/data/lxmert_data"
LXMERT_README = "https://github.com/airsplay/lxmert#vqa"


def producer(rel: str) -> str:
    """How to obtain the LXMERT file ``rel`` (relative to the data root), for error messages."""
    name = Path(rel).name
    if rel in (ANS2LABEL, LABEL2ANS):
        return f"it ships in LXMERT's repository under data/vqa/ ({LXMERT_README})"
    if rel.endswith(".json"):
        return f"LXMERT's re-distributed VQA split: wget {LXMERT_URL}/vqa/{name} -P <root>/vqa/ ({LXMERT_README})"
    stem = name[: -len(".tsv")]
    return (
        f"LXMERT's Faster R-CNN features: wget {LXMERT_URL}/mscoco_imgfeat/{stem}.zip and unzip it into "
        f"<root>/mscoco_imgfeat/ ({LXMERT_README})"
    )


def missing_file_error(root: Path, rel: str) -> FileNotFoundError:
    return FileNotFoundError(f"missing {root / rel}: {producer(rel)}")


class TSVFormatError(ValueError):
    """A malformed feature TSV row; the message names the file and the line."""


@dataclass
class Row:
    """One decoded TSV row (one image)."""

    img_id: str
    img_h: int
    img_w: int
    objects_id: np.ndarray  # (n,) int64
    objects_conf: np.ndarray  # (n,) float32
    attrs_id: np.ndarray  # (n,) int64
    attrs_conf: np.ndarray  # (n,) float32
    boxes: np.ndarray  # (n, 4) float32, pixels
    features: np.ndarray  # (n, F) float32


def parse_row(line: bytes, path: Path | str, line_no: int) -> Row:
    """Decode one TSV line (bytes, trailing newline allowed).

    Raises:
        TSVFormatError: naming ``path:line_no`` and what is wrong.
    """

    def bad(why: str) -> TSVFormatError:
        return TSVFormatError(f"{path}:{line_no}: malformed feature row: {why}")

    def bad_value(why: str) -> TSVFormatError:
        return TSVFormatError(f"{path}:{line_no}: refused feature row: {why}")

    parts = line.rstrip(b"\r\n").split(b"\t")
    if len(parts) != len(FIELDS):
        raise bad(f"expected {len(FIELDS)} tab-separated fields ({', '.join(FIELDS)}), got {len(parts)}")
    try:
        img_id = parts[0].decode()
        img_h, img_w, n = int(parts[1]), int(parts[2]), int(parts[7])
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"img_id / img_h / img_w / num_boxes: {e}") from None
    if img_h <= 0 or img_w <= 0 or n <= 0:
        raise bad(f"img_h={img_h}, img_w={img_w}, num_boxes={n} must be positive")

    def arr(i: int, dtype: type, per_box: int | None) -> np.ndarray:
        try:
            raw = base64.b64decode(parts[i], validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad(f"field {FIELDS[i]} is not valid base64: {e}") from None
        size = np.dtype(dtype).itemsize
        if per_box is not None and len(raw) != n * per_box * size:
            raise bad(f"field {FIELDS[i]} has {len(raw)} bytes, expected num_boxes={n} x {per_box} x {size}")
        if per_box is None and (len(raw) == 0 or len(raw) % (n * size)):
            raise bad(f"field {FIELDS[i]} has {len(raw)} bytes, not a multiple of num_boxes={n} x {size}")
        return np.frombuffer(raw, dtype=dtype).reshape(n, -1)

    row = Row(
        img_id=img_id,
        img_h=img_h,
        img_w=img_w,
        objects_id=arr(3, np.int64, 1)[:, 0],
        objects_conf=arr(4, np.float32, 1)[:, 0],
        attrs_id=arr(5, np.int64, 1)[:, 0],
        attrs_conf=arr(6, np.float32, 1)[:, 0],
        boxes=arr(8, np.float32, 4),
        features=arr(9, np.float32, None),
    )
    # A NaN or inf here reaches every forward pass of every trial that sees this image.
    for name in ("objects_conf", "attrs_conf", "boxes", "features"):
        values = getattr(row, name)
        bad = ~np.isfinite(values)
        if bad.any():
            box = int(np.argwhere(bad)[0][0])
            raise bad_value(f"field {name} holds {int(bad.sum())} non-finite value(s) (NaN/inf), the first in box "
                            f"{box} of image {img_id!r}")
    return row


def format_row(
    img_id: str,
    img_h: int,
    img_w: int,
    boxes: np.ndarray,
    features: np.ndarray,
    objects_id: np.ndarray | None = None,
    objects_conf: np.ndarray | None = None,
    attrs_id: np.ndarray | None = None,
    attrs_conf: np.ndarray | None = None,
) -> str:
    """One TSV line (with newline) in LXMERT's format: the inverse of `parse_row` (tests, benchmarks).

    Args:
        boxes: (n, 4) pixel boxes; features: (n, F). Missing detector outputs are zeros.
    """
    n = len(boxes)

    def b64(a: np.ndarray | None, dtype: type) -> str:
        a = np.zeros(n, dtype) if a is None else np.ascontiguousarray(a, dtype=dtype)
        return base64.b64encode(a.tobytes()).decode()

    fields = [
        img_id,
        str(img_h),
        str(img_w),
        b64(objects_id, np.int64),
        b64(objects_conf, np.float32),
        b64(attrs_id, np.int64),
        b64(attrs_conf, np.float32),
        str(n),
        b64(boxes, np.float32),
        b64(features, np.float32),
    ]
    return "\t".join(fields) + "\n"


def read_json(root: Path, rel: str, missing: Callable[[Path, str], Exception] | None = None) -> object:
    """Load an LXMERT JSON file; a missing file raises naming it and what produces it.

    Args:
        root: the data folder.
        rel: the file, relative to ``root``.
        missing: ``missing(root, rel)`` builds the error for a missing file (another task's
            sources, e.g. `tasks.gqa.data.LAYOUT.missing`); default: the VQA files' sources.

    Raises:
        FileNotFoundError: the file is missing (what ``missing`` says).
        ValueError: the file is not valid JSON (naming the file, line and column).
    """
    path = root / rel
    if not path.is_file():
        raise (missing or missing_file_error)(root, rel)
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_vocab(
    root: Path,
    ans2label_rel: str = ANS2LABEL,
    label2ans_rel: str = LABEL2ANS,
    missing: Callable[[Path, str], Exception] | None = None,
) -> tuple[list[str], dict[str, int]]:
    """An answer vocabulary: ``label2ans`` (list) and ``ans2label`` (dict), checked consistent.

    Args:
        root: the data folder.
        ans2label_rel, label2ans_rel: the two files, relative to ``root`` (default: VQA's; GQA's
            are ``gqa/trainval_{ans2label,label2ans}.json``).
        missing: as in `read_json`.
    """
    label2ans = read_json(root, label2ans_rel, missing)
    ans2label = read_json(root, ans2label_rel, missing)
    a2l, l2a = root / ans2label_rel, root / label2ans_rel
    if not isinstance(label2ans, list) or not isinstance(ans2label, dict):
        raise ValueError(f"{l2a} must hold a list and {a2l} a dict")
    for i, a in enumerate(label2ans):
        if ans2label.get(a) != i:
            raise ValueError(f"{a2l} maps {a!r} to {ans2label.get(a)!r} but {l2a} has it at {i}")
    if len(ans2label) != len(label2ans):
        extra = next(a for a in ans2label if a not in set(label2ans))
        raise ValueError(f"{a2l} has answer {extra!r} that {l2a} lacks")
    return label2ans, ans2label


def read_questions(root: Path, split: str) -> list[dict]:
    """A split's question entries, checked for the keys and value types LXMERT's files have.

    Raises:
        ValueError: naming the file, the entry (its index and ``question_id``) and the key at fault:
            an entry that is not an object, a missing key, a ``question_id`` that is not an integer
            or occurs twice, a ``sent`` or ``img_id`` that is not a string, a ``label`` that is not
            an object of answer: score, or a score that is not a finite number in [0, 1].
    """
    rel = SPLIT_FILES[split]
    path = root / rel
    entries = read_json(root, rel)
    if not isinstance(entries, list):
        raise ValueError(f"{path} must hold a list of question entries, not a {type(entries).__name__}")
    first: dict[int, int] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: entry {i} is a {type(e).__name__} ({str(e)[:60]!r}), not a question object")
        where = f"{path}: entry {i} (question_id={e.get('question_id')!r})"
        for key in ("question_id", "img_id", "sent"):
            if key not in e:
                raise ValueError(f"{where} lacks {key!r}")
        qid = e["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, (int, str)) or not str(qid).strip().lstrip("-").isdigit():
            raise ValueError(f"{where}: question_id must be an integer, got {qid!r}")
        if int(qid) in first:
            raise ValueError(f"{where}: question_id {qid} occurs twice (entries {first[int(qid)]} and {i}); "
                             "question ids must be unique")
        first[int(qid)] = i
        for key in ("sent", "img_id"):
            if not isinstance(e[key], str) or not e[key].strip():
                raise ValueError(f"{where}: {key} must be a non-empty string, got {e[key]!r}")
        if "label" in e:
            _check_label(e["label"], where)
    return entries


def _check_label(label: object, where: str) -> None:
    if not isinstance(label, dict):
        raise ValueError(f"{where}: label must be an object of answer: score, got {label!r}")
    for answer, score in label.items():
        ok = isinstance(score, (int, float)) and not isinstance(score, bool)
        if not ok or not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise ValueError(f"{where}: label[{answer!r}] must be a finite number in [0, 1] "
                             f"(LXMERT's soft score), got {score!r}")
