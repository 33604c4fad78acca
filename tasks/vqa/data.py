"""VQA v2 in LXMERT's files: `prepare` (convert + tokenise once) and `load` (memory-map).

Cache layout under ``<cache_dir>/vqa/``::

    features/<store name>[.first<N>]/    converted feature store (see `tasks.vqa.convert`; named by
                                         `store_name`, shared with GQA, NLVR2 and pretraining)
    questions-v1-<tokenizer>-T<T>[-img<N>]/<split>-<json signature>/   tokenised questions

A split's question store records, per question, the row of its image in the split's feature
store. With ``image_limit = N`` only the first N images of each feature file are used and the
questions on other images are left out (counted), like LXMERT's ``--tiny`` / ``--fast``; without
it, a question whose image has no features is an error naming both ids.

The evaluation split's human answers (for the official VQA accuracy) come from the official
annotation file when there is one (`tasks.human_answers.annotation_file`), converted once into
``annotations-v1/<file stem>-<signature>/``; without it evaluation uses LXMERT's soft score.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tasks import human_answers as ann
from tasks import store as st
from tasks.config import DataConfig
from tasks.dataset import ArrayDataset, FeatureStore, QuestionPart, TaskData, summarize
from tasks.questions import write_part
from tasks.tokenization import get_tokenizer
from tasks.vqa import files
from tasks.vqa.convert import convert_tsv, store_state

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: stores keyed by content; unanswerable questions counted


def _splits(cfg: DataConfig) -> list[str]:
    return list(dict.fromkeys([*cfg.train_splits.split(","), cfg.eval_split]))


# Feature folders whose stores are named by the TSV's stem alone (VQA, GQA and pretraining share them).
SHARED_FEATURE_FOLDERS = ("mscoco_imgfeat", "vg_gqa_imgfeat")


def store_name(tsv_rel: str) -> str:
    """The directory name of a feature file's store: the TSV's stem for LXMERT's COCO and VG / GQA
    folders (``train2014_obj36``, ``vg_gqa_obj36``), else ``<folder>.<stem>`` (NLVR2's
    ``nlvr2_imgfeat.train_obj36``), so that files of one name in two folders never share a store."""
    rel = Path(tsv_rel)
    stem = rel.name[: -len(".tsv")]
    folder = rel.parent.as_posix()
    return stem if folder in ("", ".", *SHARED_FEATURE_FOLDERS) else f"{folder.replace('/', '.')}.{stem}"


def feature_store_path(cfg: DataConfig, tsv_rel: str) -> Path:
    """Where the store of a feature file lives (any task: the stores are shared); a full store also
    serves any ``image_limit``."""
    stem = store_name(tsv_rel)
    base = Path(cfg.cache_dir) / "vqa" / "features"
    full = base / stem
    if cfg.image_limit == 0 or store_state(full, Path(cfg.root) / tsv_rel, cfg.image_limit)[0]:
        return full
    return base / f"{stem}.first{cfg.image_limit}"


def question_store_path(cfg: DataConfig, split: str, tok_key: str) -> Path:
    """Where a split's tokenised questions live: keyed by the content of what they are built from
    (the question JSON, the answer vocabulary and the converted features whose rows they index),
    so that a changed file means another store, never a stale one."""
    root = Path(cfg.root)
    fdir = feature_store_path(cfg, files.SPLIT_TSV[split])
    features = st.read_json(fdir / st.META).get("source") if st.is_complete(fdir) else None
    key = st.content_key(
        st.source_signature(root / files.SPLIT_FILES[split]), st.source_signature(root / files.ANS2LABEL),
        st.source_signature(root / files.LABEL2ANS), features, fdir.name, FORMAT_VERSION,
    )
    lim = f"-img{cfg.image_limit}" if cfg.image_limit else ""
    base = Path(cfg.cache_dir) / "vqa" / f"questions-v{FORMAT_VERSION}-{tok_key}-T{cfg.max_seq_len}{lim}"
    return base / f"{split}-{key}"


def check_inputs(cfg: DataConfig) -> None:
    """Raise before any work if a needed file is missing (naming it and what produces it).

    A feature TSV is needed only while its converted store does not exist yet.
    """
    root = Path(cfg.root)
    needed = [files.ANS2LABEL, files.LABEL2ANS]
    for split in _splits(cfg):
        needed.append(files.SPLIT_FILES[split])
        tsv = files.SPLIT_TSV[split]
        if not st.is_complete(feature_store_path(cfg, tsv)):
            needed.append(tsv)
    for rel in dict.fromkeys(needed):
        if not (root / rel).is_file():
            raise files.missing_file_error(root, rel)
    ann.annotation_file(root, cfg.eval_split, cfg.annotations)  # a configured file must exist


def prepare(cfg: DataConfig) -> dict:
    """Convert the feature files and tokenise the question files the config needs (once).

    Args:
        cfg: a resolved `DataConfig` with ``name="vqa"``.
    """
    check_inputs(cfg)
    root = Path(cfg.root)
    out: dict[str, object] = {}
    for tsv in dict.fromkeys(files.SPLIT_TSV[s] for s in _splits(cfg)):
        path = feature_store_path(cfg, tsv)
        convert_tsv(root / tsv, path, limit=cfg.image_limit)
        out[f"features.{Path(tsv).stem}"] = str(path)
    tok = get_tokenizer(cfg.tokenizer)
    _, ans2label = files.read_vocab(root)
    for split in _splits(cfg):
        qdir = question_store_path(cfg, split, tok.key)
        fdir = feature_store_path(cfg, files.SPLIT_TSV[split])
        st.build_once(qdir, lambda tmp, s=split, f=fdir: _build_questions(tmp, cfg, s, f, tok, ans2label))
        check_answerable(st.read_json(qdir / st.META), cfg, root / files.SPLIT_FILES[split], len(ans2label))
        out[f"questions.{split}"] = str(qdir)
    annotation = ann.annotation_file(root, cfg.eval_split, cfg.annotations)
    if annotation is not None:
        out["annotations"] = str(ann.build_store(cfg.cache_dir, annotation))
    return out


def check_answerable(meta: dict, cfg: DataConfig, source: Path, n_answers: int) -> None:
    """Refuse a split whose labelled questions mostly have no answer in the vocabulary.

    Raises:
        ValueError: naming the question file, the counts, a few question ids, and
            ``data.max_unanswerable`` (``--max-unanswerable``), the share allowed.
    """
    labelled, unanswerable = int(meta.get("labelled", 0)), int(meta.get("unanswerable", 0))
    if labelled and unanswerable / labelled > cfg.max_unanswerable:
        examples = ", ".join(str(q) for q in meta.get("unanswerable_examples", []))
        raise ValueError(
            f"{source}: {unanswerable} of {labelled} labelled questions ({unanswerable / labelled:.1%}) have no "
            f"answer in the {n_answers}-answer vocabulary ({Path(cfg.root) / files.ANS2LABEL}), more than "
            f"data.max_unanswerable={cfg.max_unanswerable:g} allows (e.g. question_id {examples}). Is the "
            "vocabulary the one these questions were made with? Raise data.max_unanswerable (python -m "
            "tasks.vqa.convert --max-unanswerable) to accept it."
        )


def _build_questions(tmp: Path, cfg: DataConfig, split: str, fdir: Path, tok, ans2label: dict) -> dict:
    root = Path(cfg.root)
    entries = files.read_questions(root, split)
    image_ids = st.read_json(fdir / st.META)["image_ids"]
    if cfg.image_limit:
        image_ids = image_ids[: cfg.image_limit]
    row = {i: r for r, i in enumerate(image_ids)}
    kept, outside = [], 0
    for e in entries:
        if e["img_id"] in row:
            kept.append(e)
        elif cfg.image_limit:
            outside += 1  # LXMERT's tiny/fast: only questions on the loaded images
        else:
            raise ValueError(
                f"question_id {e['question_id']} in {root / files.SPLIT_FILES[split]} refers to image "
                f"{e['img_id']!r}, which has no features in {root / files.SPLIT_TSV[split]} (converted to {fdir})"
            )
    labels = []
    labelled, unanswerable = 0, []
    for e in kept:
        lab = e.get("label") or {}  # read_questions checked it: a dict of finite scores in [0, 1]
        labels.append({str(a): float(s) for a, s in lab.items()})
        if "label" in e:
            labelled += 1
            if not any(a in ans2label for a in lab):
                unanswerable.append(int(e["question_id"]))
    try:
        qids = np.array([int(e["question_id"]) for e in kept], np.int64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{root / files.SPLIT_FILES[split]}: a question_id is not an integer: {err}") from None
    meta = write_part(
        tmp,
        texts=[e["sent"] for e in kept],
        image_index=np.array([row[e["img_id"]] for e in kept], np.int32),
        labels=labels,
        question_ids=qids,
        answer_types=[e.get("answer_type", "") for e in kept],
        question_types=[e.get("question_type", "") for e in kept],
        ans2label=ans2label,
        tokenizer=tok,
        max_seq_len=cfg.max_seq_len,
        extra_meta={
            "split": split,
            "source": str(root / files.SPLIT_FILES[split]),
            "features": str(fdir),
            "image_limit": cfg.image_limit,
            "outside_image_limit": outside,
            "labelled": labelled,
            "unanswerable": len(unanswerable),
            "unanswerable_examples": unanswerable[:5],
            "sources": {"questions": st.source_signature(root / files.SPLIT_FILES[split]),
                        "features": st.read_json(fdir / st.META).get("source")},
            "format_version": FORMAT_VERSION,
        },
    )
    if meta["questions_with_oov"]:
        log.info(
            "%s: %d answer labels of %d questions are outside the %d-answer vocabulary and were dropped from targets",
            split, meta["oov_labels"], meta["questions_with_oov"], len(ans2label),
        )  # fmt: skip
    return meta


def _open_store(cfg: DataConfig, tsv_rel: str) -> FeatureStore:
    fs = FeatureStore.open(feature_store_path(cfg, tsv_rel))
    if cfg.image_limit and len(fs.feats) > cfg.image_limit:
        fs = FeatureStore(fs.path, fs.feats[: cfg.image_limit], fs.boxes[: cfg.image_limit], fs.meta)
    return fs


def load(cfg: DataConfig) -> TaskData:
    """Memory-map the prepared VQA arrays (running `prepare` first if anything is missing).

    Args:
        cfg: a resolved `DataConfig` with ``name="vqa"``.
    """
    prepare(cfg)
    root = Path(cfg.root)
    label2ans, _ = files.read_vocab(root)
    tok_key = get_tokenizer(cfg.tokenizer).key
    stores: dict[str, FeatureStore] = {}
    parts: dict[str, QuestionPart] = {}
    for split in _splits(cfg):
        tsv = files.SPLIT_TSV[split]
        if tsv not in stores:
            stores[tsv] = _open_store(cfg, tsv)
        parts[split] = QuestionPart.open(question_store_path(cfg, split, tok_key), stores[tsv])
    train = ArrayDataset.from_parts([parts[s] for s in cfg.train_splits.split(",")], label2ans, cfg.train_limit)
    ev = ArrayDataset.from_parts([parts[cfg.eval_split]], label2ans, cfg.eval_limit)
    annotation = ann.annotation_file(root, cfg.eval_split, cfg.annotations)
    if annotation is not None:
        ev.human_answers = ann.HumanAnswers.open(ann.store_path(cfg.cache_dir, annotation))
        ev.human_answers.rows(ev.question_ids)  # every evaluation question must have its answers
    summary = summarize(train, ev)
    summary["outside_image_limit"] = sum(p.meta.get("outside_image_limit", 0) for p in parts.values())
    summary["eval.annotations"] = str(annotation) if annotation is not None else ""
    return TaskData(train=train, eval=ev, answers=label2ans, summary=summary)
