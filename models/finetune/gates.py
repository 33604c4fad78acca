"""Gated units: ``a * finetuned(x) + (1 - a) * frozen(x)`` per sample, both branches on the same input.

SpotTune (Guo et al. 2019, https://arxiv.org/abs/1811.08737) keeps two copies of each unit of the
encoder: the one that fine-tunes and a frozen copy of the pretrained weights. A policy network
decides per sample which copy's output goes on; here both copies always run on the SAME input (the
reference LXMERT code's block variant fed the frozen layer the fine-tuned layer's output instead),
and their outputs are mixed with a decision ``a`` that is exactly 0 or 1 in the forward pass and
carries the straight-through gradient of the policy (:func:`straight_through_gumbel`).

Units wrap the encoder's own modules from outside (no edits to :mod:`models.lxmert`):

* :class:`GatedModule`: one decision for a whole module (a layer for ``spottune_block``, an attention
  or feed-forward sub-layer for ``spottune_res``); for the shared cross-attention of a cross layer,
  one decision per stream (``both``).
* :class:`GatedHeads`: per-head decisions inside an attention sub-layer (each head's q, k, v and
  kernel), plus one for its output (projection, dropout, residual, LayerNorm).
* :class:`GatedFeedForward`: the feed-forward's two parts, intermediate (fc1 + GeLU) and output
  (fc2, dropout, residual, LayerNorm).

Every unit reads its columns of the current decisions from a shared :class:`DecisionBoard` and
counts how often it took the fine-tuned branch (:meth:`GatedUnit.stats`); the frozen copy is marked
``frozen_copy`` so that :mod:`models.hooks` leaves its kernels alone (their span / alpha are the
pretrained ones: no penalty, no clamping, no second set of stats).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.lxmert import AttentionBlock, FeedForward


def straight_through_gumbel(logits: Tensor, temperature: float) -> Tensor:
    """Hard Gumbel-Softmax sample of the fine-tuned class with a soft (straight-through) gradient.

    Args:
        logits: (..., 2) policy logits, class 1 = fine-tuned.
        temperature: Gumbel-Softmax temperature.

    Returns:
        (...) decisions, exactly 0.0 or 1.0 in value; their gradient is that of the soft sample.
        (``F.gumbel_softmax(hard=True)`` computes ``hard - soft.detach() + soft``, whose value can be
        ``1 - ulp``; ``hard + (soft - soft.detach())`` adds an exact 0, so a unit forced to a branch
        reproduces that branch bit for bit.)
    """
    soft = F.gumbel_softmax(logits.float(), tau=temperature, hard=False)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return (hard + (soft - soft.detach()))[..., 1]


def mix(a: Tensor, finetuned: Any, frozen: Any) -> Any:
    """``a * finetuned + (1 - a) * frozen`` per sample, through tuples, lists and dicts of tensors.

    Args:
        a: (B,) or (B, k) decisions; trailing singleton dims are added to broadcast over each tensor
            (so (B, heads) decisions mix (B, heads, Q, d) head outputs head by head).
        finetuned: Output of the fine-tuned branch (tensor, None, or a container of them).
        frozen: The frozen branch's output, of the same structure.
    """
    if isinstance(finetuned, Tensor):
        w = a.reshape(*a.shape, *([1] * (finetuned.dim() - a.dim()))).to(finetuned.dtype)
        return w * finetuned + (1 - w) * frozen
    if isinstance(finetuned, (tuple, list)):
        return type(finetuned)(mix(a, f, g) for f, g in zip(finetuned, frozen, strict=True))
    if isinstance(finetuned, dict):
        return {key: mix(a, value, frozen[key]) for key, value in finetuned.items()}
    return finetuned  # None, flags


class DecisionBoard:
    """The decisions of the forward in progress, shared by the policy and every gated unit.

    A plain object, not a module: held by hundreds of units, a module would be registered (and
    saved) hundreds of times.

    Attributes:
        size: Number of decisions D.
        current: (B, D) decisions (1 = fine-tuned) while a forward runs, else None.
    """

    def __init__(self, size: int):
        self.size = size
        self.current: Tensor | None = None

    def read(self, start: int, stop: int) -> Tensor:
        """Columns ``start:stop`` of the current decisions, (B, stop - start)."""
        if self.current is None:
            raise RuntimeError(
                "a SpotTune gated unit ran outside a SpotTune forward: call the plan's encoder "
                "(models.finetune.SpotTuneEncoder), which draws the decisions, not the model inside it"
            )
        return self.current[:, start:stop]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter frozen, marked ``frozen_copy`` for the hooks."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    twin.frozen_copy = True
    return twin


class GatedUnit(nn.Module):
    """Base of the gated units: the two branches, the unit's decision columns and its usage counts.

    Args:
        finetuned: The module that fine-tunes (the encoder's own, with its pretrained weights).
        board: The shared decisions.
        start: First decision column of this unit.
        names: One name per decision of the unit (``head0``, ``out``, ...; empty string for one).

    Attributes:
        frozen: The frozen copy, taken when the unit is built (so after the pretrained weights were
            loaded into ``finetuned``). It follows the model's train / eval mode: in training its
            dropout is on, like the fine-tuned branch's, so neither branch is favoured by being
            noise-free, and a unit forced to frozen is exactly the ``frozen`` strategy's layer.
        train_used, train_seen: Samples that took the fine-tuned branch per decision / samples seen,
            counted in training forwards since the last :meth:`reset_usage` (int64 buffers: they ride
            along in checkpoints, so the ``global`` policy survives a resume).
        eval_used, eval_seen: The same outside training.
    """

    def __init__(self, finetuned: nn.Module, board: DecisionBoard, start: int, names: list[str]):
        super().__init__()
        self.finetuned = finetuned
        self.frozen = frozen_copy(finetuned)
        self.board = board
        self.start, self.stop = start, start + len(names)
        self.decision_names = list(names)
        n = len(names)
        for prefix in ("train", "eval"):
            self.register_buffer(f"{prefix}_used", torch.zeros(n, dtype=torch.long))
            self.register_buffer(f"{prefix}_seen", torch.zeros((), dtype=torch.long))

    def decisions(self) -> Tensor:
        """This unit's (B, n) decisions for the current forward; counts them as it goes."""
        a = self.board.read(self.start, self.stop)
        with torch.no_grad():
            used, seen = (self.train_used, self.train_seen) if self.training else (self.eval_used, self.eval_seen)
            used += (a.detach() > 0.5).sum(0)
            seen += a.shape[0]
        return a

    def usage(self, split: str = "train") -> Tensor:
        """(n,) share of samples that took the fine-tuned branch (NaN before any sample)."""
        used, seen = getattr(self, f"{split}_used"), getattr(self, f"{split}_seen")
        return used.double() / seen.double() if seen > 0 else torch.full_like(used, float("nan"), dtype=torch.float64)

    def global_decisions(self) -> Tensor:
        """(n,) the fixed policy: 1 where more than half of the counted training samples fine-tuned."""
        return (2 * self.train_used > self.train_seen).float()

    def reset_usage(self) -> None:
        """Zero the usage counts (the loop calls this through the plan at the start of each epoch)."""
        for buf in (self.train_used, self.train_seen, self.eval_used, self.eval_seen):
            buf.zero_()

    def stats(self) -> dict[str, Tensor]:
        """``usage`` (training) and ``eval_usage`` per decision of the unit, for :func:`models.hooks.collect_stats`."""
        return {"usage": self.usage("train").float(), "eval_usage": self.usage("eval").float()}

    def extra_repr(self) -> str:
        return f"decisions={self.start}:{self.stop}"


class GatedModule(GatedUnit):
    """One decision for a whole module, or one per stream for a cross-attention sub-layer.

    ``forward(*args)`` runs both branches on the same arguments and mixes every tensor they return
    (hidden states and attention probabilities alike), so it wraps an
    :class:`~models.lxmert.EncoderLayer`, a :class:`~models.lxmert.CrossLayer` (both streams share the
    layer's decision), an :class:`~models.lxmert.AttentionBlock` or a
    :class:`~models.lxmert.FeedForward`. ``both(a, b, ...)`` is the bidirectional cross-attention
    (:meth:`AttentionBlock.both`) with two decisions: the language stream's and the vision stream's.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        a = self.decisions()
        if a.shape[1] != 1:
            raise RuntimeError(f"{type(self).__name__} with {a.shape[1]} decisions is a cross-attention: call both()")
        return mix(a[:, 0], self.finetuned(*args, **kwargs), self.frozen(*args, **kwargs))

    def both(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """:meth:`AttentionBlock.both` gated per stream: (a' (B, Na, H), b' (B, Nb, H), probs_a, probs_b)."""
        d = self.decisions()
        ft = self.finetuned.both(*args, **kwargs)
        fr = self.frozen.both(*args, **kwargs)
        return (mix(d[:, 0], ft[0], fr[0]), mix(d[:, 1], ft[1], fr[1]),
                mix(d[:, 0], ft[2], fr[2]), mix(d[:, 1], ft[3], fr[3]))  # fmt: skip


def _attention_output(block: AttentionBlock, heads: Tensor, x: Tensor) -> Tensor:
    """The output part of :class:`AttentionBlock`: ``LayerNorm(x + Dropout(out_proj(heads)))``."""
    return block.norm(x + block.dropout(block.attention.merge(heads)))


class GatedHeads(GatedUnit):
    """An attention sub-layer with one decision per head and one for its output part.

    Head ``h`` of the fine-tuned or the frozen copy (its slices of q, k, v and its kernel) produces
    that head's output; the mixed heads then go through both copies' output part (projection,
    dropout, residual, LayerNorm), mixed by the last decision. In a cross layer the one shared
    cross-attention serves both directions, and so do its decisions (as in the reference code).
    """

    def __init__(self, finetuned: AttentionBlock, board: DecisionBoard, start: int):
        heads = finetuned.attention.num_heads
        super().__init__(finetuned, board, start, [f"head{h}" for h in range(heads)] + ["out"])
        self.num_heads = heads

    def forward(
        self, x: Tensor, ctx: Tensor | None, mask: Tensor | None, need_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """As :meth:`AttentionBlock.forward`: (B, Q, H) -> (B, Q, H), probs (mixed per head) or None."""
        d = self.decisions()
        h_ft, p_ft = self.finetuned.attention.context(x, ctx, mask, need_probs)
        h_fr, p_fr = self.frozen.attention.context(x, ctx, mask, need_probs)
        heads, probs = mix(d[:, : self.num_heads], (h_ft, p_ft), (h_fr, p_fr))
        out = mix(d[:, -1], _attention_output(self.finetuned, heads, x), _attention_output(self.frozen, heads, x))
        return out, probs

    def both(
        self, a: Tensor, b: Tensor, mask_a: Tensor | None, mask_b: Tensor | None, need_probs: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """As :meth:`AttentionBlock.both`, gated per head and output with one set of decisions."""
        d = self.decisions()
        d_heads, d_out = d[:, : self.num_heads], d[:, -1]
        ft_a, ft_b = self.finetuned.attention.context_both(a, b, mask_a, mask_b, need_probs)
        fr_a, fr_b = self.frozen.attention.context_both(a, b, mask_a, mask_b, need_probs)
        heads_a, p_a = mix(d_heads, ft_a, fr_a)
        heads_b, p_b = mix(d_heads, ft_b, fr_b)
        out_a = mix(d_out, _attention_output(self.finetuned, heads_a, a), _attention_output(self.frozen, heads_a, a))
        out_b = mix(d_out, _attention_output(self.finetuned, heads_b, b), _attention_output(self.frozen, heads_b, b))
        return out_a, out_b, p_a, p_b


class GatedFeedForward(GatedUnit):
    """A feed-forward sub-layer with two decisions: intermediate (fc1, GeLU) and output (fc2, dropout,
    residual, LayerNorm); the output part of both copies reads the mixed intermediate."""

    def __init__(self, finetuned: FeedForward, board: DecisionBoard, start: int):
        super().__init__(finetuned, board, start, ["inter", "out"])

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, H) -> (B, N, H), as :meth:`FeedForward.forward`."""
        d = self.decisions()
        ft, fr = self.finetuned, self.frozen
        inter = mix(d[:, 0], F.gelu(ft.fc1(x)), F.gelu(fr.fc1(x)))
        return mix(d[:, 1], ft.norm(x + ft.dropout(ft.fc2(inter))), fr.norm(x + fr.dropout(fr.fc2(inter))))
