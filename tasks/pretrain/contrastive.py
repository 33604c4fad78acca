"""Image-text contrastive losses (InfoNCE), for the ``contrastive`` pretraining objective and for
Hendricks et al.'s contrastive image-text matching.

InfoNCE (van den Oord et al. 2018, https://arxiv.org/abs/1807.03748): for a query with one positive
among candidates scored ``s_j``, ``loss = -log softmax(s)[positive]``.

* :func:`in_batch_info_nce` (CLIP, Radford et al. 2021, https://arxiv.org/abs/2103.00020): text and
  image embeddings of B image-text pairs; each text's candidates are the batch's images plus any
  extra negatives (e.g. a :class:`NegativeQueue` of earlier batches', MoCo-style), and each image's
  the batch's texts plus extras; ``s = scale * cos``; the two directions' losses are averaged.
  Rows that share an image (several captions of one image in a batch), or a coarser key the corpus
  names, are not each other's negatives: they are removed from each other's candidates.
* :func:`group_info_nce` and :func:`itm_info_nce`: one positive and K negative pairs per image
  scored by the matching head through the whole (cross-modal) encoder, Hendricks et al. 2021's
  "contrastive ITM" (https://arxiv.org/abs/2102.00529; 32 or 1,024 negatives there);
  :func:`negative_pairs` lays a batch out for it.

Which states the embeddings come from matters: in a model with cross-modal attention the final
states of a pair have seen each other, so comparing them across pairs compares images through the
texts they came with. :class:`models.heads.ContrastiveHead` therefore reads the single-modality
states (the encoder's ``unimodal`` tap), and pair scores through the fusion layers come from the
matching head (contrastive ITM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The additive value that removes a candidate (finite: a row whose candidates are all removed
#: keeps a defined, if useless, loss instead of NaN).
_REMOVED = -1e9

#: The batch entries that describe the text of a pair (everything else describes the image).
TEXT_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class ContrastiveResult:
    """What a contrastive loss returns.

    Attributes:
        loss: 0-d mean loss over the queries (both directions averaged for in-batch InfoNCE).
        n: Pairs (queries per direction) the loss averages over.
        correct: Queries whose positive scored highest (summed over both directions, then halved,
            so ``correct / n`` is the mean top-1 accuracy of the two directions).
        parts: Per-direction losses, detached (``contrastive_t2i``, ``contrastive_i2t``).
        candidates: Candidates per query (in-batch + extra), before removing same-image ones.
    """

    loss: Tensor
    n: int
    correct: float
    parts: dict[str, float]
    candidates: int


def info_nce(logits: Tensor, target: Tensor, removed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """InfoNCE of scored candidates: cross-entropy of each row's positive.

    Args:
        logits: (N, C) scaled scores (``scale * similarity``, or pair scores / temperature).
        target: (N,) column of each row's positive.
        removed: (N, C) bool, candidates that take no part (never the positive), or None.

    Returns:
        (per-row loss (N,), per-row hit (N,) bool: the positive scored strictly highest).
    """
    if removed is not None:
        logits = logits.masked_fill(removed, _REMOVED)
    loss = F.cross_entropy(logits.float(), target, reduction="none")
    pos = logits.gather(1, target[:, None])
    others = logits.scatter(1, target[:, None], float("-inf"))
    return loss, (pos[:, 0] > others.amax(1))


def in_batch_info_nce(
    text: Tensor,
    image: Tensor,
    scale: Tensor | float,
    *,
    groups: Tensor | None = None,
    extra_text: Tensor | None = None,
    extra_image: Tensor | None = None,
    extra_text_groups: Tensor | None = None,
    extra_image_groups: Tensor | None = None,
    symmetric: bool = True,
) -> ContrastiveResult:
    """Symmetric InfoNCE over in-batch negatives plus optional extra negatives.

    Args:
        text: (B, D) text embeddings of B true pairs (unit vectors for cosine similarity).
        image: (B, D) their images' embeddings.
        scale: ``1 / temperature``: a float (fixed) or a 0-d tensor (learned, gets a gradient).
        groups: (B,) int, rows with equal values are not each other's negatives (same image, or a
            coarser key: see ``PretrainCorpus.image_keys``); None: every other row is a negative.
        extra_text: (K, D) extra negative texts for the image queries (e.g. a queue), or None.
        extra_image: (K', D) extra negative images for the text queries, or None.
        extra_text_groups, extra_image_groups: (K,), (K',) their groups (removed where equal to
            the query's group); None: all are negatives.
        symmetric: Average the text->image and image->text losses (CLIP); else text->image only.

    Returns:
        :class:`ContrastiveResult` (``n = B``).
    """
    b = text.shape[0]
    if image.shape[0] != b:
        raise ValueError(f"text has {b} rows but image has {image.shape[0]}")
    target = torch.arange(b, device=text.device)
    g = groups if groups is not None else target
    same = (g[:, None] == g[None, :]) & ~torch.eye(b, dtype=torch.bool, device=text.device)

    def direction(queries: Tensor, keys: Tensor, extra: Tensor | None, extra_groups: Tensor | None):
        cands = keys if extra is None else torch.cat([keys, extra.to(keys.dtype)], 0)
        logits = scale * (queries @ cands.T)
        removed = same
        if extra is not None:
            if extra_groups is None:
                extra_removed = torch.zeros(b, extra.shape[0], dtype=torch.bool, device=text.device)
            else:
                extra_removed = g[:, None] == extra_groups.to(g.device)[None, :]
            removed = torch.cat([same, extra_removed], 1)
        loss, hit = info_nce(logits, target, removed)
        return loss.mean(), float(hit.sum()), cands.shape[0]

    t2i, hit_t, c_t = direction(text, image, extra_image, extra_image_groups)
    parts = {"contrastive_t2i": float(t2i.detach())}
    if not symmetric:
        return ContrastiveResult(t2i, b, hit_t, parts, c_t)
    i2t, hit_i, _ = direction(image, text, extra_text, extra_text_groups)
    parts["contrastive_i2t"] = float(i2t.detach())
    return ContrastiveResult((t2i + i2t) / 2, b, (hit_t + hit_i) / 2, parts, c_t)


def group_info_nce(scores: Tensor, temperature: float | Tensor = 1.0) -> ContrastiveResult:
    """InfoNCE over groups of pair scores: column 0 the positive, columns 1..K the negatives.

    Args:
        scores: (B, 1 + K) pair scores (e.g. matching-head log-odds).
        temperature: Divides the scores.

    Returns:
        :class:`ContrastiveResult` (``n = B``; ``parts`` empty).
    """
    b = scores.shape[0]
    loss, hit = info_nce(scores / temperature, torch.zeros(b, dtype=torch.long, device=scores.device))
    return ContrastiveResult(loss.mean(), b, float(hit.sum()), {}, scores.shape[1])


def itm_info_nce(match_logits: Tensor, group_size: int, temperature: float | Tensor = 1.0) -> ContrastiveResult:
    """Contrastive image-text matching (Hendricks et al. 2021): the matching head's log-odds of
    ``matched`` for each pair, grouped ``1 + K`` rows per image (positive first, as
    :func:`negative_pairs` lays them out), under :func:`group_info_nce`.

    Args:
        match_logits: (B * group_size, 2) matching logits (class 1 = matched).
        group_size: 1 + K.
        temperature: Divides the log-odds.
    """
    if match_logits.shape[0] % group_size:
        raise ValueError(f"{match_logits.shape[0]} matching rows are not groups of {group_size}")
    log_odds = (match_logits[:, 1] - match_logits[:, 0]).float()
    return group_info_nce(log_odds.view(-1, group_size), temperature)


def negative_pairs(batch: dict[str, Tensor], k: int, groups: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
    """Lay a batch of B true pairs out for contrastive ITM: each image with its own text, then K
    texts of other rows of the batch whose group differs (B * (1 + K) rows, grouped per image).

    Args:
        batch: Model inputs of true pairs: the :data:`TEXT_KEYS` (B, T) and the image entries
            (``visual_feats`` (B, R, F), ``visual_pos``, optionally ``visual_attention_mask``).
        k: Negatives per image.
        groups: (B,) group of each row (texts of the same group are never drawn as negatives).
        generator: Draws the negatives (seed it per batch for reproducible batches).

    Returns:
        The model inputs, B * (1 + K) rows, plus ``match_labels`` (1 for each group's first row, 0
        after) and ``pair_text`` (the row whose text each pair shows).

    Raises:
        ValueError: some row has fewer than ``k`` rows of another group to draw from.
    """
    b = groups.shape[0]
    other = groups[:, None] != groups[None, :]  # (B, B) allowed negatives
    short = (other.sum(1) < k).nonzero().flatten().tolist()
    if short:
        raise ValueError(f"rows {short[:5]} have fewer than k={k} texts of another image in a batch of {b}; "
                         "use a larger batch or fewer negatives")  # fmt: skip
    noise = torch.rand(b, b, generator=generator).to(other.device)
    # The k allowed rows with the largest noise: a uniform draw without replacement per row.
    drawn = noise.masked_fill(~other, -1.0).topk(k, dim=1).indices if k else other.new_zeros(b, 0, dtype=torch.long)
    text_rows = torch.cat([torch.arange(b, device=groups.device)[:, None], drawn], 1).reshape(-1)
    image_rows = torch.arange(b, device=groups.device).repeat_interleave(1 + k)
    out = {key: (value[text_rows] if key in TEXT_KEYS else value[image_rows])
           for key, value in batch.items() if value is not None and key in (*TEXT_KEYS, "visual_feats", "visual_pos",
                                                                             "visual_attention_mask")}  # fmt: skip
    labels = torch.zeros(b, 1 + k, dtype=torch.long, device=groups.device)
    labels[:, 0] = 1
    out["match_labels"] = labels.reshape(-1)
    out["pair_text"] = text_rows
    return out


class NegativeQueue(nn.Module):
    """A FIFO of earlier batches' text and image embeddings, the extra negatives of
    :func:`in_batch_info_nce` (MoCo's queue, He et al. 2020, https://arxiv.org/abs/1911.05722).

    Buffers (saved in ``state_dict``, so a resumed run continues with the same negatives); entries
    are detached (no gradient flows into earlier batches). Under DDP each rank keeps its own.

    Args:
        size: Capacity K (the number of extra negatives once full).
        dim: Embedding size D.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"NegativeQueue(size={size}, dim={dim}): both must be >= 1")
        self.size = size
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("groups", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def negatives(self) -> dict[str, Tensor]:
        """The stored entries as ``in_batch_info_nce`` keyword arguments (empty tensors when empty)."""
        n = int(self.filled)
        return {"extra_text": self.text[:n], "extra_image": self.image[:n],
                "extra_text_groups": self.groups[:n], "extra_image_groups": self.groups[:n]}  # fmt: skip

    @torch.no_grad()
    def push(self, text: Tensor, image: Tensor, groups: Tensor) -> None:
        """Add B pairs' embeddings (the oldest entries go first when full)."""
        b = min(text.shape[0], self.size)
        text, image, groups = text[-b:], image[-b:], groups[-b:]
        idx = (int(self.ptr) + torch.arange(b)) % self.size
        self.text[idx] = text.detach().to(self.text.dtype)
        self.image[idx] = image.detach().to(self.image.dtype)
        self.groups[idx] = groups.to(self.groups.dtype)
        self.ptr.fill_((int(self.ptr) + b) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + b))


def batch_groups(batch: dict[str, Tensor], n: int, device: torch.device) -> Tensor:
    """The rows' groups: ``image_key`` when the corpus provides it, else each row its own."""
    key = batch.get("image_key")
    return key.to(device) if key is not None else torch.arange(n, device=device)
