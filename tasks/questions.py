"""Writing one split's questions as the arrays `tasks.dataset.QuestionPart` memory-maps.

Shared by easy-VQA, VQA v2, GQA and NLVR2: all reduce to question texts, an image row per
question (NLVR2: two, one per image of the pair), soft labels ``{answer: score}``, and answer /
question types. Tokenisation happens here, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks import store as st
from tasks.tokenization import Tokenizer, encode_fixed


def write_part(
    directory: Path,
    *,
    texts: Sequence[str],
    image_index: np.ndarray,
    labels: Sequence[dict[str, float]],
    question_ids: np.ndarray,
    answer_types: Sequence[str],
    question_types: Sequence[str],
    ans2label: dict[str, int],
    tokenizer: Tokenizer,
    max_seq_len: int,
    extra_meta: dict | None = None,
    source_ids: Sequence[str] | None = None,
) -> dict:
    """Tokenise and store one split; return its ``meta.json`` content.

    Args:
        directory: an empty directory (the store's temporary name).
        texts: N question strings.
        image_index: (N,) row of each question's image in its feature store, or (N, K) rows of
            its K images (NLVR2: K = 2, ``img0`` then ``img1``).
        labels: N soft-label dicts ``{answer: score}`` (empty for unlabelled test questions).
            Answers missing from ``ans2label`` are dropped from the targets and counted.
        question_ids: (N,) int64 ids, unique within the split.
        answer_types: N answer types (``yes/no`` / ``number`` / ``other``; ``""`` if unknown).
        question_types: N question types (e.g. VQA's ``what color is the``).
        ans2label: answer string -> target column.
        tokenizer: the resolved tokenizer.
        max_seq_len: T, tokens per question including ``[CLS]`` / ``[SEP]``.
        extra_meta: merged into the returned meta (provenance).
        source_ids: N ids as the source file writes them, when they are not the integer
            ``question_ids`` (GQA's string question ids, NLVR2's identifiers); kept in
            ``source_ids.json`` for results files.

    Returns:
        The meta dict (counts: ``questions``, ``oov_labels``, ``questions_with_oov``, ``truncated``).
    """
    n = len(texts)
    ids, lengths = encode_fixed(tokenizer, list(texts), max_seq_len)
    k = max([1, *(len(lab) for lab in labels)])
    label_idx = np.full((n, k), -1, np.int32)
    label_score = np.zeros((n, k), np.float32)
    n_oov = np.zeros(n, np.int16)
    for i, lab in enumerate(labels):
        j = 0
        for ans, score in lab.items():
            col = ans2label.get(ans)
            if col is None:
                n_oov[i] += 1
                continue
            label_idx[i, j], label_score[i, j] = col, score
            j += 1
    at_names = sorted(set(answer_types))
    qt_names = sorted(set(question_types))
    at_code = {a: i for i, a in enumerate(at_names)}
    qt_code = {q: i for i, q in enumerate(qt_names)}
    arrays = {
        "input_ids": ids,
        "lengths": lengths,
        "image_index": np.asarray(image_index, np.int32),
        "label_idx": label_idx,
        "label_score": label_score,
        "question_id": np.asarray(question_ids, np.int64),
        "answer_type": np.array([at_code[a] for a in answer_types], np.int16).reshape(n),
        "question_type": np.array([qt_code[q] for q in question_types], np.int16).reshape(n),
        "n_oov": n_oov,
    }
    for name, a in arrays.items():
        if len(a) != n:
            raise ValueError(f"{name} has {len(a)} rows for {n} questions")
        st.save(directory, name, a)
    st.write_json(directory / "texts.json", list(texts))
    st.write_json(directory / "labels.json", [dict(lab) for lab in labels])
    if source_ids is not None:
        if len(source_ids) != n:
            raise ValueError(f"source_ids has {len(source_ids)} rows for {n} questions")
        st.write_json(directory / "source_ids.json", [str(i) for i in source_ids])
    meta = {
        "questions": n,
        "oov_labels": int(n_oov.sum()),
        "questions_with_oov": int((n_oov > 0).sum()),
        "truncated": int((lengths > max_seq_len).sum()),
        "longest": int(lengths.max()) if n else 0,
        "max_seq_len": max_seq_len,
        "tokenizer": tokenizer.name,
        "tokenizer_key": tokenizer.key,
        "answer_type_names": at_names,
        "question_type_names": qt_names,
    }
    meta.update(extra_meta or {})
    return meta
