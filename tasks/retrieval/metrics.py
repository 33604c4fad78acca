"""Zero-shot image-text retrieval metrics: recall at K, median and mean rank, both directions.

Input: a score matrix ``scores`` (N_images, N_texts), higher = more alike, and ``text_image``
(N_texts,), the image each text describes (several texts per image: COCO and Flickr30k have 5).

* **text -> image** (image retrieval): each text ranks the N_images images; its rank is that of its
  own image.
* **image -> text** (text retrieval): each image ranks the N_texts texts; its rank is that of its
  best-ranked own text (the first hit), as in VSE++, UNITER and VOLTA.

**Ties.** The rank of a query's (best) positive is ``1 + (negatives scoring strictly higher)`` plus,
by default (``ties="pessimistic"``), every negative scoring *equal*: a tie counts against the
model. With the optimistic rule a collapsed model that gives every pair the same score would rank
every positive first and score R@1 = 100; with the pessimistic rule it ranks them last. Ties are
not hypothetical: matching probabilities saturate at 1.0 in float32 (rank by the log-odds, as
:mod:`tasks.retrieval.scoring` does, to keep them apart), and a model whose text side ignores the
image scores all images of a text alike. ``ties="optimistic"`` gives the other bound; the
``*_tied`` counts say how many queries the choice affects. (A sort-based evaluation breaks ties by
candidate index, which rewards whatever order the files happen to list.)

Recall at K is the percentage of queries with rank <= K; the median rank is ``np.median`` of the
1-based ranks (``x.5`` for an even number of queries with different middle ranks); ``rsum`` is the
sum of the six recalls.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

TIES: tuple[str, ...] = ("pessimistic", "optimistic")
RECALL_AT: tuple[int, ...] = (1, 5, 10)
#: Queries per block when counting (bounds the temporary (block, candidates) arrays).
_BLOCK = 1024


def _check(scores: np.ndarray, text_image: np.ndarray, ties: str) -> tuple[np.ndarray, np.ndarray]:
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}; valid: {list(TIES)}")
    scores = np.asarray(scores)
    text_image = np.asarray(text_image, np.int64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N_images, N_texts), got shape {scores.shape}")
    n_img, n_txt = scores.shape
    if text_image.shape != (n_txt,):
        raise ValueError(f"text_image has shape {text_image.shape}; the scores have {n_txt} texts")
    bad = np.flatnonzero((text_image < 0) | (text_image >= n_img))
    if len(bad):
        raise ValueError(f"texts {bad[:5].tolist()} point to images outside [0, {n_img})")
    orphans = np.setdiff1d(np.arange(n_img), text_image)
    if len(orphans):
        raise ValueError(f"images {orphans[:5].tolist()} have no text ({len(orphans)} in all): they cannot be retrieved by text")
    nan = np.argwhere(np.isnan(scores))
    if len(nan):
        raise ValueError(f"scores hold NaN, first at image {int(nan[0, 0])}, text {int(nan[0, 1])}")
    return scores, text_image


def text_to_image_ranks(scores: np.ndarray, text_image: np.ndarray, ties: str = "pessimistic") -> tuple[np.ndarray, np.ndarray]:
    """1-based rank of each text's image among all images.

    Args:
        scores: (N_images, N_texts).
        text_image: (N_texts,) the image of each text.
        ties: ``pessimistic`` (an equal-scoring image ranks above) or ``optimistic``.

    Returns:
        (ranks (N_texts,) int64, tied (N_texts,) bool: some other image scored equal).
    """
    scores, text_image = _check(scores, text_image, ties)
    n_txt = scores.shape[1]
    ranks = np.empty(n_txt, np.int64)
    tied = np.empty(n_txt, bool)
    for start in range(0, n_txt, _BLOCK):
        cols = np.arange(start, min(start + _BLOCK, n_txt))
        s = scores[:, cols].T  # (block, N_images)
        own = s[np.arange(len(cols)), text_image[cols]][:, None]
        above = (s > own).sum(1)
        equal = (s == own).sum(1) - 1  # not the image itself
        ranks[cols] = 1 + above + (equal if ties == "pessimistic" else 0)
        tied[cols] = equal > 0
    return ranks, tied


def image_to_text_ranks(scores: np.ndarray, text_image: np.ndarray, ties: str = "pessimistic") -> tuple[np.ndarray, np.ndarray]:
    """1-based rank of each image's best-ranked own text among all texts.

    Args:
        scores: (N_images, N_texts).
        text_image: (N_texts,) the image of each text.
        ties: ``pessimistic`` (a text of another image scoring equal to the best own text ranks
            above it) or ``optimistic``.

    Returns:
        (ranks (N_images,) int64, tied (N_images,) bool: another image's text scored equal to the
        best own text).
    """
    scores, text_image = _check(scores, text_image, ties)
    n_img, n_txt = scores.shape
    own_scores = scores[text_image, np.arange(n_txt)]  # (N_texts,) each text with its own image
    best = np.full(n_img, -np.inf, dtype=np.float64)
    np.maximum.at(best, text_image, own_scores.astype(np.float64))
    own_at_best = np.zeros(n_img, np.int64)  # own texts that reach the best (they are not negatives)
    np.add.at(own_at_best, text_image, own_scores == best[text_image].astype(scores.dtype))
    ranks = np.empty(n_img, np.int64)
    tied = np.empty(n_img, bool)
    for start in range(0, n_img, _BLOCK):
        rows = np.arange(start, min(start + _BLOCK, n_img))
        s = scores[rows]  # (block, N_texts)
        b = best[rows].astype(scores.dtype)[:, None]
        above = (s > b).sum(1)  # own texts never score above their best
        equal = (s == b).sum(1) - own_at_best[rows]
        ranks[rows] = 1 + above + (equal if ties == "pessimistic" else 0)
        tied[rows] = equal > 0
    return ranks, tied


def _summary(prefix: str, ranks: np.ndarray, tied: np.ndarray) -> dict[str, float]:
    out = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks <= k)) for k in RECALL_AT}
    out[f"{prefix}_medr"] = float(np.median(ranks))
    out[f"{prefix}_meanr"] = float(np.mean(ranks))
    out[f"{prefix}_tied"] = float(np.sum(tied))
    return out


def retrieval_metrics(scores: np.ndarray | torch.Tensor, text_image: np.ndarray | torch.Tensor,
                      ties: str = "pessimistic") -> dict[str, float]:  # fmt: skip
    """Image->text and text->image recall at 1/5/10, median and mean rank.

    Args:
        scores: (N_images, N_texts) pair scores (higher = better match).
        text_image: (N_texts,) index of each text's image; every image needs at least one text.
        ties: How a negative scoring equal to the positive counts (module docstring).

    Returns:
        ``i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, i2t_tied`` (queries = images) and the same
        with ``t2i_`` (queries = texts), ``rsum`` (the six recalls summed), ``n_images``,
        ``n_texts``. Recalls are percentages.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    if isinstance(text_image, torch.Tensor):
        text_image = text_image.detach().cpu().numpy()
    i2t = _summary("i2t", *image_to_text_ranks(scores, text_image, ties))
    t2i = _summary("t2i", *text_to_image_ranks(scores, text_image, ties))
    out = {**i2t, **t2i}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_AT)
    out["n_images"], out["n_texts"] = float(scores.shape[0]), float(scores.shape[1])
    return out


def score_pairs(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n_images: int,
    n_texts: int,
    batch_size: int = 512,
    log: Callable[[str], None] | None = print,
    every_s: float = 30.0,
) -> tuple[np.ndarray, dict[str, float]]:
    """Score every image-text pair in batches: the N_images x N_texts matrix of a pair scorer.

    Pairs go image by image (each batch holds consecutive texts of one or more images), so a
    scorer can reuse an image's features; the matrix is filled in place.

    Args:
        score_fn: ``(image_idx (P,), text_idx (P,)) -> (P,)`` scores of those pairs (e.g. the
            matching head's log-odds, :func:`tasks.retrieval.scoring.itm_scorer`).
        n_images, n_texts: The candidate sets.
        batch_size: Pairs per call.
        log: Progress messages (pairs done, rate, time left) every ``every_s`` seconds and a final
            line stating N x M and the time; None: silent.
        every_s: Seconds between progress messages.

    Returns:
        (scores (N_images, N_texts) float32, ``{"pairs", "seconds", "pairs_per_s"}``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    total = n_images * n_texts
    out = np.empty((n_images, n_texts), np.float32)
    flat = out.reshape(-1)
    t0 = last = time.perf_counter()
    for start in range(0, total, batch_size):
        idx = torch.arange(start, min(start + batch_size, total))
        values = score_fn(idx // n_texts, idx % n_texts)
        flat[start : start + len(idx)] = values.detach().float().cpu().numpy().reshape(-1)
        now = time.perf_counter()
        if log is not None and now - last >= every_s:
            done = start + len(idx)
            rate = done / (now - t0)
            log(f"scoring pairs: {done:,}/{total:,} ({100 * done / total:.1f}%), {rate:,.0f} pairs/s, "
                f"{(total - done) / rate:,.0f} s left")  # fmt: skip
            last = now
    seconds = time.perf_counter() - t0
    info = {"pairs": float(total), "seconds": seconds, "pairs_per_s": total / seconds if seconds > 0 else float("inf")}
    if log is not None:
        log(f"scored {n_images:,} images x {n_texts:,} texts = {total:,} pairs in {seconds:,.1f} s "
            f"({info['pairs_per_s']:,.0f} pairs/s)")  # fmt: skip
    return out, info


def embedding_scores(image_emb: np.ndarray | torch.Tensor, text_emb: np.ndarray | torch.Tensor) -> np.ndarray:
    """Cosine similarities (N_images, N_texts) of image and text embeddings ((N, D), (M, D))."""
    a = torch.as_tensor(image_emb, dtype=torch.float32)
    b = torch.as_tensor(text_emb, dtype=torch.float32)
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    return (a @ b.T).numpy()
