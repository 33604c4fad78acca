"""LXMERT's four pretraining objectives as loss functions over a model output and a batch.

Each objective reads the head of the same name of :class:`models.LxmertForPretraining` (Tan &
Bansal 2019, https://arxiv.org/abs/1908.07490, Sec. 3.1) and returns a :class:`TaskLoss`: the loss
as a mean over its ``n`` terms (so weighting strategies can normalise for how many terms a batch
gave the task), loggable components and an accuracy.

* ``mlm``: cross-entropy of the original word at the masked positions (the input keeps the image:
  "masked cross-modality LM").
* ``mor``: masked object prediction, per masked region: SmoothL1 regression of the region's input
  feature (mean over the F dimensions) + cross-entropy of the detected object label + of the
  detected attribute, each label term weighted by the detector's confidence (LXMERT). LXMERT's
  released code applies the two label terms to every region; the paper (and we) to the masked
  ones, where they are a prediction rather than a read-out of the input.
* ``match``: 2-way cross-entropy, is the sentence the image's (LXMERT's ``seq_relationship``), over
  the sentences that take part in matching (all in LXMERT's corpus, the captions in the synthetic one).
* ``qa``: cross-entropy over the image-QA answers, for matched questions only.
* ``contrastive`` (not LXMERT's): image-text InfoNCE over the batch's true pairs
  (:func:`tasks.pretrain.contrastive.in_batch_info_nce`) on the contrastive head's embeddings of
  the single-modality states, plus any extra negatives the outputs carry (a
  :class:`tasks.pretrain.contrastive.NegativeQueue`'s); rows of the same ``image_key`` are not each
  other's negatives.

``chance_scale`` is each objective's output-gradient norm per loss term for an uninformed
predictor, the output-size normaliser of the gradient-std weighting (docs/pretraining.md):
softmax cross-entropy over K classes at the uniform prediction has ``||p - y|| = sqrt(1 - 1/K)``;
SmoothL1 (beta 1) averaged over F standardised dimensions, predicting their mean, has
``sqrt(E[clamp(r, -1, 1)^2] / F) = sqrt((1 - 2 phi(1)) / F)`` for r ~ N(0, 1); a sum of terms on
disjoint outputs adds in quadrature. For ``contrastive`` it is 1, the limit of ``sqrt(1 - 1/C)`` for
its batch-sized candidate sets (C = 64 gives 0.992).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

#: E[clamp(r, -1, 1)^2] for r ~ N(0, 1): 1 - 2 phi(1), phi the standard normal density.
SMOOTH_L1_CHANCE = 1.0 - 2.0 * math.exp(-0.5) / math.sqrt(2 * math.pi)


@dataclass
class TaskLoss:
    """One objective on one batch.

    Attributes:
        loss: 0-d tensor, the mean over ``n`` terms (0, still in the graph, when ``n == 0``).
        n: Loss terms in the batch (masked tokens, masked regions, pairs, answered questions).
        parts: Components, detached, e.g. ``{"mor_feat": 0.41, "mor_obj": 0.90, "mor_attr": 1.2}``.
        correct: Correct predictions among the ``n`` terms (accuracy = correct / n), or None.
    """

    loss: Tensor
    n: int
    parts: dict[str, float] = field(default_factory=dict)
    correct: float | None = None


def _empty(logits: Tensor) -> TaskLoss:
    # Zero, connected to the graph (DDP and the weighting see a defined, zero gradient).
    return TaskLoss(loss=logits.float().sum() * 0.0, n=0, correct=0.0)


def mlm_loss(out, batch: dict[str, Tensor]) -> TaskLoss:
    """Masked LM: ``out.mlm`` (N, V) holds the logits of the ``mlm_labels >= 0`` positions."""
    labels = batch["mlm_labels"][batch["mlm_labels"] >= 0]
    if labels.numel() == 0:
        return _empty(out.mlm)
    logits = out.mlm.float()
    return TaskLoss(F.cross_entropy(logits, labels), int(labels.numel()),
                    correct=float((logits.argmax(-1) == labels).sum()))  # fmt: skip


def mor_loss(out, batch: dict[str, Tensor]) -> TaskLoss:
    """Masked object prediction: ``out.mor`` holds the ``region_mask`` regions' predictions."""
    mask = batch["region_mask"]
    n = int(mask.sum())
    if n == 0:
        return _empty(out.mor["feat"])
    feat = F.smooth_l1_loss(out.mor["feat"].float(), batch["feat_targets"][mask], reduction="none").mean(-1)
    obj_logits, attr_logits = out.mor["obj"].float(), out.mor["attr"].float()
    obj_t, attr_t = batch["obj_labels"][mask], batch["attr_labels"][mask]
    obj = F.cross_entropy(obj_logits, obj_t, reduction="none") * batch["obj_conf"][mask]
    attr = F.cross_entropy(attr_logits, attr_t, reduction="none") * batch["attr_conf"][mask]
    loss = (feat + obj + attr).mean()
    parts = {"mor_feat": float(feat.detach().mean()), "mor_obj": float(obj.detach().mean()),
             "mor_attr": float(attr.detach().mean())}  # fmt: skip
    return TaskLoss(loss, n, parts, correct=float((obj_logits.argmax(-1) == obj_t).sum()))


def match_loss(out, batch: dict[str, Tensor]) -> TaskLoss:
    """Image-sentence matching over the pairs with a label (1 = matched, 0 = not; -1 = no part)."""
    valid = batch["match_labels"] >= 0
    if not bool(valid.any()):
        return _empty(out.match)
    labels = batch["match_labels"][valid]
    logits = out.match.float()[valid]
    return TaskLoss(F.cross_entropy(logits, labels), int(labels.numel()),
                    correct=float((logits.argmax(-1) == labels).sum()))  # fmt: skip


def qa_loss(out, batch: dict[str, Tensor]) -> TaskLoss:
    """Image QA over the matched questions (``qa_labels >= 0``)."""
    labels = batch["qa_labels"]
    valid = labels >= 0
    if not bool(valid.any()):
        return _empty(out.qa)
    logits = out.qa.float()[valid]
    target = labels[valid]
    return TaskLoss(F.cross_entropy(logits, target), int(valid.sum()),
                    correct=float((logits.argmax(-1) == target).sum()))  # fmt: skip


def contrastive_loss(out, batch: dict[str, Tensor]) -> TaskLoss:
    """Image-text InfoNCE: ``out.contrastive`` holds ``text`` / ``image`` (B, D) unit embeddings and
    ``scale``, optionally ``extra_text`` / ``extra_image`` (+ ``_groups``) negatives. The queries
    are the true pairs: ``match_labels == 1`` (a mismatched row's text is not its image's), every
    row when the batch has no matching labels."""
    from tasks.pretrain.contrastive import batch_groups, in_batch_info_nce

    c = out.contrastive
    text, image = c["text"], c["image"]
    labels = batch.get("match_labels")
    valid = labels == 1 if labels is not None else torch.ones(text.shape[0], dtype=torch.bool, device=text.device)
    n = int(valid.sum())
    if n == 0:
        return _empty(text)
    groups = batch_groups(batch, text.shape[0], text.device)[valid]
    extras = {k: c[k] for k in ("extra_text", "extra_image", "extra_text_groups", "extra_image_groups") if k in c}
    r = in_batch_info_nce(text[valid], image[valid], c["scale"], groups=groups, **extras)
    return TaskLoss(r.loss, r.n, r.parts, correct=r.correct)


@dataclass(frozen=True)
class Objective:
    """A registry entry: the loss and the output-size normaliser of one task.

    Attributes:
        name: ``mlm | mor | match | qa | contrastive`` (also the model head it reads).
        loss: ``(model output, batch) -> TaskLoss``.
        chance_scale: ``sizes -> float``, the output-gradient norm per term of an uninformed
            predictor (module docstring); ``sizes`` has ``vocab_size``, ``num_object_labels``,
            ``num_attr_labels``, ``visual_feat_dim``, ``num_qa_answers``.
    """

    name: str
    loss: Callable[..., TaskLoss]
    chance_scale: Callable[[dict[str, int]], float]


def _ce_chance(k: int) -> float:
    return math.sqrt(max(1.0 - 1.0 / max(k, 1), 0.0))


OBJECTIVES: dict[str, Objective] = {
    "mlm": Objective("mlm", mlm_loss, lambda s: _ce_chance(s["vocab_size"])),
    "mor": Objective("mor", mor_loss, lambda s: math.sqrt(
        SMOOTH_L1_CHANCE / s["visual_feat_dim"] + _ce_chance(s["num_object_labels"]) ** 2
        + _ce_chance(s["num_attr_labels"]) ** 2)),
    "match": Objective("match", match_loss, lambda s: _ce_chance(2)),
    "qa": Objective("qa", qa_loss, lambda s: _ce_chance(s["num_qa_answers"])),
    "contrastive": Objective("contrastive", contrastive_loss, lambda s: 1.0),
}  # fmt: skip


def get(name: str) -> Objective:
    """The objective ``name``; an unknown name raises listing the valid ones."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown pretraining objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def chance_scales(tasks: list[str], sizes: dict[str, int]) -> dict[str, float]:
    """``{task: chance_scale}`` for ``tasks``."""
    return {t: get(t).chance_scale(sizes) for t in tasks}
