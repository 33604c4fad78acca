"""Tasks in LXMERT's file formats (GQA, NLVR2): one `prepare` / `load`, driven by a `Layout`.

Such a task is, under ``DataConfig.root`` (LXMERT's ``data`` folder): one question JSON per split
(a list of entries), an answer vocabulary (``trainval_ans2label.json`` / ``trainval_label2ans.json``)
or a fixed answer list, and ``*_obj36.tsv`` feature files holding each split's images. What differs
between tasks is a `Layout`: the paths, where each file comes from, and a reader that turns a split's
entries into `Entry` records (validating them, naming file and entry). Everything else is shared:

- feature TSVs are converted once by `tasks.vqa.convert.convert_tsv` into the stores
  `tasks.vqa.data.feature_store_path` names (``<cache_dir>/vqa/features/<store name>``): the same
  stores VQA and LXMERT pretraining use, so ``vg_gqa_obj36.tsv`` serves GQA and pretraining and is
  converted once (NLVR2's are ``nlvr2_imgfeat.<split>_obj36``);
- question entries are tokenised once by `tasks.questions.write_part` into
  ``<cache_dir>/<task>/questions-v<V>-<tokenizer>-T<T>[-img<N>]/<split>-<source key>/``;
- `load` memory-maps both into `tasks.dataset.ArrayDataset` (the VQA batch format; with two images
  per entry the batch's region arrays are (B, 2, R, F) / (B, 2, R, 4)).

Question ids: the source files' ids are strings (GQA's ``"07333408"``, NLVR2's ``"dev-850-0-0"``),
kept as written (`ArrayDataset.source_id_of`, for results files). The integer ``question_id`` of a
batch is ``(k + 1) * 10**10 + i`` for entry ``i`` of the ``k``-th split of the layout (GQA: train
1..., valid 2..., testdev 3..., submit 4...): unique across the splits one trains on together,
and stable whatever subset (``image_limit``, ``train_limit``) is used.

A missing file raises `FileNotFoundError` naming it and where it comes from, before any work; a
file in the wrong format raises `ValueError` naming the file and the entry (its index in the
list, and its id); an entry whose image has no features raises naming both (except under
``image_limit``, where entries on other images are left out and counted, like LXMERT's ``--tiny``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks import store as st
from tasks.config import DataConfig
from tasks.dataset import ArrayDataset, FeatureStore, QuestionPart, TaskData, summarize
from tasks.questions import write_part
from tasks.tokenization import Tokenizer, get_tokenizer
from tasks.vqa import files
from tasks.vqa.convert import convert_tsv
from tasks.vqa.data import feature_store_path

log = logging.getLogger(__name__)
# Version of the question stores written here; part of their directory name.
FORMAT_VERSION = 1
# question_id = (split number + 1) * ID_STRIDE + entry index (GQA's submit split has 4.2M entries).
ID_STRIDE = 10**10


@dataclass(frozen=True)
class Entry:
    """One entry of a split file, as the shared code needs it.

    Attributes:
        source_id: the entry's id as the file writes it (GQA ``question_id``, NLVR2 ``identifier``).
        sent: the question / statement.
        images: the image ids it refers to, in order (GQA: one; NLVR2: ``img0``, ``img1``).
        label: ``{answer: score}``; ``None`` for an unlabelled entry (GQA ``submit``).
    """

    source_id: str
    sent: str
    images: tuple[str, ...]
    label: dict[str, float] | None


class EntryFormatError(ValueError):
    """An entry of a split file does not have LXMERT's format; the message names the file and entry."""


@dataclass(frozen=True)
class Layout:
    """Where one task's files live under the data root, where they come from, how to read them.

    Attributes:
        task: the task name (`DataConfig.name`), also the cache sub-folder.
        split_files: split -> question JSON path relative to the root; the order numbers the
            splits in question ids.
        split_tsv: split -> the feature TSV holding its images (relative to the root).
        producer: ``producer(rel)`` says how to obtain the file ``rel`` (for error messages).
        read_entries: ``read_entries(items, path)`` validates a split file's decoded JSON list
            and returns its `Entry` records (raising `EntryFormatError` naming ``path`` and entry).
        vocab: ``(ans2label, label2ans)`` paths relative to the root, or ``None`` with ``answers``.
        answers: the fixed answer list when there is no vocabulary file (NLVR2: False, True).
        images_per_entry: K, the images of one entry (1 or 2).
    """

    task: str
    split_files: Mapping[str, str]
    split_tsv: Mapping[str, str]
    producer: Callable[[str], str]
    read_entries: Callable[[list, Path], list[Entry]]
    vocab: tuple[str, str] | None = None
    answers: tuple[str, ...] = ()
    images_per_entry: int = 1

    def missing(self, root: Path, rel: str) -> FileNotFoundError:
        """The error for a missing file: its path and how to obtain it."""
        return FileNotFoundError(f"missing {root / rel}: {self.producer(rel)}")

    def question_id(self, split: str, index: int) -> int:
        """The integer question id of entry ``index`` of ``split`` (see the module docstring)."""
        return (list(self.split_files).index(split) + 1) * ID_STRIDE + index

    def splits_of(self, cfg: DataConfig) -> list[str]:
        """The splits ``cfg`` uses (training splits, then the evaluation split), each once."""
        return list(dict.fromkeys([*cfg.train_splits, cfg.eval_split]))


# ------------------------------------------------------------------------------ reading helpers
def entry_error(path: Path, index: int, item: object, id_key: str, why: str) -> EntryFormatError:
    """``<path>: entry <index> (<id_key>=<id>): <why>`` (the shape of every entry error)."""
    ident = item.get(id_key) if isinstance(item, dict) else None
    err = EntryFormatError(f"{path}: entry {index} ({id_key}={ident!r}): {why}")
    err.index = index  # read_split adds the entry's line in the file
    return err


def entry_line(path: Path, index: int) -> int | None:
    """The line of ``path`` (a JSON list) on which entry ``index`` starts, 1-based; None when the file
    is not such a list. Decodes the file once more, entry by entry (only when reporting an error)."""
    import json

    text = path.read_text()
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        return None
    pos += 1
    for i in range(index + 1):
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if i == index:
            return text.count("\n", 0, pos) + 1
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
    return None


def require_str(path: Path, index: int, item: dict, key: str, id_key: str) -> str:
    """``item[key]`` if it is a non-empty string, else an `EntryFormatError` naming file, entry and key."""
    if key not in item:
        raise entry_error(path, index, item, id_key, f"lacks {key!r}")
    value = item[key]
    if not isinstance(value, str) or not value.strip():
        raise entry_error(path, index, item, id_key, f"{key} must be a non-empty string, got {value!r}")
    return value


def read_split(root: Path, layout: Layout, split: str) -> list[Entry]:
    """A split's entries, read and validated by the layout's reader.

    Raises:
        FileNotFoundError: the file is missing (naming it and its source).
        ValueError: invalid JSON (file, line, column), not a list, or a bad entry (file, entry, the
            line it starts on).
    """
    rel = layout.split_files[split]
    items = files.read_json(root, rel, layout.missing)
    if not isinstance(items, list):
        raise EntryFormatError(f"{root / rel}: must hold a list of entries, not a {type(items).__name__}")
    try:
        entries = layout.read_entries(items, root / rel)
    except EntryFormatError as err:
        index = getattr(err, "index", None)
        line = entry_line(root / rel, index) if index is not None else None
        if line is None:
            raise
        raise EntryFormatError(f"{err} (the entry starts on line {line} of {root / rel})") from None
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        if e.source_id in seen:
            line = entry_line(root / rel, i)
            raise EntryFormatError(
                f"{root / rel}: entry {i}: id {e.source_id!r} occurs twice (entries {seen[e.source_id]} and {i})"
                + (f" (the second starts on line {line})" if line else "")
            )
        seen[e.source_id] = i
    return entries


def vocabulary(cfg: DataConfig, layout: Layout) -> tuple[list[str], dict[str, int]]:
    """The answer list and its index: the layout's vocabulary files, or its fixed answers."""
    if layout.vocab is None:
        return list(layout.answers), {a: i for i, a in enumerate(layout.answers)}
    return files.read_vocab(Path(cfg.root), *layout.vocab, missing=layout.missing)


# ------------------------------------------------------------------------------ cache keys
def source_key(*parts: object) -> str:
    """A short key of what a store is built from, for its directory name.

    Files (`Path`) count by their content signature (`tasks.store.source_signature`: size,
    modification time and SHA-256, not their path, so a copied data folder reuses the store);
    anything else by its JSON text (`tasks.store.content_key`). A changed input therefore means
    another directory, never a stale store.
    """
    return st.content_key(*(st.source_signature(p) if isinstance(p, Path) else p for p in parts))


def question_store_path(cfg: DataConfig, layout: Layout, split: str, tok_key: str) -> Path:
    """Where a split's tokenised entries live: keyed by the split file, the vocabulary files and
    the converted feature store whose rows they index (call after the features are converted)."""
    root = Path(cfg.root)
    fdir = feature_store_path(cfg, layout.split_tsv[split])
    features = st.read_json(fdir / st.META).get("source") if st.is_complete(fdir) else None
    vocab = [root / rel for rel in layout.vocab] if layout.vocab else list(layout.answers)
    key = source_key(root / layout.split_files[split], *vocab, features, fdir.name, FORMAT_VERSION)
    lim = f"-img{cfg.image_limit}" if cfg.image_limit else ""
    base = Path(cfg.cache_dir) / layout.task / f"questions-v{FORMAT_VERSION}-{tok_key}-T{cfg.max_seq_len}{lim}"
    return base / f"{split}-{key}"


# ------------------------------------------------------------------------------ prepare / load
def check_inputs(cfg: DataConfig, layout: Layout) -> None:
    """Raise before any work if a needed file is missing (naming it and what produces it).

    A feature TSV is needed only while its converted store does not exist yet.
    """
    root = Path(cfg.root)
    needed = list(layout.vocab or ())
    for split in layout.splits_of(cfg):
        needed.append(layout.split_files[split])
        tsv = layout.split_tsv[split]
        if not st.is_complete(feature_store_path(cfg, tsv)):
            needed.append(tsv)
    for rel in dict.fromkeys(needed):
        if not (root / rel).is_file():
            raise layout.missing(root, rel)


def prepare(cfg: DataConfig, layout: Layout) -> dict:
    """Convert the feature files and tokenise the split files ``cfg`` needs (once; idempotent).

    Args:
        cfg: a resolved `DataConfig` of the layout's task.
        layout: the task's `Layout`.

    Returns:
        ``{"features.<tsv stem>": store, "questions.<split>": store}``.
    """
    check_inputs(cfg, layout)
    root = Path(cfg.root)
    out: dict[str, object] = {}
    for tsv in dict.fromkeys(layout.split_tsv[s] for s in layout.splits_of(cfg)):
        path = feature_store_path(cfg, tsv)
        convert_tsv(root / tsv, path, limit=cfg.image_limit)
        out[f"features.{Path(tsv).stem}"] = str(path)
    tok = get_tokenizer(cfg.tokenizer)
    _, ans2label = vocabulary(cfg, layout)
    for split in layout.splits_of(cfg):
        qdir = question_store_path(cfg, layout, split, tok.key)
        fdir = feature_store_path(cfg, layout.split_tsv[split])
        st.build_once(qdir, lambda tmp, s=split, f=fdir: _build_split(tmp, cfg, layout, s, f, tok, ans2label))
        out[f"questions.{split}"] = str(qdir)
    return out


def _build_split(tmp: Path, cfg: DataConfig, layout: Layout, split: str, fdir: Path, tok: Tokenizer,
                 ans2label: dict[str, int]) -> dict:  # fmt: skip
    root = Path(cfg.root)
    source = root / layout.split_files[split]
    entries = read_split(root, layout, split)
    image_ids = st.read_json(fdir / st.META)["image_ids"]
    if cfg.image_limit:
        image_ids = image_ids[: cfg.image_limit]
    row_of = {str(i): r for r, i in enumerate(image_ids)}
    kept: list[tuple[int, Entry, list[int]]] = []
    outside = 0
    for i, e in enumerate(entries):
        if len(e.images) != layout.images_per_entry:
            raise EntryFormatError(f"{source}: entry {i} ({e.source_id!r}) has {len(e.images)} images, "
                                   f"expected {layout.images_per_entry}")  # fmt: skip
        rows = [row_of.get(img) for img in e.images]
        if all(r is not None for r in rows):
            kept.append((i, e, rows))
        elif cfg.image_limit:
            outside += 1  # LXMERT's tiny / fast subsets: only entries on the loaded images
        else:
            img = e.images[rows.index(None)]
            raise ValueError(
                f"{source}: entry {i} ({e.source_id!r}) refers to image {img!r}, which has no features in "
                f"{root / layout.split_tsv[split]} (converted to {fdir})"
            )
    n, k = len(kept), layout.images_per_entry
    image_index = np.array([rows for _, _, rows in kept], np.int32).reshape((n, k) if k > 1 else (n,))
    labels = [dict(e.label or {}) for _, e, _ in kept]
    meta = write_part(
        tmp,
        texts=[e.sent for _, e, _ in kept],
        image_index=image_index,
        labels=labels,
        question_ids=np.array([layout.question_id(split, i) for i, _, _ in kept], np.int64),
        answer_types=[""] * n,  # LXMERT's GQA / NLVR2 files carry no question types
        question_types=[""] * n,
        ans2label=ans2label,
        tokenizer=tok,
        max_seq_len=cfg.max_seq_len,
        source_ids=[e.source_id for _, e, _ in kept],
        extra_meta={
            "task": layout.task,
            "split": split,
            "source": str(source),
            "features": str(fdir),
            "image_limit": cfg.image_limit,
            "outside_image_limit": outside,
            "labelled": sum(e.label is not None for _, e, _ in kept),
            "format_version": FORMAT_VERSION,
        },
    )
    if meta["questions_with_oov"]:
        log.info(
            "%s %s: %d labels of %d entries are outside the %d-answer vocabulary and were dropped from targets",
            layout.task, split, meta["oov_labels"], meta["questions_with_oov"], len(ans2label),
        )  # fmt: skip
    return meta


def _open_store(cfg: DataConfig, tsv_rel: str) -> FeatureStore:
    fs = FeatureStore.open(feature_store_path(cfg, tsv_rel))
    if cfg.image_limit and len(fs.feats) > cfg.image_limit:  # a full store serves any image limit
        fs = FeatureStore(fs.path, fs.feats[: cfg.image_limit], fs.boxes[: cfg.image_limit], fs.meta)
    return fs


def load(cfg: DataConfig, layout: Layout) -> TaskData:
    """Memory-map the prepared arrays of the layout's task (running `prepare` first if needed).

    Returns:
        `TaskData`; ``summary`` adds ``outside_image_limit`` (entries left out by ``image_limit``).
    """
    prepare(cfg, layout)
    answers, _ = vocabulary(cfg, layout)
    tok_key = get_tokenizer(cfg.tokenizer).key
    stores: dict[str, FeatureStore] = {}
    parts: dict[str, QuestionPart] = {}
    for split in layout.splits_of(cfg):
        tsv = layout.split_tsv[split]
        if tsv not in stores:
            stores[tsv] = _open_store(cfg, tsv)
        parts[split] = QuestionPart.open(question_store_path(cfg, layout, split, tok_key), stores[tsv])
    train = ArrayDataset.from_parts([parts[s] for s in cfg.train_splits], answers, cfg.train_limit)
    ev = ArrayDataset.from_parts([parts[cfg.eval_split]], answers, cfg.eval_limit)
    summary = summarize(train, ev)
    summary["outside_image_limit"] = sum(p.meta.get("outside_image_limit", 0) for p in parts.values())
    return TaskData(train=train, eval=ev, answers=answers, summary=summary)


def labelled_mask(dataset: ArrayDataset, positions: Sequence[int] | np.ndarray) -> np.ndarray:
    """(N,) bool: whether each question at ``positions`` has a label in its source file (an answer
    in the vocabulary or one dropped as out of it). Unlabelled entries (GQA ``submit``) are left out
    of accuracies."""
    pos = np.asarray(positions, np.int64)
    li = np.asarray(dataset.arrays["label_idx"])[pos]
    return (li >= 0).any(1) | (np.asarray(dataset.arrays["n_oov"])[pos] > 0)
