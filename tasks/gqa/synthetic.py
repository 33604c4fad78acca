"""A small GQA data folder in LXMERT's exact formats, with learnable content (offline smoke runs).

Writes under ``--out`` what `tasks.gqa.data` reads: ``gqa/{train,valid,testdev,submit}.json``,
``gqa/trainval_{ans2label,label2ans}.json`` and ``vg_gqa_imgfeat/{vg_gqa,gqa_testdev}_obj36.tsv``
(images as `tasks.scenes` scenes). Questions, GQA-style, about one image each::

    What color is the <object>?          -> the colour             (find the object, read its colour)
    Which object is <colour>?            -> the object             (find the colour, read the object)
    Is there a <object> in the picture?  -> yes / no (balanced)
    Is the <object> <colour>?            -> yes / no (balanced)

10 answers (yes, no, 4 colours, 4 objects). Every answer needs the image (the majority answer
alone gets about a quarter right). Question ids are 8-digit strings with leading zeros, image ids
Visual Genome-like numbers (GQA test images ``n...``), as in GQA. Command line::

    python -m tasks.gqa.synthetic --out /tmp/gqa-data            # then DataConfig(name="gqa", root=...)
    python -m tasks.gqa.synthetic --out DIR --num-boxes 36 --feat-dim 2048   # LXMERT's sizes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from tasks.gqa import data as gqa
from tasks.scenes import COLORS, OBJECTS, Scene, SceneWriter, random_scene

ANSWERS = ("yes", "no", *COLORS, *OBJECTS)


def _question(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    kind = int(rng.integers(4))
    obj, color = scene.objects[int(rng.integers(len(scene.objects)))]
    if kind == 0:
        return f"What color is the {obj}?", color
    if kind == 1:
        return f"Which object is {color}?", obj
    if kind == 2:
        if rng.random() < 0.5:
            return f"Is there a {obj} in the picture?", "yes"
        absent = [o for o in OBJECTS if not scene.has(o)]
        return f"Is there a {absent[int(rng.integers(len(absent)))]} in the picture?", "no"
    if rng.random() < 0.5:
        return f"Is the {obj} {color}?", "yes"
    other = [c for c in COLORS if c != color]
    return f"Is the {obj} {other[int(rng.integers(len(other)))]}?", "no"


def write_dataset(root: str | Path, train_images: int = 300, valid_images: int = 60, testdev_images: int = 60,
                  submit_images: int = 20, questions_per_image: int = 5, num_boxes: int = 10, feat_dim: int = 64,
                  objects: int = 2, seed: int = 0, pretraining: bool = True) -> dict:  # fmt: skip
    """Write the data folder; return counts ``{split: questions}`` and the answer list.

    Args:
        root: the folder to write (LXMERT's ``data`` layout).
        train_images, valid_images, submit_images: images in ``vg_gqa_obj36.tsv`` per split.
        testdev_images: images in ``gqa_testdev_obj36.tsv``.
        questions_per_image: questions about each image.
        num_boxes, feat_dim: regions per image and feature size (LXMERT: 36, 2,048).
        objects: objects per image (the other regions are background).
        seed: everything is drawn from it.
        pretraining: also write LXMERT's pretraining files over the training images
            (``lxmert/vgnococo.json``, ``lxmert/all_ans.json``; :func:`_write_pretraining`).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    writer = SceneWriter(num_boxes, feat_dim, seed=seed)
    if not 1 <= objects <= writer.max_objects:
        raise ValueError(f"objects={objects}: 1 to {writer.max_objects} objects fit {num_boxes} regions")
    n_obj = objects
    images = {
        "train": [str(1000000 + i) for i in range(train_images)],
        "valid": [str(2000000 + i) for i in range(valid_images)],
        "submit": [f"n{300000 + i}" for i in range(submit_images)],
        "testdev": [f"n{400000 + i}" for i in range(testdev_images)],
    }
    scenes = {img: random_scene(rng, n_obj, num_boxes) for ids in images.values() for img in ids}
    for rel, splits in ((gqa.VG_TSV, ("train", "valid", "submit")), (gqa.TESTDEV_TSV, ("testdev",))):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(root / rel, "w") as fh:
            for split in splits:
                for img in images[split]:
                    fh.write(writer.row(img, scenes[img], rng))
    _write_json(root / gqa.LABEL2ANS, list(ANSWERS))
    _write_json(root / gqa.ANS2LABEL, {a: i for i, a in enumerate(ANSWERS)})
    counts, qid = {}, 0
    for split in ("train", "valid", "testdev", "submit"):
        entries = []
        for img in images[split]:
            for _ in range(questions_per_image):
                qid += 1
                sent, answer = _question(rng, scenes[img])
                entry = {"img_id": img, "question_id": f"{qid:08d}", "sent": sent}
                if split != "submit":  # GQA's submission questions come without answers
                    entry["label"] = {answer: 1.0}
                entries.append(entry)
        _write_json(root / gqa.SPLIT_FILES[split], entries)
        counts[split] = len(entries)
        if split == "train" and pretraining:
            _write_pretraining(root, images["train"], scenes, entries)
    return {"questions": counts, "answers": list(ANSWERS)}


def _write_pretraining(root: Path, images: list[str], scenes: dict[str, Scene], questions: list[dict]) -> None:
    """LXMERT's pretraining source ``lxmert/vgnococo.json`` over the training images (a caption under
    ``vg``, the image's GQA questions under ``gqa`` with their labels) and the QA answer table
    ``lxmert/all_ans.json``, so that ``pretrain.corpus=lxmert pretrain.sources=vgnococo`` pretrains on
    this folder's ``vg_gqa_obj36.tsv`` (and the GQA head can start from the pretraining QA head)."""
    from tasks.pretrain.lxmert import ANSWERS_FILE

    by_image: dict[str, list[dict]] = {}
    for q in questions:
        by_image.setdefault(q["img_id"], []).append(q)
    entries = []
    for img in images:
        caption = " and ".join(f"a {color} {obj}" for obj, color in scenes[img].objects).capitalize() + "."
        qs = by_image.get(img, [])
        entries.append({"img_id": img, "sentf": {"vg": [caption], "gqa": [q["sent"] for q in qs]},
                        "labelf": {"gqa": [q["label"] for q in qs]}})
    _write_json(root / "lxmert/vgnococo.json", entries)
    _write_json(root / ANSWERS_FILE, [{"ans": a, "dsets": ["gqa"]} for a in ANSWERS])


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4, sort_keys=True))  # as LXMERT's process_data.py


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.gqa.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the data folder to write (use it as data.root)")
    p.add_argument("--train-images", type=int, default=300)
    p.add_argument("--valid-images", type=int, default=60)
    p.add_argument("--testdev-images", type=int, default=60)
    p.add_argument("--submit-images", type=int, default=20)
    p.add_argument("--questions-per-image", type=int, default=5)
    p.add_argument("--num-boxes", type=int, default=10, help="regions per image (LXMERT: 36)")
    p.add_argument("--feat-dim", type=int, default=64, help="feature size (LXMERT: 2048)")
    p.add_argument("--objects", type=int, default=2, help="objects per image (the other regions are background)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = write_dataset(a.out, a.train_images, a.valid_images, a.testdev_images, a.submit_images,
                        a.questions_per_image, a.num_boxes, a.feat_dim, a.objects, a.seed)  # fmt: skip
    print(f"{a.out}: GQA questions {out['questions']}, {len(out['answers'])} answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
