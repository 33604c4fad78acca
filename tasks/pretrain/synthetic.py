"""The offline pretraining corpus: easy-VQA-like scenes drawn from a seed, described in words.

Every signal LXMERT's objectives need, generated deterministically (same seed, same arrays):

* **Images**: 64 x 64 RGB, one shape (rectangle, circle or upright equilateral triangle) in one of
  easy-VQA's 8 colours on a light background tinted in [230, 255] per channel, 8-32 pixels across,
  anywhere in the frame, rendered at 4x and box-filtered (anti-aliased like easy-VQA's images).
  One shape per image is deliberate: the region features come from easy-VQA's own extractor
  (:func:`tasks.easyvqa.featurize`, standardised with the easy-VQA store's constants, projected in
  ``vqa_like`` mode), whose object region is the tight box of all foreground, i.e. one object. That
  keeps pretraining and fine-tuning features identical in layout and meaning, which is what lets
  the pretrained encoder transfer to easy-VQA.
* **Detected labels per region** (the detector's ``objects_id`` / ``attrs_id``): a region is
  labelled with the shape (``rectangle | circle | triangle``; 0 = ``background``) and its colour
  (0 = ``none``) when it holds at least :data:`LABEL_MIN_SHARE` of the shape's area (the object
  region holds all of it; grid cells hold parts); confidences are 1 (ground truth, not a detector).
* **Captions** (2 per image) from templates over shape, colour, size (small / medium / large by the
  longer side) and position (left / center / right, top / middle / bottom), e.g. "a large teal
  circle at the top", "there is a red triangle in the bottom left". Every caption names the shape.
* **Questions** (2 per image) with one answer each: what shape / what colour / presence of a shape
  or a colour, with and without negation (easy-VQA's question forms), plus size and position
  questions easy-VQA does not ask. Answers: easy-VQA's 13 (same order) + ``small, medium, large``.
* **Matching pairs** are made per batch (``tasks.pretrain.corpus``) from the captions: a mismatched
  caption comes from an image with a different shape, so it is really false. Questions take no
  part in matching (their ``match_labels`` are -1): a presence question often names a shape that is
  not in its image ("is there a circle?" on a square, answer "no"), so a question whose words
  disagree with the image is no evidence of a mismatch, and the matching label would contradict
  the words it is judged by.

Layout: ``<cache>/pretrain/synthetic-v<FORMAT>-<features>-n<N>+<E>-s<seed>-<tokenizer>-T<T>/`` with
``meta.json`` (vocabularies), ``images/{train,eval}/`` (image stores) and ``{train,eval}/`` (sentence
parts), as ``tasks.pretrain.corpus`` documents.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tasks import easyvqa
from tasks import store as st
from tasks.config import DataConfig
from tasks.tokenization import encode_fixed, get_tokenizer

FORMAT_VERSION = 2
SUPERSAMPLE = 4
MIN_SIZE, MAX_SIZE = 8, 32  # easy-VQA's shapes span 8-32 pixels
SHAPES = easyvqa.SHAPES  # ("rectangle", "circle", "triangle")
COLORS = easyvqa.PALETTE_NAMES
SIZES = ("small", "medium", "large")
OBJECT_NAMES = ("background", *SHAPES)
ATTR_NAMES = ("none", *COLORS)
#: A region is labelled with the shape when it holds at least this share of the shape's area.
LABEL_MIN_SHARE = 0.1
CAPTIONS_PER_IMAGE = 2
QUESTIONS_PER_IMAGE = 2

CAPTIONS = (
    "a {color} {shape}",
    "a {size} {color} {shape}",
    "a {color} {shape} on the {hpos}",
    "a {size} {shape} at the {vpos}",
    "there is a {color} {shape} in the {place}",
    "the {shape} is {color} and {size}",
    "an image with a {size} {shape}",
    "a {shape} colored {color}",
)
_WHAT_SHAPE = ("what shape is in the image?", "what shape is present?", "what shape does the image contain?",
               "what is the {color} shape?")  # fmt: skip
_WHAT_COLOR = ("what color is the shape?", "what color is the {shape}?", "what is the color of the {shape}?",
               "what is the color of the shape?")  # fmt: skip
_HAS = ("is there a {x}?", "is there a {x} in the image?", "does the image contain a {x}?", "is a {x} present?")
_HAS_NOT = ("is there not a {x}?", "is there not a {x} in the image?", "does the image not contain a {x}?",
            "is no {x} present?")  # fmt: skip
_SIZE = ("what size is the {shape}?", "how big is the {color} shape?")
_SIZE_YN = ("is the {shape} {size_q}?",)
_POS_YN = ("is the {shape} on the {hpos_q}?", "is the {color} shape at the {vpos_q}?")
QUESTION_KINDS = ("shape", "color", "has_shape", "has_color", "size", "size_yn", "position")


def answers() -> list[str]:
    """The image-QA answers: easy-VQA's 13, in its order, then the sizes."""
    return [*easyvqa.answers(), *SIZES]


# ------------------------------------------------------------------------------------------ scenes
def draw_scenes(n: int, seed: int) -> dict[str, np.ndarray]:
    """The scene parameters of ``n`` images from ``seed``.

    Returns:
        ``shape`` (n,) int (index into :data:`SHAPES`), ``color`` (n,) int, ``bg`` (n, 3) uint8,
        ``box`` (n, 4) float32 pixel box ``(x0, y0, x1, y1)`` of the shape.
    """
    rng = np.random.default_rng([seed, 0xC0FFEE])
    shape = rng.integers(0, len(SHAPES), n)
    color = rng.integers(0, len(COLORS), n)
    bg = rng.integers(230, 256, (n, 3)).astype(np.uint8)
    w = rng.uniform(MIN_SIZE, MAX_SIZE, n)
    h = np.where(shape == 0, rng.uniform(MIN_SIZE, MAX_SIZE, n), w)  # circles are round
    h = np.where(shape == 2, w * np.sqrt(3) / 2, h)  # equilateral triangles
    x0 = rng.uniform(0, 1, n) * (easyvqa.IMAGE_SIZE - w)
    y0 = rng.uniform(0, 1, n) * (easyvqa.IMAGE_SIZE - h)
    box = np.stack([x0, y0, x0 + w, y0 + h], 1).astype(np.float32)
    return {"shape": shape, "color": color, "bg": bg, "box": box}


def coverage_maps(scenes: dict[str, np.ndarray], chunk: int = 256) -> np.ndarray:
    """(n, 64, 64) float32 fraction of each pixel the shape covers (``SUPERSAMPLE``² samples)."""
    n = len(scenes["shape"])
    size = easyvqa.IMAGE_SIZE
    u = (np.arange(size * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    out = np.empty((n, size, size), np.float32)
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        x0, y0, x1, y1 = (scenes["box"][sl, k][:, None, None] for k in range(4))
        kind = scenes["shape"][sl][:, None, None]
        x, y = u[None, None, :], u[None, :, None]
        inside_box = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        ellipse = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        # Upright triangle: apex at the top centre, base along the bottom of the box.
        triangle = inside_box & (np.abs(x - cx) <= rx * (y - y0) / np.maximum(y1 - y0, 1e-6))
        mask = np.where(kind == 0, inside_box, np.where(kind == 1, ellipse, triangle))
        out[sl] = mask.reshape(len(mask), size, SUPERSAMPLE, size, SUPERSAMPLE).mean((2, 4))
    return out


def render(scenes: dict[str, np.ndarray], cover: np.ndarray) -> np.ndarray:
    """(n, 64, 64, 3) uint8 images: background blended with the shape's colour by its coverage."""
    colour = easyvqa.PALETTE[scenes["color"]][:, None, None, :]
    bg = scenes["bg"].astype(np.float32)[:, None, None, :]
    a = cover[..., None]
    return np.round(bg * (1 - a) + colour * a).astype(np.uint8)


def attributes(scenes: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Words for each scene: ``shape``, ``color``, ``size``, ``hpos``, ``vpos``, ``place``."""
    box = scenes["box"]
    side = np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
    size = np.digitize(side, [16, 24])  # thirds of the 8-32 range
    third = easyvqa.IMAGE_SIZE / 3
    hpos = np.digitize((box[:, 0] + box[:, 2]) / 2, [third, 2 * third])
    vpos = np.digitize((box[:, 1] + box[:, 3]) / 2, [third, 2 * third])
    h_words, v_words = ("left", "center", "right"), ("top", "middle", "bottom")
    place = [("center" if (v, h) == (1, 1) else h_words[h] if v == 1 else v_words[v] if h == 1
              else f"{v_words[v]} {h_words[h]}") for v, h in zip(vpos, hpos)]  # fmt: skip
    return {
        "shape": [SHAPES[s] for s in scenes["shape"]],
        "color": [COLORS[c] for c in scenes["color"]],
        "size": [SIZES[s] for s in size],
        "hpos": [h_words[h] for h in hpos],
        "vpos": [v_words[v] for v in vpos],
        "place": place,
    }


def sentences(scenes: dict[str, np.ndarray], seed: int) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Captions and questions per scene.

    Returns:
        ``texts`` (N,), ``image_index`` (N,) int32, ``answers`` (N,) (empty for captions) and
        ``kind`` (N,) int8 (0 caption, 1 question), N = n * (captions + questions per image).
    """
    rng = np.random.default_rng([seed, 0x5E17])
    words = attributes(scenes)
    n = len(scenes["shape"])
    texts: list[str] = []
    index: list[int] = []
    ans: list[str] = []
    kind: list[int] = []
    for i in range(n):
        w = {k: v[i] for k, v in words.items()}
        for c in rng.choice(len(CAPTIONS), CAPTIONS_PER_IMAGE, replace=False):
            texts.append(CAPTIONS[c].format(**w))
            index.append(i)
            ans.append("")
            kind.append(0)
        for _ in range(QUESTIONS_PER_IMAGE):
            q, a = _question(rng, w)
            texts.append(q)
            index.append(i)
            ans.append(a)
            kind.append(1)
    return texts, np.asarray(index, np.int32), ans, np.asarray(kind, np.int8)


def _question(rng: np.random.Generator, w: dict[str, str]) -> tuple[str, str]:
    qkind = QUESTION_KINDS[rng.integers(len(QUESTION_KINDS))]
    pick = rng.integers  # short alias: every template choice is one draw
    if qkind == "shape":
        return _WHAT_SHAPE[pick(len(_WHAT_SHAPE))].format(**w), w["shape"]
    if qkind == "color":
        return _WHAT_COLOR[pick(len(_WHAT_COLOR))].format(**w), w["color"]
    if qkind in ("has_shape", "has_color"):
        true = rng.random() < 0.5
        pool = SHAPES if qkind == "has_shape" else COLORS
        value = w["shape" if qkind == "has_shape" else "color"]
        named = value if true else [p for p in pool if p != value][pick(len(pool) - 1)]
        x = named if qkind == "has_shape" else f"{named} shape"
        negated = rng.random() < 0.5
        forms = _HAS_NOT if negated else _HAS
        return forms[pick(len(forms))].format(x=x), "yes" if true != negated else "no"
    if qkind == "size":
        return _SIZE[pick(len(_SIZE))].format(**w), w["size"]
    if qkind == "size_yn":
        asked = SIZES[pick(len(SIZES))]
        return _SIZE_YN[0].format(size_q=asked, **w), "yes" if asked == w["size"] else "no"
    horizontal = rng.random() < 0.5
    if horizontal:
        asked = ("left", "right")[pick(2)]
        return _POS_YN[0].format(hpos_q=asked, **w), "yes" if asked == w["hpos"] else "no"
    asked = ("top", "bottom")[pick(2)]
    return _POS_YN[1].format(vpos_q=asked, **w), "yes" if asked == w["vpos"] else "no"


def region_labels(scenes: dict[str, np.ndarray], cover: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detected labels per region: shape (0 = background) and colour (0 = none).

    Args:
        scenes: From :func:`draw_scenes`.
        cover: (n, 64, 64) shape coverage.
        boxes: (n, R, 4) normalised region boxes (from the feature extractor).

    Returns:
        ``objects_id`` (n, R) int64 and ``attrs_id`` (n, R) int64.
    """
    pixel_boxes = boxes * easyvqa.IMAGE_SIZE
    inside = easyvqa.box_sums(cover[:, None], pixel_boxes.astype(np.float32))[..., 0]  # (n, R)
    share = inside / np.maximum(cover.sum((1, 2)), 1e-6)[:, None]
    has = share >= LABEL_MIN_SHARE
    obj = np.where(has, scenes["shape"][:, None] + 1, 0)
    attr = np.where(has, scenes["color"][:, None] + 1, 0)
    return obj.astype(np.int64), attr.astype(np.int64)


# ------------------------------------------------------------------------------------- the store
def corpus_dir(cache_dir: str | Path, data: DataConfig, n: int, n_eval: int, seed: int, max_seq_len: int) -> Path:
    """Where the corpus for these settings lives (every setting that changes its arrays is in the name)."""
    mode = f"compact-g{data.grid}" if data.features == "compact" else "vqa_like"
    tok = get_tokenizer(data.tokenizer).key
    # Keyed by the easy-VQA feature store it takes its standardisation from (whose name is its key).
    features = st.content_key(easyvqa._feature_dir(data.resolved()).name)[:8]
    name = f"synthetic-v{FORMAT_VERSION}-{mode}-{features}-n{n}+{n_eval}-s{seed}-{tok}-T{max_seq_len}"
    return Path(cache_dir) / "pretrain" / name


def build(tmp: Path, data: DataConfig, feature_store: Path, n: int, n_eval: int, seed: int, max_seq_len: int) -> dict:
    """Write the corpus into the empty directory ``tmp``; returns its ``meta.json``.

    Args:
        tmp: Target directory (renamed into place by ``tasks.store.build_once``).
        data: The fine-tuning data (easy-VQA): features mode, grid, tokenizer.
        feature_store: The prepared easy-VQA feature store (its standardisation constants are used).
        n, n_eval: Training and held-out images.
        seed: The corpus seed.
        max_seq_len: Tokens per sentence.
    """
    t0 = time.perf_counter()
    fmeta = st.read_json(feature_store / st.META)
    mean = np.asarray(fmeta["feature_mean"], np.float32)
    std = np.asarray(fmeta["feature_std"], np.float32)
    proj = easyvqa.projection() if data.features == "vqa_like" else None
    tok = get_tokenizer(data.tokenizer)
    vocab = answers()
    ans2id = {a: i for i, a in enumerate(vocab)}
    counts = {}
    for split, count, sub in (("train", n, 1), ("eval", n_eval, 2)):
        if count == 0:
            continue
        scenes = draw_scenes(count, seed * 7919 + sub)
        cover = coverage_maps(scenes)
        images = render(scenes, cover)
        desc, boxes = easyvqa.featurize(images, data.features, data.grid)
        obj, attr = region_labels(scenes, cover, boxes)
        z = (desc - mean) / std
        feats = z @ proj if proj is not None else z
        img_dir = tmp / "images" / split
        img_dir.mkdir(parents=True)
        for name, arr in (("feats", feats.astype(np.float32)), ("boxes", boxes), ("objects_id", obj),
                          ("attrs_id", attr), ("objects_conf", np.ones(obj.shape, np.float32)),
                          ("attrs_conf", np.ones(attr.shape, np.float32)),
                          ("image_key", scenes["shape"].astype(np.int64))):  # fmt: skip
            st.save(img_dir, name, arr)
        st.write_json(img_dir / st.META, {"image_ids": list(range(count)), "split": split,
                                          "scenes": {k: v.tolist() for k, v in scenes.items()}})
        texts, index, ans, kind = sentences(scenes, seed * 7919 + sub)
        ids, lengths = encode_fixed(tok, texts, max_seq_len)
        part = tmp / split
        part.mkdir()
        label_idx = np.array([[ans2id[a] if a else -1] for a in ans], np.int32)
        arrays = {"input_ids": ids, "lengths": lengths, "image_index": index,
                  "store_id": np.zeros(len(texts), np.int8), "label_idx": label_idx,
                  "label_score": (label_idx >= 0).astype(np.float32), "kind": kind}  # fmt: skip
        for name, arr in arrays.items():
            st.save(part, name, arr)
        st.write_json(part / "texts.json", texts)
        st.write_json(part / st.META, {"stores": [f"images/{split}"], "sentences": len(texts), "images": count,
                                       "truncated": int((lengths > max_seq_len).sum())})
        counts[split] = {"images": count, "sentences": len(texts)}
    mask_id, vocab_size, first_word = special_ids(tok)
    return {
        "corpus": "synthetic",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "splits": counts,
        "answers": vocab,
        "object_names": list(OBJECT_NAMES),
        "attr_names": list(ATTR_NAMES),
        "num_object_labels": len(OBJECT_NAMES),
        "num_attr_labels": len(ATTR_NAMES),
        # Matching pairs are captions: questions often name absent shapes (tasks.pretrain.corpus).
        "match_kinds": [0],
        "mask_id": mask_id,
        "vocab_size": vocab_size,
        "random_word_min": first_word,
        "max_seq_len": max_seq_len,
        "features": data.features,
        "grid": data.grid,
        "feature_store": str(feature_store),
        "tokenizer": tok.name,
        "seconds": time.perf_counter() - t0,
    }


def special_ids(tok) -> tuple[int, int, int]:
    """``[MASK]``'s id, the vocabulary size, and the first id of a real word (random replacement
    words are drawn from there on: never ``[PAD]``, ``[CLS]``, ``[unused7]``, ...)."""
    words = _vocab_words(tok)
    ids = tok.encode(["[MASK]"])[0]  # [CLS] [MASK] [SEP]
    mask_id = ids[1] if len(ids) == 3 else words.index("[MASK]") if "[MASK]" in words else 103
    first = next((i for i, w in enumerate(words) if not (w.startswith("[") and w.endswith("]"))), 0)
    return int(mask_id), len(words), int(first)


def _vocab_words(tok) -> list[str]:
    """The tokenizer's vocabulary in id order (WordPiece vocab.txt, or a HuggingFace tokenizer's)."""
    from tasks.tokenization import BERT_ALIASES, bundled_vocab

    path = bundled_vocab() if tok.name in BERT_ALIASES else Path(tok.name).expanduser()
    if path.is_dir():
        path = path / "vocab.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8").splitlines()
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tok.name).get_vocab()
    return [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def write_vocab(path: str | Path) -> Path:
    """A small WordPiece ``vocab.txt`` with every word of this corpus and of easy-VQA's questions.

    For tests and benchmarks: ``DataConfig(tokenizer=<this file>)`` with ``vocab_size`` ~ 100
    makes the MLM head and the word embeddings tiny (with bert-base-uncased they are 30,522 rows).
    """
    import json
    import re

    words = set(answers()) | set(COLORS) | set(SHAPES) | {"left", "right", "top", "bottom", "middle", "center"}
    templates = [*CAPTIONS, *_WHAT_SHAPE, *_WHAT_COLOR, *_HAS, *_HAS_NOT, *_SIZE, *_SIZE_YN, *_POS_YN]
    texts = [re.sub(r"\{[a-z_]+\}", " ", t) for t in templates]
    texts += [q[0] for q in json.loads((easyvqa.package_data() / "train" / "questions.json").read_text())]
    for text in texts:
        words.update(re.findall(r"[a-z]+", text.lower()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", *sorted(words)]) + "\n")
    return path
