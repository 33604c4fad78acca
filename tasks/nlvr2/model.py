"""NLVR2's forward pass and loss: the statement encoded with each image, the pair classified.

`pair_forward` runs the encoder ONCE on 2B (sentence, image) inputs, ordered
``[(s_0, img0_0), (s_0, img1_0), (s_1, img0_1), ...]`` as LXMERT's ``NLVR2Model`` flattens them, and
hands the pooled outputs, reshaped to (B, 2, H), to the pair head (`models.heads.PairHead`). The
encoder and the head are passed in (any modules with those call signatures): this module imports
nothing from models.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def pair_forward(encoder: nn.Module, head: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Encode each (statement, image) pair of a batch in one forward and classify the pair.

    Args:
        encoder: ``encoder(input_ids, attention_mask, token_type_ids, visual_feats, visual_pos)``
            returning an object with ``.pooled`` (2B, H) (`models.lxmert.LxmertModel`).
        head: (B, 2, H) -> (B, C) (`models.heads.PairHead`).
        batch: ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (B, T), ``visual_feats``
            (B, 2, R, F), ``visual_pos`` (B, 2, R, 4).

    Returns:
        ``{"logits": (B, C), "pooled": (B, 2, H)}``.
    """
    feats, pos = batch["visual_feats"], batch["visual_pos"]
    if feats.dim() != 4 or feats.shape[1] != 2 or pos.shape[:3] != feats.shape[:3]:
        raise ValueError(
            f"pair_forward needs visual_feats (B, 2, R, F) and visual_pos (B, 2, R, 4), got "
            f"{tuple(feats.shape)} and {tuple(pos.shape)}"
        )
    b = feats.shape[0]

    def twice(x: Tensor | None) -> Tensor | None:  # (B, T) -> (2B, T): s_0, s_0, s_1, s_1, ...
        return None if x is None else x.repeat_interleave(2, dim=0)

    out = encoder(
        twice(batch["input_ids"]),
        twice(batch.get("attention_mask")),
        twice(batch.get("token_type_ids")),
        feats.reshape(2 * b, *feats.shape[2:]),  # img0_0, img1_0, img0_1, ...: row-major (B, 2) flattened
        pos.reshape(2 * b, *pos.shape[2:]),
    )
    pooled = out.pooled.reshape(b, 2, -1)
    return {"logits": head(pooled), "pooled": pooled}


def pair_loss(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of the pair logits against the label (LXMERT's NLVR2 loss), mean over the
    labelled examples of the batch (an unlabelled one has an all-zero ``targets`` row).

    Args:
        outputs: `pair_forward`'s output (``logits`` (B, 2)).
        batch: with ``targets`` (B, 2), one-hot over (False, True).

    Returns:
        The scalar loss and ``{"ce": value, "labelled": count}`` for logging.
    """
    logits, targets = outputs["logits"], batch["targets"].to(outputs["logits"].device)
    labelled = targets.sum(1) > 0
    if not bool(labelled.any()):
        loss = logits.sum() * 0.0  # keeps the graph (DDP expects every rank to backpropagate)
    else:
        loss = F.cross_entropy(logits[labelled], targets[labelled].argmax(1))
    return loss, {"ce": float(loss.detach()), "labelled": float(labelled.sum())}


def swap_images(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same batch with ``img0`` and ``img1`` exchanged (for symmetry checks)."""
    out = dict(batch)
    out["visual_feats"] = batch["visual_feats"].flip(1)
    out["visual_pos"] = batch["visual_pos"].flip(1)
    return out
