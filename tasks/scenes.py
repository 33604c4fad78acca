"""Synthetic scenes written as LXMERT ``*_obj36.tsv`` rows, for the offline GQA and NLVR2 data sets.

A scene is a few objects, each an (object class, colour) pair with distinct objects and distinct
colours, in random order in the first region slots (a detector lists its most confident boxes
first); the other regions are background "stuff" (wall, floor, sky, grass). A region's feature is its one-hot class (object or stuff) and, for an object, its
one-hot colour, through a fixed random projection with orthonormal rows to ``feat_dim``
dimensions, plus Gaussian noise: like a detector's features, linearly decodable, but spread over
every dimension. Region slot ``i`` is the ``i``-th cell of a grid over the image (its box
jittered a little), the image size random; ``objects_id`` / ``attrs_id`` hold the class and colour
(as a detector's labels).
Questions about scenes (`tasks.gqa.synthetic`, `tasks.nlvr2.synthetic`) then need the model to
find the region a word refers to: cross-modal attention, the thing the ablations vary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.vqa.files import format_row

OBJECTS = ("cat", "dog", "car", "ball")
COLORS = ("red", "blue", "green", "yellow")
STUFF = ("wall", "floor", "sky", "grass")
CODE_DIM = len(OBJECTS) + len(COLORS) + len(STUFF)


@dataclass(frozen=True)
class Scene:
    """Objects as ``(object, colour)`` pairs and the region slot each one occupies."""

    objects: tuple[tuple[str, str], ...]
    slots: tuple[int, ...]

    def has(self, obj: str) -> bool:
        return any(o == obj for o, _ in self.objects)

    def color_of(self, obj: str) -> str:
        return next(c for o, c in self.objects if o == obj)

    def object_of(self, color: str) -> str:
        return next(o for o, c in self.objects if c == color)


def random_scene(rng: np.random.Generator, num_objects: int, num_boxes: int, include: str | None = None,
                 exclude: str | None = None) -> Scene:  # fmt: skip
    """A scene of ``num_objects`` distinct objects with distinct colours, in random order in the first
    ``num_objects`` region slots.

    Args:
        include: an object the scene must hold; exclude: one it must not.
    """
    pool = [o for o in OBJECTS if o != exclude and o != include]
    chosen = list(rng.choice(pool, num_objects - (include is not None), replace=False))
    if include is not None:
        chosen.insert(int(rng.integers(0, len(chosen) + 1)), include)
    colors = rng.choice(COLORS, num_objects, replace=False)
    # Objects take the first region slots, as a detector lists its most confident boxes first.
    return Scene(tuple((str(o), str(c)) for o, c in zip(chosen, colors)), tuple(range(num_objects)))


class SceneWriter:
    """Writes scenes as TSV rows: one fixed projection per writer (the same for every split).

    Args:
        num_boxes: regions per image (LXMERT: 36).
        feat_dim: feature dimension (LXMERT: 2,048); at least `CODE_DIM`.
        noise: standard deviation of the Gaussian noise on every feature.
        seed: seed of the projection.
    """

    def __init__(self, num_boxes: int, feat_dim: int, noise: float = 0.05, seed: int = 0):
        if feat_dim < CODE_DIM:
            raise ValueError(f"feat_dim={feat_dim} must be >= {CODE_DIM} (one-hot class, colour, stuff)")
        if num_boxes < 1:
            raise ValueError(f"num_boxes={num_boxes} must be >= 1")
        self.num_boxes, self.feat_dim, self.noise = num_boxes, feat_dim, noise
        # distinct colours per scene, and one object class always absent (questions about absence)
        self.max_objects = min(num_boxes, len(COLORS), len(OBJECTS) - 1)
        q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(feat_dim, CODE_DIM)))
        # (CODE_DIM, F) orthonormal rows, scaled so a one-hot code maps to norm ~sqrt(F / CODE_DIM)
        self.projection = (q.T * np.sqrt(feat_dim / CODE_DIM)).astype(np.float32)

    def row(self, img_id: str, scene: Scene, rng: np.random.Generator) -> str:
        """The TSV line of one image."""
        r, n_obj, n_col = self.num_boxes, len(OBJECTS), len(COLORS)
        code = np.zeros((r, CODE_DIM), np.float32)
        stuff = rng.integers(len(STUFF), size=r)
        code[np.arange(r), n_obj + n_col + stuff] = 1.0
        obj_id = n_obj + stuff  # detector labels: background regions get the stuff classes
        attr_id = np.full(r, n_col)
        for (obj, color), slot in zip(scene.objects, scene.slots):
            o, c = OBJECTS.index(obj), COLORS.index(color)
            code[slot] = 0.0
            code[slot, o] = code[slot, n_obj + c] = 1.0
            obj_id[slot], attr_id[slot] = o, c
        feats = code @ self.projection + rng.normal(0, self.noise, (r, self.feat_dim)).astype(np.float32)
        h, w = int(rng.integers(240, 640)), int(rng.integers(240, 640))
        side = int(np.ceil(np.sqrt(r)))
        cell = np.stack([np.arange(r) % side, np.arange(r) // side], 1) / side  # (r, 2) top-left, in [0, 1)
        corners = np.concatenate([cell, cell + 1.0 / side], 1) + rng.uniform(-0.02, 0.02, (r, 4)) / side
        boxes = np.clip(corners, 0, 1) * np.array([w, h, w, h])
        conf = np.sort(rng.uniform(0.2, 1.0, r))[::-1]  # objects first: confidences descending
        return format_row(img_id, h, w, boxes.astype(np.float32), feats, obj_id, conf, attr_id, conf)
