"""Caption retrieval sets: images with region features, captions, and which image each caption describes.

Two sources, one on-disk layout (a store directory, built once and atomically, memory-mapped):

* **synthetic** (offline): scenes from the pretraining corpus' generator
  (:mod:`tasks.pretrain.synthetic`: one shape, colour, size and place per 64 x 64 image, featurised
  by easy-VQA's extractor), drawn from a random stream the corpus never uses (its training and
  evaluation images come from streams 1 and 2, these from 3), and kept only when no other image of
  the set has the same shape, colour, size and place: every caption names all four, so it is true
  of exactly one image and the ground truth is unambiguous. At most 8 x 3 x 3 x 9 = 648 images.
* **files** (COCO / Flickr30k): captions in LXMERT's or VOLTA's files, region features in an
  LXMERT ``*_obj36.tsv`` (converted once by :func:`tasks.vqa.convert.convert_tsv`).

  ================  =====================================================================
  captions          one of
  ================  =====================================================================
  LXMERT ``.json``  a list of ``{"img_id": str, "sentf": {source: [caption, ...]}, ...}``, e.g.
                    ``data/lxmert/mscoco_minival.json`` (https://github.com/airsplay/lxmert);
                    captions are ``sentf[caption_source]`` (``mscoco``); images without any
                    are left out
  VOLTA ``.jsonl``  one JSON object per line, ``{"sentences": [caption, ...]}`` with ``"id"`` (COCO)
                    or ``"img_path": "<id>.jpg"`` (Flickr30k), e.g. VOLTA's
                    ``annotations/test_ann.jsonl`` (https://github.com/e-bug/volta/tree/main/data)
  ================  =====================================================================

  features: an LXMERT ``*_obj36.tsv`` (``img_id, img_h, img_w, objects_id, objects_conf, attrs_id,
  attrs_conf, num_boxes, boxes, features``, arrays base64-encoded). A caption file's image id
  matches a TSV ``img_id`` that equals it, or, failing that, whose trailing number equals it
  (``391895`` -> ``COCO_val2014_000000391895``). VOLTA's own LMDB feature files are not read:
  their records are pickled, and nothing loaded from disk may execute code; extract features to
  the TSV layout instead.

Store layout: ``meta.json`` (image ids, captions file and features signature, tokenizer, counts),
``input_ids.npy`` (N, T) int32, ``lengths.npy`` (N,) int32 (before truncation), ``text_image.npy``
(N,) int32 (row of each caption's image), ``image_rows.npy`` (M,) int64 (each image's row in the
feature store), ``texts.json``; the synthetic set keeps its own feature store under ``images/``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks import store as st
from tasks.tokenization import encode_fixed, get_tokenizer

FORMAT_VERSION = 1
LXMERT_URL = "https://github.com/airsplay/lxmert#pre-training"
VOLTA_URL = "https://github.com/e-bug/volta/tree/main/data"
#: Caption templates of the synthetic set: each names shape, colour, size and place.
SYNTHETIC_CAPTIONS = (
    "a {size} {color} {shape} in the {place}",
    "there is a {size} {shape} colored {color} in the {place}",
    "the {shape} in the {place} is {size} and {color}",
)
#: The synthetic corpus' random streams: training images 1, evaluation images 2; retrieval uses 3.
SYNTHETIC_STREAM = 3
_TRAILING_NUMBER = re.compile(r"(\d+)$")


class CaptionFormatError(ValueError):
    """A caption file is malformed; the message names the file and line or entry."""


class MissingImagesError(LookupError):
    """Captioned images are missing from the feature file; the message names both files."""


@dataclass
class RetrievalSet:
    """Images (region features) and captions, with the image each caption describes.

    Attributes:
        path: The store directory.
        feats: (M, R, F) float32 region features (memory-mapped; rows selected by ``image_rows``).
        boxes: (M, R, 4) float32 boxes in [0, 1].
        image_rows: (N_images,) rows of this set's images in ``feats`` / ``boxes``.
        input_ids: (N_texts, T) int32 token ids.
        lengths: (N_texts,) int32 token counts (before truncation).
        text_image: (N_texts,) int32: the image (0..N_images-1) each caption describes.
        image_ids: The images' ids.
        texts: The captions.
        meta: The store's ``meta.json``.
    """

    path: Path
    feats: np.ndarray
    boxes: np.ndarray
    image_rows: np.ndarray
    input_ids: np.ndarray
    lengths: np.ndarray
    text_image: np.ndarray
    image_ids: list[str]
    texts: list[str]
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> RetrievalSet:
        path = Path(path)
        if not st.is_complete(path):
            raise FileNotFoundError(f"{path} is not a prepared retrieval set (no {st.META}); build it with "
                                    "tasks.retrieval.prepare_synthetic or prepare_files")  # fmt: skip
        meta = st.read_json(path / st.META)
        feature_store = Path(meta["feature_store"])
        if not feature_store.is_absolute():
            feature_store = path / feature_store
        return cls(path=path, feats=st.open_array(feature_store, "feats"), boxes=st.open_array(feature_store, "boxes"),
                   image_rows=np.asarray(st.open_array(path, "image_rows")),
                   input_ids=st.open_array(path, "input_ids"), lengths=st.open_array(path, "lengths"),
                   text_image=np.asarray(st.open_array(path, "text_image")), image_ids=list(meta["image_ids"]),
                   texts=st.read_json(path / "texts.json"), meta=meta)  # fmt: skip

    @property
    def n_images(self) -> int:
        return len(self.image_rows)

    @property
    def n_texts(self) -> int:
        return len(self.text_image)

    @property
    def visual_feat_dim(self) -> int:
        return int(self.feats.shape[2])

    @property
    def max_seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def subset(self, n_images: int) -> RetrievalSet:
        """The first ``n_images`` images and their captions: a smaller candidate set (e.g. COCO's
        1K test images out of 5K)."""
        if not 1 <= n_images <= self.n_images:
            raise ValueError(f"n_images={n_images} must lie in [1, {self.n_images}]")
        keep = np.flatnonzero(self.text_image < n_images)
        return RetrievalSet(self.path, self.feats, self.boxes, self.image_rows[:n_images], self.input_ids[keep],
                            self.lengths[keep], self.text_image[keep], self.image_ids[:n_images],
                            [self.texts[i] for i in keep], self.meta)  # fmt: skip

    def text_batch(self, idx: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``token_type_ids`` (P, T) int64 of texts ``idx``."""
        idx = np.asarray(idx, np.int64)
        ids = torch.from_numpy(np.asarray(self.input_ids[idx], np.int64))
        t = ids.shape[1]
        n = torch.from_numpy(np.minimum(np.asarray(self.lengths[idx], np.int64), t))
        mask = (torch.arange(t)[None, :] < n[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    def image_batch(self, idx: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """``visual_feats`` (P, R, F) and ``visual_pos`` (P, R, 4) float32 of images ``idx``."""
        rows = self.image_rows[np.asarray(idx, np.int64)]
        return {"visual_feats": torch.from_numpy(np.take(self.feats, rows, axis=0).astype(np.float32)),
                "visual_pos": torch.from_numpy(np.take(self.boxes, rows, axis=0).astype(np.float32))}  # fmt: skip

    def pair_batch(self, image_idx: torch.Tensor | np.ndarray, text_idx: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """Model inputs of the pairs (image ``image_idx[p]``, text ``text_idx[p]``)."""
        return {**self.text_batch(text_idx), **self.image_batch(image_idx)}


# ------------------------------------------------------------------------------------------ writing
def _write_texts(tmp: Path, texts: list[str], text_image: np.ndarray, tokenizer: str, max_seq_len: int) -> dict:
    tok = get_tokenizer(tokenizer)
    ids, lengths = encode_fixed(tok, texts, max_seq_len)
    st.save(tmp, "input_ids", ids)
    st.save(tmp, "lengths", lengths)
    st.save(tmp, "text_image", np.asarray(text_image, np.int32))
    st.write_json(tmp / "texts.json", texts)
    return {"tokenizer": tok.name, "max_seq_len": max_seq_len, "truncated": int((lengths > max_seq_len).sum())}


def synthetic_captions(words: dict[str, list[str]], per_image: int) -> tuple[list[str], np.ndarray]:
    """``per_image`` captions of each scene from :data:`SYNTHETIC_CAPTIONS` (in order).

    Args:
        words: :func:`tasks.pretrain.synthetic.attributes` of the scenes.
        per_image: Captions per image (1 to 3).

    Returns:
        (captions, text_image (N,) int32).
    """
    if not 1 <= per_image <= len(SYNTHETIC_CAPTIONS):
        raise ValueError(f"captions per image must lie in [1, {len(SYNTHETIC_CAPTIONS)}], got {per_image}")
    texts, owner = [], []
    for i in range(len(words["shape"])):
        w = {k: v[i] for k, v in words.items()}
        for template in SYNTHETIC_CAPTIONS[:per_image]:
            texts.append(template.format(**w))
            owner.append(i)
    return texts, np.asarray(owner, np.int32)


def synthetic_dir(cache_dir: str | Path, features: str, grid: int, n_images: int, per_image: int, seed: int,
                  tokenizer: str, max_seq_len: int) -> Path:  # fmt: skip
    mode = f"compact-g{grid}" if features == "compact" else "vqa_like"
    tok = get_tokenizer(tokenizer).key
    name = f"synthetic-v{FORMAT_VERSION}-{mode}-n{n_images}x{per_image}-s{seed}-{tok}-T{max_seq_len}"
    return Path(cache_dir) / "retrieval" / name


def synthetic_scenes(n_images: int, seed: int) -> dict[str, np.ndarray]:
    """The scenes of the synthetic set: drawn from the generator's stream 3, the first ``n_images``
    with distinct (shape, colour, size, place).

    Raises:
        ValueError: more images than distinct descriptions (648).
    """
    from tasks.pretrain import synthetic

    combos = len(synthetic.SHAPES) * len(synthetic.COLORS) * len(synthetic.SIZES) * 9
    if not 1 <= n_images <= combos:
        raise ValueError(f"a synthetic retrieval set holds 1 to {combos} images (distinct shape, colour, size, place); "
                         f"got {n_images}")  # fmt: skip
    draw = max(4 * n_images, 256)
    while True:  # draw until n scenes with distinct descriptions (a few rounds near the 648 limit)
        scenes = synthetic.draw_scenes(draw, seed * 7919 + SYNTHETIC_STREAM)
        words = synthetic.attributes(scenes)
        seen: dict[tuple, int] = {}
        for i, key in enumerate(zip(words["shape"], words["color"], words["size"], words["place"])):
            seen.setdefault(key, i)
        if len(seen) >= n_images or draw >= 64 * combos:
            break
        draw *= 2
    keep = np.sort(np.fromiter(seen.values(), np.int64))[:n_images]
    if len(keep) < n_images:
        raise ValueError(f"only {len(keep)} distinct synthetic scenes found; ask for fewer images")
    return {k: v[keep] for k, v in scenes.items()}


def build_synthetic(tmp: Path, data, feature_store: Path, n_images: int, per_image: int, seed: int,
                    max_seq_len: int) -> dict:  # fmt: skip
    """Write the synthetic retrieval set into the empty directory ``tmp``; returns its meta.

    Args:
        tmp: Target directory (renamed into place by :func:`tasks.store.build_once`).
        data: The easy-VQA :class:`tasks.DataConfig` (features mode, grid, tokenizer).
        feature_store: The prepared easy-VQA feature store (its standardisation is reused, so the
            features mean what the pretraining corpus' and easy-VQA's mean).
        n_images: Images (each with a distinct shape, colour, size and place; <= 648).
        per_image: Captions per image (1-3).
        seed: The pretraining corpus' seed (the set uses its unused stream 3).
        max_seq_len: Tokens per caption.
    """
    from tasks import easyvqa
    from tasks.pretrain import synthetic

    fmeta = st.read_json(feature_store / st.META)
    mean, std = np.asarray(fmeta["feature_mean"], np.float32), np.asarray(fmeta["feature_std"], np.float32)
    scenes = synthetic_scenes(n_images, seed)
    words = synthetic.attributes(scenes)
    images = synthetic.render(scenes, synthetic.coverage_maps(scenes))
    desc, boxes = easyvqa.featurize(images, data.features, data.grid)
    z = (desc - mean) / std
    feats = z @ easyvqa.projection() if data.features == "vqa_like" else z
    img_dir = tmp / "images"
    img_dir.mkdir()
    st.save(img_dir, "feats", feats.astype(np.float32))
    st.save(img_dir, "boxes", boxes.astype(np.float32))
    st.write_json(img_dir / st.META, {"images": n_images})
    texts, owner = synthetic_captions(words, per_image)
    st.save(tmp, "image_rows", np.arange(n_images, dtype=np.int64))
    info = _write_texts(tmp, texts, owner, data.tokenizer, max_seq_len)
    return {"source": "synthetic", "format_version": FORMAT_VERSION, "feature_store": "images",
            "image_ids": [f"synthetic-{seed}-{i}" for i in range(n_images)], "n_images": n_images,
            "n_texts": len(texts), "seed": seed, "stream": SYNTHETIC_STREAM, "features": data.features,
            "grid": data.grid, "scenes": {k: v.tolist() for k, v in scenes.items()}, **info}  # fmt: skip


def prepare_synthetic(data, n_images: int = 100, per_image: int = 2, seed: int = 0, max_seq_len: int = 0) -> Path:
    """Build (once) and return the synthetic retrieval set for the easy-VQA data config ``data``.

    Args:
        data: A :class:`tasks.DataConfig` with ``name=easyvqa`` (its features are prepared first).
        n_images: Images in the set.
        per_image: Captions per image.
        seed: The pretraining corpus' seed (``pretrain.corpus_seed``).
        max_seq_len: Tokens per caption; 0 = the longest caption's (truncation would cut the place
            words off and make captions ambiguous; a model needs as many positions).
    """
    from tasks import prepare as prepare_task
    from tasks.config import ConfigError

    data = data.resolved()
    if data.name != "easyvqa":
        raise ConfigError(f"the synthetic retrieval set uses easy-VQA's feature extractor: data.name must be easyvqa, "
                          f"not {data.name!r}")  # fmt: skip
    feature_store = Path(prepare_task(data)["features"])
    t = max_seq_len
    if not t:
        from tasks.pretrain import synthetic

        texts, _ = synthetic_captions(synthetic.attributes(synthetic_scenes(n_images, seed)), per_image)
        t = max(len(ids) for ids in get_tokenizer(data.tokenizer).encode(texts))
    path = synthetic_dir(data.cache_dir, data.features, data.grid, n_images, per_image, seed, data.tokenizer, t)
    st.build_once(path, lambda tmp: build_synthetic(tmp, data, feature_store, n_images, per_image, seed, t))
    return path


# ------------------------------------------------------------------------------------ caption files
def read_captions(path: str | Path, caption_source: str = "mscoco") -> dict[str, list[str]]:
    """``{image id: [caption, ...]}`` from an LXMERT ``.json`` or a VOLTA ``.jsonl`` (module docstring).

    Raises:
        FileNotFoundError: the file does not exist (the message says where such files come from).
        CaptionFormatError: a malformed file, naming the file and the line (jsonl) or entry (json).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing caption file {path}: LXMERT's caption JSON ({LXMERT_URL}) or VOLTA's "
                                f"annotation .jsonl ({VOLTA_URL})")  # fmt: skip
    out: dict[str, list[str]] = {}
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CaptionFormatError(f"{path}:{line_no}: not JSON: {err}") from None
                if not isinstance(entry, dict) or not isinstance(entry.get("sentences"), list):
                    raise CaptionFormatError(f"{path}:{line_no}: expected an object with a 'sentences' list")
                if "id" in entry:
                    image_id = str(entry["id"])
                elif "img_path" in entry:
                    image_id = Path(str(entry["img_path"])).stem
                else:
                    raise CaptionFormatError(f"{path}:{line_no}: no image id ('id' for COCO, 'img_path' for Flickr30k)")
                if image_id in out:
                    raise CaptionFormatError(f"{path}:{line_no}: image {image_id!r} appears twice")
                out[image_id] = [str(s) for s in entry["sentences"]]
        return out
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CaptionFormatError(f"{path}: not JSON: {err}") from None
    if not isinstance(entries, list):
        raise CaptionFormatError(f"{path}: expected LXMERT's list of images, got a {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "img_id" not in entry or not isinstance(entry.get("sentf"), dict):
            raise CaptionFormatError(f"{path}: entry {i} lacks 'img_id' or a 'sentf' object")
        captions = entry["sentf"].get(caption_source, [])
        if captions:
            out.setdefault(str(entry["img_id"]), []).extend(str(s) for s in captions)
    if not out:
        raise CaptionFormatError(f"{path}: no image has captions under sentf[{caption_source!r}]")
    return out


def match_image_ids(wanted: list[str], available: list[str], captions_file: Path, features_file: Path) -> list[int]:
    """Row of each wanted image id among the feature file's ids (exact, else by trailing number).

    Raises:
        MissingImagesError: some ids are in neither form, naming both files and the first missing ids.
    """
    exact = {img: i for i, img in enumerate(available)}
    by_number: dict[int, int] = {}
    for i, img in enumerate(available):
        m = _TRAILING_NUMBER.search(img)
        if m:
            by_number.setdefault(int(m.group(1)), i)
    rows, missing = [], []
    for img in wanted:
        if img in exact:
            rows.append(exact[img])
            continue
        m = _TRAILING_NUMBER.search(img)
        row = by_number.get(int(m.group(1))) if m else None
        if row is None:
            missing.append(img)
        else:
            rows.append(row)
    if missing:
        raise MissingImagesError(f"{len(missing)} image(s) of {captions_file} are not in the feature file {features_file}, e.g. "
                       f"{missing[:5]}: convert the matching *_obj36.tsv (same split)")  # fmt: skip
    return rows


def files_dir(cache_dir: str | Path, captions: Path, features: Path, caption_source: str, tokenizer: str,
              max_seq_len: int, image_limit: int) -> Path:  # fmt: skip
    sig = hashlib.sha1()
    for p in (captions, features):
        s = p.stat()
        sig.update(f"{p.resolve()}:{s.st_size}:{s.st_mtime_ns};".encode())
    sig.update(f"{caption_source}|{image_limit}".encode())
    tok = get_tokenizer(tokenizer).key
    return Path(cache_dir) / "retrieval" / f"files-v{FORMAT_VERSION}-{sig.hexdigest()[:12]}-{tok}-T{max_seq_len}"


def prepare_files(captions: str | Path, features: str | Path, cache_dir: str | Path, *, tokenizer: str = "",
                  max_seq_len: int = 40, caption_source: str = "mscoco", image_limit: int = 0,
                  progress: bool = True) -> Path:  # fmt: skip
    """Build (once) a retrieval set from a caption file and an LXMERT feature TSV (module docstring).

    Args:
        captions: LXMERT ``.json`` or VOLTA ``.jsonl`` captions.
        features: An LXMERT ``*_obj36.tsv`` holding (at least) those images.
        cache_dir: Where the converted features and the set go (``<cache>/retrieval/...``).
        tokenizer: As ``DataConfig.tokenizer`` (empty: bert-base-uncased).
        max_seq_len: Tokens per caption (VOLTA's Flickr30k: 38).
        caption_source: LXMERT ``.json``: which ``sentf`` source holds the captions.
        image_limit: Keep the first N images of the caption file (0 = all): a smaller candidate set.
        progress: Show the TSV conversion's progress bar.

    Raises:
        FileNotFoundError: a file is missing (checked before any work; named with its source).
        CaptionFormatError / TSVFormatError: a malformed file (named, with the line).
        MissingImagesError: captioned images the feature file lacks.
    """
    from tasks.vqa.convert import convert_tsv

    captions, features = Path(captions), Path(features)
    if not features.is_file():
        raise FileNotFoundError(f"missing feature file {features}: an LXMERT *_obj36.tsv ({LXMERT_URL})")
    by_image = read_captions(captions, caption_source)
    path = files_dir(cache_dir, captions, features, caption_source, tokenizer, max_seq_len, image_limit)
    if st.is_complete(path):
        return path
    store = Path(cache_dir) / "retrieval" / "features" / (features.name.removesuffix(".tsv") + "-" +
                                                          hashlib.sha1(str(features.resolve()).encode()).hexdigest()[:8])
    convert_tsv(features, store, progress=progress)

    def build(tmp: Path) -> dict:
        wanted = list(by_image)[: image_limit or None]
        available = st.read_json(store / st.META)["image_ids"]
        rows = match_image_ids(wanted, available, captions, features)
        texts, owner = [], []
        for i, img in enumerate(wanted):
            texts.extend(by_image[img])
            owner.extend([i] * len(by_image[img]))
        st.save(tmp, "image_rows", np.asarray(rows, np.int64))
        info = _write_texts(tmp, texts, np.asarray(owner, np.int32), tokenizer, max_seq_len)
        return {"source": "files", "format_version": FORMAT_VERSION, "feature_store": str(store.resolve()),
                "captions": str(captions.resolve()), "features": str(features.resolve()), "caption_source": caption_source,
                "image_ids": wanted, "n_images": len(wanted), "n_texts": len(texts), **info}  # fmt: skip

    st.build_once(path, build)
    return path


def write_lxmert_captions(path: str | Path, captions: dict[str, list[str]], source: str = "mscoco") -> Path:
    """Write ``{img_id: [caption, ...]}`` as an LXMERT caption JSON (for tests and small sets)."""
    entries = [{"img_id": img, "labelf": {}, "sentf": {source: list(caps)}} for img, caps in captions.items()]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def write_volta_captions(path: str | Path, captions: dict[str, list[str]], dataset: str = "flickr30k") -> Path:
    """Write ``{image id: [caption, ...]}`` as VOLTA's annotation ``.jsonl`` (``flickr30k``: ``img_path``
    ``<id>.jpg``; ``coco``: integer ``id``) (for tests and small sets)."""
    if dataset not in ("flickr30k", "coco"):
        raise ValueError(f"dataset={dataset!r}: flickr30k or coco")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for img, caps in captions.items():
            key = {"img_path": f"{img}.jpg"} if dataset == "flickr30k" else {"id": int(img)}
            fh.write(json.dumps({**key, "sentences": list(caps)}) + "\n")
    return path
