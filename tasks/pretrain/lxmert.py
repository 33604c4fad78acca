"""LXMERT's real pretraining data as a :class:`tasks.pretrain.corpus.PretrainCorpus`.

Layout under ``PretrainConfig.root`` (LXMERT's ``data`` folder, https://github.com/airsplay/lxmert#pre-training)::

    lxmert/mscoco_train.json, mscoco_nominival.json, mscoco_minival.json, vgnococo.json
    lxmert/all_ans.json                       the image-QA answers: [{"ans": str, "dsets": [...]}, ...]
    mscoco_imgfeat/train2014_obj36.tsv        Faster R-CNN features (36 boxes, 2,048-d, with
    mscoco_imgfeat/val2014_obj36.tsv          detected objects_id / attrs_id and confidences)
    vg_gqa_imgfeat/vg_gqa_obj36.tsv

A source JSON is a list of images ``{"img_id", "sentf": {dataset: [sentence, ...]}, "labelf":
{dataset: [{answer: score}, ...]}}``: captions (``mscoco``, ``vg``) have no ``labelf`` entry,
questions (``vqa``, ``gqa``, ``visual7w``) one soft-label dict per sentence. As in LXMERT's
``LXMERTTorchDataset``, every sentence becomes one (image, sentence) pair; answers are normalised
with LXMERT's ``AnswerTable.convert_ans`` and kept only when in ``all_ans.json``; images missing
from the feature file (or beyond ``image_limit``) drop their sentences. Feature TSVs are converted
once with :func:`tasks.vqa.convert.convert_tsv`, into the same stores the VQA task uses.

Not supported (yet): LXMERT's ``qa_sets`` filter of the answer table (all answers are used).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from tasks import store as st
from tasks.config import ConfigError, DataConfig
from tasks.tokenization import encode_fixed, get_tokenizer
from tasks.vqa.convert import convert_tsv

FORMAT_VERSION = 2  # 2: keyed by content (sources and feature stores)
ANSWERS_FILE = "lxmert/all_ans.json"
#: Which feature file holds each source's images (LXMERT's ``Split2ImgFeatPath``).
SOURCE_TSV = {
    "mscoco_train": "mscoco_imgfeat/train2014_obj36.tsv",
    "mscoco_minival": "mscoco_imgfeat/val2014_obj36.tsv",
    "mscoco_nominival": "mscoco_imgfeat/val2014_obj36.tsv",
    "vgnococo": "vg_gqa_imgfeat/vg_gqa_obj36.tsv",
}
NUM_OBJECT_LABELS = 1600  # Visual Genome classes of LXMERT's detector
NUM_ATTR_LABELS = 400
#: LXMERT's ``AnswerTable.ANS_CONVERT``.
ANS_CONVERT = {
    "a man": "man", "the man": "man", "a woman": "woman", "the woman": "woman", "one": "1", "two": "2",
    "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
    "grey": "gray",
}  # fmt: skip
URL = "https://github.com/airsplay/lxmert#pre-training"


def convert_ans(ans: str) -> str:
    """LXMERT's answer normalisation (lower-case; trailing period, leading article dropped; aliases)."""
    if not ans:
        return ""
    ans = ans.lower()
    if ans[-1] == ".":
        ans = ans[:-1].strip()
    for article in ("a ", "an ", "the "):
        if ans.startswith(article):
            ans = ans[len(article):].strip()
            break
    return ANS_CONVERT.get(ans, ans)


def source_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SOURCE_TSV]
    if bad:
        raise ConfigError(f"pretrain.sources / eval_source: unknown LXMERT source(s) {bad}; known: {', '.join(SOURCE_TSV)}")
    return names


def check_inputs(root: Path, sources: list[str], store_of) -> None:
    """Raise before any work when a needed file is missing, naming it and where it comes from."""
    needed = [ANSWERS_FILE]
    for s in sources:
        needed.append(f"lxmert/{s}.json")
        if not st.is_complete(store_of(SOURCE_TSV[s])):
            needed.append(SOURCE_TSV[s])
    for rel in dict.fromkeys(needed):
        if not (root / rel).is_file():
            raise FileNotFoundError(f"missing {root / rel}: LXMERT's pretraining data, see {URL}")


def _store_path(cache_dir: str, root: Path, tsv_rel: str, image_limit: int) -> Path:
    from tasks.vqa.data import feature_store_path

    cfg = DataConfig(name="vqa", root=str(root), cache_dir=cache_dir, image_limit=image_limit)
    return feature_store_path(cfg, tsv_rel)


def corpus_dir(cache_dir: str | Path, root: Path, sources: list[str], eval_sources: list[str], image_limit: int,
               tokenizer: str, max_seq_len: int) -> Path:  # fmt: skip
    """The corpus' cache directory, keyed by the content it is built from: the sources' JSON files
    and answer table (size, mtime, hash; :func:`tasks.store.source_signature`), the converted
    feature stores whose rows it indexes, the settings and the format version."""
    parts: list[object] = [sources, eval_sources, image_limit, FORMAT_VERSION]
    for rel in [ANSWERS_FILE, *(f"lxmert/{s}.json" for s in [*sources, *eval_sources])]:
        p = root / rel
        parts.append(st.source_signature(p) if p.is_file() else f"missing {rel}")
    for tsv in dict.fromkeys(SOURCE_TSV[s] for s in [*sources, *eval_sources]):
        store = _store_path(str(cache_dir), root, tsv, image_limit)
        parts.append(st.read_json(store / st.META).get("source") if st.is_complete(store) else f"unconverted {tsv}")
    tok = get_tokenizer(tokenizer).key
    return Path(cache_dir) / "pretrain" / f"lxmert-v{FORMAT_VERSION}-{st.content_key(*parts)}-{tok}-T{max_seq_len}"


def prepare(root: str | Path, cache_dir: str, sources: list[str], eval_sources: list[str], image_limit: int,
            tokenizer: str, max_seq_len: int) -> Path:  # fmt: skip
    """Convert the feature TSVs and tokenise the sentences once; returns the corpus directory."""
    root = Path(root)

    def store_of(tsv: str) -> Path:
        return _store_path(cache_dir, root, tsv, image_limit)

    check_inputs(root, [*sources, *eval_sources], store_of)
    for tsv in dict.fromkeys(SOURCE_TSV[s] for s in [*sources, *eval_sources]):
        convert_tsv(root / tsv, store_of(tsv), limit=image_limit)
    out = corpus_dir(cache_dir, root, sources, eval_sources, image_limit, tokenizer, max_seq_len)
    st.build_once(out, lambda tmp: _build(tmp, root, store_of, sources, eval_sources, tokenizer, max_seq_len,
                                          image_limit))  # fmt: skip
    return out


def _read_source(path: Path) -> list[dict]:
    """A source JSON's image entries, each checked to be an object with an ``img_id``."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a list of image entries, not a {type(data).__name__}")
    for n, datum in enumerate(data):
        if not isinstance(datum, dict) or "img_id" not in datum or not isinstance(datum.get("sentf", {}), dict):
            raise ValueError(f"{path}: entry {n} is not an object with img_id and sentf {{dataset: [sentence, ...]}}")
    return data


def _build(tmp: Path, root: Path, store_of, sources: list[str], eval_sources: list[str], tokenizer: str,
           max_seq_len: int, image_limit: int = 0) -> dict:  # fmt: skip
    t0 = time.perf_counter()
    table = json.loads((root / ANSWERS_FILE).read_text())
    answers = [a["ans"] if isinstance(a, dict) else str(a) for a in table]
    ans2id = {a: i for i, a in enumerate(answers)}
    tok = get_tokenizer(tokenizer)
    tsvs = list(dict.fromkeys(SOURCE_TSV[s] for s in [*sources, *eval_sources]))
    stores = [store_of(t) for t in tsvs]
    row_of = []
    for path in stores:
        ids = st.read_json(path / st.META)["image_ids"]
        n = len(st.open_array(path, "feats"))
        # A full store also serves an image limit (tasks.vqa.data.feature_store_path): use its first N.
        n = min(n, image_limit) if image_limit else n
        row_of.append({str(i): r for r, i in enumerate(ids[:n])})
        for name, hi in (("objects_id", NUM_OBJECT_LABELS), ("attrs_id", NUM_ATTR_LABELS)):
            top = int(np.max(st.open_array(path, name)[:n])) if n else -1
            if top >= hi:
                raise ValueError(f"{path}: {name} reaches {top}, beyond LXMERT's {hi} classes")
    splits = {}
    for split, names in (("train", sources), ("eval", eval_sources)):
        if not names:
            continue
        texts, rows, sid, labels, kind, dropped = [], [], [], [], [], 0
        for source in names:
            s = tsvs.index(SOURCE_TSV[source])
            path = root / f"lxmert/{source}.json"
            for n, datum in enumerate(_read_source(path)):
                row = row_of[s].get(str(datum["img_id"]))
                if row is None:
                    dropped += sum(len(v) for v in datum.get("sentf", {}).values())
                    continue
                for cat, sents in datum.get("sentf", {}).items():
                    labs = datum.get("labelf", {}).get(cat)
                    for k, sent in enumerate(sents):
                        texts.append(sent)
                        rows.append(row)
                        sid.append(s)
                        lab = {}
                        if labs is not None:
                            if not isinstance(sent, str) or k >= len(labs) or not isinstance(labs[k], dict):
                                raise ValueError(f"{path}: entry {n} (img_id {datum['img_id']!r}): sentf.{cat}[{k}] "
                                                 f"needs a string and labelf.{cat}[{k}] an object of answer: score")
                            for a, score in labs[k].items():
                                if isinstance(score, bool) or not isinstance(score, (int, float)) or \
                                        not math.isfinite(score):
                                    raise ValueError(f"{path}: entry {n} (img_id {datum['img_id']!r}): "
                                                     f"labelf.{cat}[{k}][{a!r}] must be a finite number, got {score!r}")
                                a = convert_ans(a)
                                if a in ans2id:
                                    lab[a] = float(score)
                        labels.append(lab)
                        kind.append(1 if labs is not None else 0)
        ids, lengths = encode_fixed(tok, texts, max_seq_len)
        width = max([1, *(len(lab) for lab in labels)])
        label_idx = np.full((len(texts), width), -1, np.int32)
        label_score = np.zeros((len(texts), width), np.float32)
        for i, lab in enumerate(labels):
            for j, (a, score) in enumerate(lab.items()):
                label_idx[i, j], label_score[i, j] = ans2id[a], score
        part = tmp / split
        part.mkdir()
        arrays = {"input_ids": ids, "lengths": lengths, "image_index": np.asarray(rows, np.int32),
                  "store_id": np.asarray(sid, np.int8), "label_idx": label_idx, "label_score": label_score,
                  "kind": np.asarray(kind, np.int8)}  # fmt: skip
        for name, arr in arrays.items():
            st.save(part, name, arr.reshape(len(texts), *arr.shape[1:]))
        st.write_json(part / "texts.json", texts)
        st.write_json(part / st.META, {"stores": [str(p) for p in stores], "sentences": len(texts),
                                       "sentences_without_features": dropped, "sources": names})
        splits[split] = {"sentences": len(texts), "without_features": dropped}
    from tasks.pretrain.synthetic import special_ids

    mask_id, vocab_size, first_word = special_ids(tok)
    return {
        "corpus": "lxmert",
        "format_version": FORMAT_VERSION,
        "root": str(root),
        "splits": splits,
        "answers": answers,
        "object_names": [str(i) for i in range(NUM_OBJECT_LABELS)],
        "attr_names": [str(i) for i in range(NUM_ATTR_LABELS)],
        "num_object_labels": NUM_OBJECT_LABELS,
        "num_attr_labels": NUM_ATTR_LABELS,
        "mask_id": mask_id,
        "vocab_size": vocab_size,
        "random_word_min": first_word,
        "max_seq_len": max_seq_len,
        "tokenizer": tok.name,
        "seconds": time.perf_counter() - t0,
    }
