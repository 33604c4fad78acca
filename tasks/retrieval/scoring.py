"""Scoring a retrieval set with a model: matching-head pair scores (N x M forwards) or embedding
similarity (N + M single-modality encodings).

* ``itm``: every (image, text) pair through the whole encoder and the matching head; the score is
  the head's log-odds of "matched", ``logit[1] - logit[0]``: the same order as the matching
  probability (Hendricks et al. 2021, VOLTA), without the ties that probabilities saturating at
  1.0 in float32 would create.
* ``embedding``: each text and each image through its own single-modality stack
  (:meth:`models.LxmertModel.encode_unimodal`), mean-pooled and projected by the contrastive head
  (:class:`models.heads.ContrastiveHead`); the score is the cosine similarity. Needs a model with a
  contrastive head.

The model is anything shaped like :class:`models.LxmertForPretraining` (``model(**inputs,
heads=(...,))``, ``model.lxmert.encode_unimodal``, ``model.heads``); tasks/ never imports models.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from tasks.retrieval.data import RetrievalSet
from tasks.retrieval.metrics import embedding_scores, retrieval_metrics, score_pairs

SCORINGS: tuple[str, ...] = ("itm", "embedding")


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def itm_scorer(model: torch.nn.Module, rset: RetrievalSet,
               autocast: Callable[[], AbstractContextManager] = nullcontext) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:  # fmt: skip
    """``(image_idx (P,), text_idx (P,)) -> (P,)`` matching log-odds of those pairs (no gradient)."""
    device = _device(model)

    def score(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in rset.pair_batch(image_idx.numpy(), text_idx.numpy()).items()}
        with torch.no_grad(), autocast():
            logits = model(**batch, heads=("match",)).match.float()
        return logits[:, 1] - logits[:, 0]

    return score


def embed(model: torch.nn.Module, rset: RetrievalSet, batch_size: int = 256,
          autocast: Callable[[], AbstractContextManager] = nullcontext) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(image embeddings (N_images, D), text embeddings (N_texts, D)) from the contrastive head."""
    if "contrastive" not in getattr(model, "heads", {}):
        raise ValueError("embedding scoring needs a model with a contrastive head (pretrain.tasks with contrastive); "
                         "use scoring=itm")  # fmt: skip
    device = _device(model)
    head = model.heads["contrastive"]
    texts, images = [], []
    with torch.no_grad(), autocast():
        for start in range(0, rset.n_texts, batch_size):
            b = {k: v.to(device) for k, v in rset.text_batch(np.arange(start, min(start + batch_size, rset.n_texts))).items()}
            lang, _ = model.lxmert.encode_unimodal(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            texts.append(head.embed_text(lang, b["attention_mask"]).float().cpu())
        for start in range(0, rset.n_images, batch_size):
            b = {k: v.to(device) for k, v in rset.image_batch(np.arange(start, min(start + batch_size, rset.n_images))).items()}
            _, visn = model.lxmert.encode_unimodal(visual_feats=b["visual_feats"], visual_pos=b["visual_pos"])
            images.append(head.embed_image(visn).float().cpu())
    return torch.cat(images).numpy(), torch.cat(texts).numpy()


def evaluate(model: torch.nn.Module, rset: RetrievalSet, scoring: str = "itm", *, batch_size: int = 256,
             ties: str = "pessimistic", log: Callable[[str], None] | None = print,
             autocast: Callable[[], AbstractContextManager] = nullcontext) -> tuple[dict[str, float], np.ndarray]:  # fmt: skip
    """Zero-shot retrieval metrics of ``model`` on ``rset``.

    Args:
        model: A pretraining model (matching head for ``itm``, contrastive head for ``embedding``).
        rset: The retrieval set (``rset.subset(n)`` for a smaller candidate set).
        scoring: ``itm`` or ``embedding``.
        batch_size: Pairs (itm) or texts / images (embedding) per forward.
        ties: :func:`tasks.retrieval.metrics.retrieval_metrics`'s tie rule.
        log: Progress and timing messages (None: silent).
        autocast: A context factory for the forwards (bf16 on a GPU).

    Returns:
        (metrics: :func:`retrieval_metrics`'s plus ``seconds`` and, for itm, ``pairs_per_s``;
        the (N_images, N_texts) score matrix).
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r}; valid: {list(SCORINGS)}")
    was_training = model.training
    model.eval()
    try:
        if scoring == "itm":
            scores, info = score_pairs(itm_scorer(model, rset, autocast), rset.n_images, rset.n_texts, batch_size, log)
            extra = {"seconds": info["seconds"], "pairs_per_s": info["pairs_per_s"]}
        else:
            import time

            t0 = time.perf_counter()
            image_emb, text_emb = embed(model, rset, batch_size, autocast)
            scores = embedding_scores(image_emb, text_emb)
            extra = {"seconds": time.perf_counter() - t0}
            if log is not None:
                log(f"embedded {rset.n_images:,} images + {rset.n_texts:,} texts in {extra['seconds']:.1f} s")
    finally:
        model.train(was_training)
    return {**retrieval_metrics(scores, rset.text_image, ties), **extra}, scores
