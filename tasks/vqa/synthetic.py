"""Small fake VQA v2 data sets written in LXMERT's exact file formats (for tests and benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tasks.vqa import files


def write_tsv(path: Path, img_ids: list[str], num_boxes: int = 36, feat_dim: int = 2048, seed: int = 0) -> dict:
    """Write a feature TSV with random boxes / features; return the arrays written, by image id."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    truth = {}
    with open(path, "w") as fh:
        for img_id in img_ids:
            h, w = int(rng.integers(200, 640)), int(rng.integers(200, 640))
            x1 = rng.uniform(0, w / 2, num_boxes)
            y1 = rng.uniform(0, h / 2, num_boxes)
            boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, num_boxes), y1 + rng.uniform(1, h / 2, num_boxes)], 1)
            feats = rng.random((num_boxes, feat_dim), dtype=np.float32) * 4
            obj = rng.integers(0, 1600, num_boxes)
            fh.write(
                files.format_row(img_id, h, w, boxes.astype(np.float32), feats, obj, rng.random(num_boxes), obj % 400)
            )
            truth[img_id] = {"h": h, "w": w, "boxes": boxes.astype(np.float32), "features": feats}
    return truth


def write_dataset(root: Path, images_per_file: int = 8, questions_per_image: int = 3, num_boxes: int = 36,
                  feat_dim: int = 2048, seed: int = 0) -> dict:
    """Write a whole LXMERT ``data`` folder (4 split JSONs, the vocab, 3 feature TSVs) under ``root``.

    Returns:
        ``{"answers": [...], "features": {img_id: arrays}, "questions": {split: entries}}``.
    """
    rng = np.random.default_rng(seed)
    answers = ["yes", "no", "2", "red", "dog", "cat", "tennis", "blue"]
    (root / "vqa").mkdir(parents=True, exist_ok=True)
    (root / files.LABEL2ANS).write_text(json.dumps(answers))
    (root / files.ANS2LABEL).write_text(json.dumps({a: i for i, a in enumerate(answers)}))
    feats = {}
    images = {}
    for k, tsv in enumerate(("train2014", "val2014", "test2015")):
        ids = [f"COCO_{tsv}_{i:012d}" for i in range(images_per_file)]
        images[tsv] = ids
        feats.update(write_tsv(root / f"mscoco_imgfeat/{tsv}_obj36.tsv", ids, num_boxes, feat_dim, seed + k))
    questions = {}
    qid = 1000
    half = images_per_file // 2
    for split, imgs in (
        ("train", images["train2014"]),
        ("nominival", images["val2014"][half:]),
        ("minival", images["val2014"][:half]),
        ("test", images["test2015"]),
    ):
        entries = []
        for img in imgs:
            for _ in range(questions_per_image):
                qid += 1
                e = {"question_id": qid, "img_id": img, "sent": f"What color is the thing number {qid}?"}
                if split != "test":
                    picks = rng.choice(len(answers) + 1, size=2, replace=False)
                    lab = {}
                    for p, s in zip(picks, (1.0, 0.3)):
                        lab["giraffe" if p == len(answers) else answers[p]] = s  # "giraffe": out of vocabulary
                    e.update(label=lab, answer_type="other", question_type="what color is the")
                entries.append(e)
        (root / files.SPLIT_FILES[split]).write_text(json.dumps(entries))
        questions[split] = entries
    return {"answers": answers, "features": feats, "questions": questions}
