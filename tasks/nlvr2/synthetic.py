"""A small NLVR2 data folder in LXMERT's exact formats, with learnable content (offline smoke runs).

Writes under ``--out`` what `tasks.nlvr2.data` reads: ``nlvr2/{train,valid,test}.json`` and
``nlvr2_imgfeat/{train,valid,test}_obj36.tsv`` (images as `tasks.scenes` scenes). As in NLVR2,
each *set* has four image pairs (``<split>-<set>-<pair>-img0`` / ``-img1``, the split named as
NLVR2 names it: train, dev, test1); sentence 0 of a set is judged on all four pairs with balanced
labels, sentence 1 on the first two (so consistency has sentences to group). Statements::

    The left image contains a <object>.
    The right image contains a <object>.
    Both images contain a <object>.
    Exactly one image contains a <object>.
    The left image shows more objects than the right image.
    Both images show the same number of objects.

Each needs both images and which one is left: the pair encoding the task exists for. (The object
statements also need the word matched to a region; the count statements need only the images'
contents compared, and a small from-scratch model learns them first.) Images hold 1 to
``objects`` objects. Command line::

    python -m tasks.nlvr2.synthetic --out /tmp/nlvr2-data        # then DataConfig(name="nlvr2", root=...)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from tasks.nlvr2 import data as nlvr2
from tasks.scenes import OBJECTS, Scene, SceneWriter, random_scene

TEMPLATES = (
    "The left image contains a {}.",
    "The right image contains a {}.",
    "Both images contain a {}.",
    "Exactly one image contains a {}.",
    "The left image shows more objects than the right image.",
    "Both images show the same number of objects.",
)


def truth(kind: int, obj: str, left: Scene, right: Scene) -> bool:
    """Whether statement ``TEMPLATES[kind]`` (about ``obj``, for the first four) holds for the pair."""
    a, b = left.has(obj), right.has(obj)
    n0, n1 = len(left.objects), len(right.objects)
    return (a, b, a and b, a != b, n0 > n1, n0 == n1)[kind]


def _pair(rng: np.random.Generator, kind: int, obj: str, label: bool, max_obj: int, num_boxes: int
          ) -> tuple[Scene, Scene]:  # fmt: skip
    """Two scenes for which statement (kind, obj) has truth value ``label``."""
    counts = [int(rng.integers(1, max_obj + 1)) for _ in range(2)]
    if kind >= 4:  # draw object counts until the statement has the wanted value
        while (counts[0] > counts[1], counts[0] == counts[1])[kind - 4] != label:
            counts = [int(rng.integers(1, max_obj + 1)) for _ in range(2)]
        return tuple(random_scene(rng, n, num_boxes) for n in counts)
    if kind in (0, 1):
        has = [bool(rng.random() < 0.5), bool(rng.random() < 0.5)]
        has[kind] = label
    elif kind == 2:
        has = [True, True] if label else [[True, False], [False, True], [False, False]][int(rng.integers(3))]
    else:
        has = [[True, False], [False, True]][int(rng.integers(2))] if label else [bool(rng.random() < 0.5)] * 2
    return tuple(
        random_scene(rng, n, num_boxes, include=obj if h else None, exclude=None if h else obj)
        for n, h in zip(counts, has)
    )


def write_dataset(root: str | Path, train_sets: int = 150, valid_sets: int = 40, test_sets: int = 40,
                  num_boxes: int = 10, feat_dim: int = 64, objects: int = 2, seed: int = 0) -> dict:  # fmt: skip
    """Write the data folder; return ``{"examples": {split: count}}``.

    Args:
        root: the folder to write (LXMERT's ``data`` layout).
        train_sets, valid_sets, test_sets: image sets per split (4 pairs, 6 examples each).
        num_boxes, feat_dim: regions per image and feature size (LXMERT: 36, 2,048).
        objects: the most objects in an image (each holds 1 to ``objects``; the other regions are
            background). The count statements need at least 2.
        seed: everything is drawn from it.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    writer = SceneWriter(num_boxes, feat_dim, seed=seed)
    if not 1 <= objects <= writer.max_objects:
        raise ValueError(f"objects={objects}: 1 to {writer.max_objects} objects fit {num_boxes} regions")
    n_obj = objects
    kinds = len(TEMPLATES) if objects >= 2 else 4  # counts cannot differ with one object per image
    counts = {}
    for split, n_sets in (("train", train_sets), ("valid", valid_sets), ("test", test_sets)):
        official = nlvr2.OFFICIAL[split]
        entries: list[dict] = []
        tsv = root / nlvr2.SPLIT_TSV[split]
        tsv.parent.mkdir(parents=True, exist_ok=True)
        with open(tsv, "w") as fh:
            for s in range(n_sets):
                kind, obj = int(rng.integers(kinds)), str(rng.choice(OBJECTS))
                labels = rng.permutation([True, True, False, False])  # sentence 0: balanced over its 4 pairs
                pairs = [_pair(rng, kind, obj, bool(lab), n_obj, num_boxes) for lab in labels]
                stem = [f"{official}-{s}-{p}" for p in range(4)]
                for p, (left, right) in enumerate(pairs):
                    fh.write(writer.row(f"{stem[p]}-img0", left, rng))
                    fh.write(writer.row(f"{stem[p]}-img1", right, rng))
                kind1, obj1 = int(rng.integers(kinds)), str(rng.choice(OBJECTS))
                for sentence, (k, o, on) in enumerate(((kind, obj, range(4)), (kind1, obj1, range(2)))):
                    for p in on:
                        entries.append({
                            "identifier": f"{stem[p]}-{sentence}", "img0": f"{stem[p]}-img0",
                            "img1": f"{stem[p]}-img1", "label": int(truth(k, o, *pairs[p])),
                            "sent": TEMPLATES[k].format(o), "uid": f"nlvr2_{split}_{len(entries)}",
                        })  # fmt: skip
        _write_json(root / nlvr2.SPLIT_FILES[split], entries)
        counts[split] = len(entries)
    return {"examples": counts}


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4, sort_keys=True))  # as LXMERT's process_dataset.py


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.nlvr2.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the data folder to write (use it as data.root)")
    p.add_argument("--train-sets", type=int, default=150)
    p.add_argument("--valid-sets", type=int, default=40)
    p.add_argument("--test-sets", type=int, default=40)
    p.add_argument("--num-boxes", type=int, default=10, help="regions per image (LXMERT: 36)")
    p.add_argument("--feat-dim", type=int, default=64, help="feature size (LXMERT: 2048)")
    p.add_argument("--objects", type=int, default=2, help="the most objects per image (the other regions are background)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = write_dataset(a.out, a.train_sets, a.valid_sets, a.test_sets, a.num_boxes, a.feat_dim, a.objects, a.seed)
    print(f"{a.out}: NLVR2 examples {out['examples']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
