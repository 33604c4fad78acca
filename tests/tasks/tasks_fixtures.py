"""Helpers for tasks/ tests: small VQA v2, GQA and NLVR2 files written in LXMERT's formats.

The LXMERT writer here is deliberately independent of `tasks.vqa.files.format_row`, so the round
trip checks the reader against the format, not against itself.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

ANSWERS = ["yes", "no", "2", "red", "dog"]


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def lxmert_row(img_id: str, h: int, w: int, boxes: np.ndarray, feats: np.ndarray) -> str:
    """One line of an LXMERT ``*_obj36.tsv`` (field order and dtypes as LXMERT's loader reads them)."""
    n = len(boxes)
    fields = [
        img_id,
        str(h),
        str(w),
        b64(np.arange(n, dtype=np.int64)),  # objects_id
        b64(np.full(n, 0.5, np.float32)),  # objects_conf
        b64(np.arange(n, dtype=np.int64) % 7),  # attrs_id
        b64(np.full(n, 0.25, np.float32)),  # attrs_conf
        str(n),
        b64(boxes.astype(np.float32)),
        b64(feats.astype(np.float32)),
    ]
    return "\t".join(fields) + "\n"


def write_tsv(path: Path, img_ids: list[str], rng: np.random.Generator, n_boxes: int = 4, dim: int = 16) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    truth = {}
    with open(path, "w") as fh:
        for img in img_ids:
            h, w = int(rng.integers(100, 500)), int(rng.integers(100, 500))
            x1, y1 = rng.uniform(0, w / 2, n_boxes), rng.uniform(0, h / 2, n_boxes)
            boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n_boxes), y1 + rng.uniform(1, h / 2, n_boxes)], 1)
            feats = rng.normal(size=(n_boxes, dim)).astype(np.float32)
            fh.write(lxmert_row(img, h, w, boxes, feats))
            truth[img] = (h, w, boxes.astype(np.float32), feats)
    return truth


def make_lxmert_root(root: Path, n_images: int = 6, seed: int = 0) -> dict:
    """An LXMERT ``data`` folder: 4 split JSONs, the answer vocabulary, 3 feature TSVs."""
    rng = np.random.default_rng(seed)
    (root / "vqa").mkdir(parents=True, exist_ok=True)
    (root / "vqa/trainval_label2ans.json").write_text(json.dumps(ANSWERS))
    (root / "vqa/trainval_ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(ANSWERS)}))
    feats = {}
    ids = {}
    for name in ("train2014", "val2014", "test2015"):
        ids[name] = [f"COCO_{name}_{i:012d}" for i in range(n_images)]
        feats.update(write_tsv(root / f"mscoco_imgfeat/{name}_obj36.tsv", ids[name], rng))
    sents = ["What color is the dog?", "Is the dog red?", "How many dogs are there?"]
    labels = [{"red": 1.0, "2": 0.3}, {"yes": 0.9, "maybe": 0.3}, {"2": 1.0}]  # "maybe": out of vocabulary
    types = [("other", "what color is the"), ("yes/no", "is the"), ("number", "how many")]
    half = n_images // 2
    questions = {}
    qid = 100
    for split, imgs in (
        ("train", ids["train2014"]),
        ("nominival", ids["val2014"][half:]),
        ("minival", ids["val2014"][:half]),
        ("test", ids["test2015"]),
    ):
        entries = []
        for img in imgs:
            for k in range(3):
                qid += 1
                e = {"question_id": qid, "img_id": img, "sent": sents[k]}
                if split != "test":
                    e.update(label=labels[k], answer_type=types[k][0], question_type=types[k][1])
                entries.append(e)
        (root / f"vqa/{split}.json").write_text(json.dumps(entries))
        questions[split] = entries
    return {"features": feats, "questions": questions, "ids": ids}


# ------------------------------------------------------------------------------ GQA and NLVR2
def write_json(path: Path, obj: object) -> None:
    """A JSON file as LXMERT's preprocessing scripts write them (``indent=4, sort_keys=True``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4, sort_keys=True))


# "hair clip" is one of the GQA answers LXMERT's 9,500-answer table lacks.
GQA_ANSWERS = ["yes", "no", "red", "blue", "cat", "hair clip"]


def make_gqa_root(root: Path, n_images: int = 4, seed: int = 0) -> dict:
    """LXMERT's GQA files: 4 split JSONs, the answer vocabulary, the two feature TSVs.

    ``vg_gqa_obj36.tsv`` holds the train images, then the valid images, then two GQA test images
    (``n...``) that ``submit`` asks about; ``gqa_testdev_obj36.tsv`` the test-dev images. Question
    ids are digit strings, some with a leading zero (``"0...``) beside the same digits without it.
    """
    rng = np.random.default_rng(seed)
    write_json(root / "gqa/trainval_label2ans.json", GQA_ANSWERS)
    write_json(root / "gqa/trainval_ans2label.json", {a: i for i, a in enumerate(GQA_ANSWERS)})
    ids = {
        "train": [str(2375429 + i) for i in range(n_images)],
        "valid": [str(2400000 + i) for i in range(n_images)],
        "submit": ["n161313", "n235859"],
        "testdev": [f"n{500000 + i}" for i in range(n_images)],
    }
    feats = write_tsv(root / "vg_gqa_imgfeat/vg_gqa_obj36.tsv", ids["train"] + ids["valid"] + ids["submit"], rng)
    feats.update(write_tsv(root / "vg_gqa_imgfeat/gqa_testdev_obj36.tsv", ids["testdev"], rng))
    sents = ["Is the cat red?", "What color is the car?", "What is on the white wall?"]
    answers = ["yes", "blue", "giraffe"]  # "giraffe": outside the vocabulary
    questions = {}
    n = 0
    for split in ("train", "valid", "testdev", "submit"):
        entries = []
        for img in ids[split]:
            for k in range(3):
                n += 1
                qid = f"0{7333400 + n}" if k == 0 else str(7333400 + n)  # GQA ids: strings, leading zeros kept
                e = {"img_id": img, "question_id": qid, "sent": sents[k]}
                if split != "submit":
                    e["label"] = {answers[k]: 1.0}
                entries.append(e)
        write_json(root / f"gqa/{split}.json", entries)
        questions[split] = entries
    return {"features": feats, "questions": questions, "ids": ids}


def make_nlvr2_root(root: Path, n_sets: int = 2, seed: int = 0) -> dict:
    """LXMERT's NLVR2 files: ``nlvr2/{train,valid,test}.json`` and their feature TSVs.

    Per set: 3 image pairs, sentence 0 on all three, sentence 1 on the first two (identifiers
    ``<split>-<set>-<pair>-<sentence>`` as NLVR2 writes them; ``valid`` is NLVR2's ``dev``, ``test``
    its ``test1``); labels alternate.
    """
    rng = np.random.default_rng(seed)
    feats, examples = {}, {}
    for split, official in (("train", "train"), ("valid", "dev"), ("test", "test1")):
        images, entries = [], []
        for s in range(n_sets):
            set_id = 100 + s
            for pair in range(3):
                images += [f"{official}-{set_id}-{pair}-img0", f"{official}-{set_id}-{pair}-img1"]
            for sentence, pairs in ((0, (0, 1, 2)), (1, (0, 1))):
                for pair in pairs:
                    stem = f"{official}-{set_id}-{pair}"
                    entries.append({
                        "identifier": f"{stem}-{sentence}", "img0": f"{stem}-img0", "img1": f"{stem}-img1",
                        "label": (pair + sentence + s) % 2, "sent": f"There are {sentence + 2} dogs in set {set_id}.",
                        "uid": f"nlvr2_{split}_{len(entries)}",
                    })  # fmt: skip
        feats.update(write_tsv(root / f"nlvr2_imgfeat/{split}_obj36.tsv", images, rng))
        write_json(root / f"nlvr2/{split}.json", entries)
        examples[split] = entries
    return {"features": feats, "examples": examples}
