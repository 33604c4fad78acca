"""Adaptive attention span (Sukhbaatar et al. 2019, https://arxiv.org/abs/1905.07799).

Each head h has a learnable ``z_h`` in [0, 1]; its span is ``z_h * S_max`` tokens. A key at distance
``x = |i - j|`` from query i is weighted by the soft mask::

    m(x) = clamp((R + z * S_max - x) / R, 0, 1)        # R: ramp length

and attention is ``m * exp(score)`` renormalised, i.e. ``softmax(score + log m)``: we hand
``log m`` (with -1e4 where m = 0) to the fused ``scaled_dot_product_attention`` as an additive float
mask, so span costs one (H, Q, K) mask on top of softmax. ``aux_loss()`` returns the span penalty
``coeff * S_max * mean(z)`` (add it to the training loss); ``post_step()`` clamps z to [0, 1].

Distances. In self-attention ``x = |i - j|`` between token (or region) positions, as in an encoder.
In LXMERT's cross-attention the query and key index different modalities (tokens vs regions in
detector order); like the paper's code we still use ``|i - j|`` between the token index and the region
index (and its transpose for the region-to-text direction, since one module serves both). It is a
position-agnostic budget on "how many keys from the start of the other sequence", not a locality prior.

Merged keys (:mod:`models.flow`). When a query attends over the concatenation of both modalities'
keys, ``|i - j|`` over the concatenated sequence would put a distance across the modality boundary
that means nothing. There the layer passes a :class:`KeyDistance`: within a modality the index
distance, as in that modality's self-attention; across the boundary no distance at all
(:data:`NO_DISTANCE`), so the span never masks a key of the other modality.

Unlike the paper's code, z is one value per head (not per batch slot) and the mask is applied for
every batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.attention.entmax import EntmaxAttention
from models.attention.softmax import attention_dropout, cast_mask, softmax_attention
from models.config import AttentionConfig

# log m where m = 0: exp(-1e4) underflows to exactly 0 in every float dtype, and -1e4 plus the
# padding mask value cannot overflow float16.
_CUT = -1e4
#: The distance of a (query, key) pair between which no distance is defined (across the modality
#: boundary): ``m = clamp(+inf) = 1`` there, with zero gradient for z.
NO_DISTANCE = float("-inf")


@dataclass(frozen=True)
class KeyDistance:
    """Query-key distances for a span mask, where ``|i - j|`` over one sequence does not apply.

    Attributes:
        matrix: (Q, K) float32 distances; :data:`NO_DISTANCE` where none is defined (never masked).
        reach: The largest finite distance in ``matrix`` (0 if none), known on the host so that
            checking whether a span covers every key needs no device sync.
    """

    matrix: Tensor
    reach: int


class SpanMask(nn.Module):
    """The learnable soft span mask shared by ``span`` and ``span_entmax``.

    Args:
        num_heads: Heads H (one z each).
        span_max: S_max in tokens.
        ramp: Ramp length R.
        init: Initial z.
        penalty: Coefficient of the span penalty.
    """

    def __init__(self, num_heads: int, span_max: int, ramp: int, init: float, penalty: float):
        super().__init__()
        self.span_max, self.ramp, self.penalty = span_max, ramp, penalty
        self.z = nn.Parameter(torch.full((num_heads,), float(init)))
        self._offsets: dict[tuple[int, int, torch.device], Tensor] = {}
        # Engagement evidence (see :meth:`engagement`): the smallest z after any optimizer step (a
        # device tensor, so tracking it never syncs the host) and the longest query-key distance
        # the mask could act on.
        self._zmin: Tensor | None = None
        self._reach = 0

    def _offset(self, q_len: int, k_len: int, device: torch.device) -> Tensor:
        """(Q, K) float32 ``1 - |i - j| / R``, cached per shape: m = clamp(z * S_max / R + this, 0, 1)."""
        key = (q_len, k_len, device)
        if key not in self._offsets:
            i = torch.arange(q_len, device=device, dtype=torch.float32)
            j = torch.arange(k_len, device=device, dtype=torch.float32)
            self._offsets[key] = 1.0 - (i[:, None] - j[None, :]).abs() / self.ramp
        return self._offsets[key]

    def forward(self, q_len: int, k_len: int, device: torch.device, distance: KeyDistance | None = None) -> Tensor:
        """(H, Q, K) float32 soft mask ``m = clamp((R + z * S_max - x) / R, 0, 1)``.

        ``x = |i - j|``, or ``distance.matrix`` when given (m = 1 where it is :data:`NO_DISTANCE`).
        """
        scaled = (self.z * (self.span_max / self.ramp)).view(-1, 1, 1)
        if distance is None:
            offset = self._offset(q_len, k_len, device)
        else:
            offset = 1.0 - distance.matrix.to(device=device, dtype=torch.float32) / self.ramp
        return (scaled + offset).clamp(0, 1)

    def is_full(self, q_len: int, k_len: int, distance: KeyDistance | None = None) -> bool:
        """Whether m = 1 on every (i, j) with zero gradient for z (z * S_max above the longest
        distance for every head), so that the mask can be skipped exactly. Checked on CPU only (a
        host sync elsewhere)."""
        reach = max(q_len, k_len) - 1 if distance is None else distance.reach
        self._reach = max(self._reach, reach)
        if self.z.device.type != "cpu":
            return False
        return float(self.z.detach().min()) * self.span_max > reach

    def log_mask(self, q_len: int, k_len: int, device: torch.device, distance: KeyDistance | None = None) -> Tensor:
        """(H, Q, K) float32 ``log m``, with -1e4 where m = 0 (finite: no NaN in any row)."""
        m = self(q_len, k_len, device, distance)
        # clamp_min keeps log finite where m = 0 (so its gradient is 0, not NaN); those entries are
        # then set to -1e4, whose exp is exactly 0.
        return torch.log(m.clamp_min(1e-30)).masked_fill_(m == 0, _CUT)

    def aux_loss(self) -> Tensor:
        """Span penalty ``coeff * S_max * mean(z)`` (0-d); add to the loss in training."""
        return self.penalty * self.span_max * self.z.mean()

    @torch.no_grad()
    def post_step(self) -> None:
        """Clamp z to [0, 1] after the optimizer step; track the smallest z reached."""
        self.z.clamp_(0.0, 1.0)
        low = self.z.detach().min()
        self._zmin = low.clone() if self._zmin is None else torch.minimum(self._zmin, low)

    def stats(self) -> dict[str, Tensor]:
        """``{"span": (H,) span in tokens}``."""
        return {"span": (self.z.detach().clamp(0, 1) * self.span_max).float().cpu()}

    def mechanism_parameters(self) -> list[nn.Parameter]:
        """The parameters of the mechanism itself (z), for their own learning rate."""
        return [self.z]

    def engagement(self) -> dict[str, object]:
        """Whether the span ever masked anything: the smallest span reached (after any optimizer
        step) against the longest query-key distance seen. A span at or above that distance gives
        m = 1 everywhere, i.e. softmax exactly."""
        zmin = float(self._zmin) if self._zmin is not None else float(self.z.detach().min())
        smallest = min(zmin, float(self.z.detach().min())) * self.span_max
        return {"mechanism": "span", "engaged": smallest < self._reach, "smallest": smallest,
                "reach": self._reach}

    def mechanism_state(self) -> dict[str, float]:
        """What :meth:`engagement` needs across a checkpoint/resume (plain numbers)."""
        return {"zmin": float(self._zmin) if self._zmin is not None else float(self.z.detach().min()),
                "reach": float(self._reach)}

    def load_mechanism_state(self, state: dict[str, float]) -> None:
        self._zmin = torch.tensor(float(state["zmin"]), device=self.z.device)
        self._reach = int(state["reach"])

    def extra_repr(self) -> str:
        return f"heads={self.z.numel()}, span_max={self.span_max}, ramp={self.ramp}, penalty={self.penalty}"


class AdaptiveSpanAttention(nn.Module):
    """Softmax attention under a learned soft span per head.

    Args:
        num_heads: Heads H.
        cfg: ``span_ramp``, ``span_init``, ``span_penalty``.
        span_max: S_max for this attention (from ``span_max_lang | span_max_visn | span_max_cross``).
        dropout: Dropout on the attention probabilities in training.
    """

    def __init__(self, num_heads: int, cfg: AttentionConfig, *, span_max: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.span = SpanMask(num_heads, span_max, cfg.span_ramp, cfg.span_init, cfg.span_penalty)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, need_probs: bool = False,
        *, distance: KeyDistance | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Args/returns as :meth:`models.attention.softmax.SoftmaxAttention.forward`; ``distance``
        replaces ``|i - j|`` (merged keys, :mod:`models.flow`)."""
        mask = cast_mask(mask, q.dtype)
        if not self.span.is_full(q.shape[-2], k.shape[-2], distance):  # else: exactly softmax, skip the mask
            bias = self.span.log_mask(q.shape[-2], k.shape[-2], q.device, distance).to(q.dtype)
            mask = bias if mask is None else bias + mask  # (1|B, H, Q, K)
        return softmax_attention(q, k, v, mask, self.dropout, self.training, need_probs)


class SpanEntmaxAttention(nn.Module):
    """The paper's ablation: alpha-entmax first, then the span mask, then renormalise.

    Where the span mask removes the whole entmax support of a row (possible: entmax can give the
    nearest keys zero weight), the row falls back to the entmax distribution instead of dividing by 0.

    Args:
        num_heads: Heads H.
        cfg: The span and the entmax fields.
        span_max: S_max for this attention.
        dropout: Dropout on the attention probabilities in training.
    """

    def __init__(self, num_heads: int, cfg: AttentionConfig, *, span_max: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.entmax = EntmaxAttention(num_heads, cfg, dropout=0.0)
        self.span = SpanMask(num_heads, span_max, cfg.span_ramp, cfg.span_init, cfg.span_penalty)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, need_probs: bool = False,
        *, distance: KeyDistance | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Args/returns as :meth:`models.attention.softmax.SoftmaxAttention.forward`; ``distance``
        replaces ``|i - j|`` (merged keys, :mod:`models.flow`)."""
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
        if mask is not None:
            scores = scores + mask.float()
        probs = self.entmax.normalise(scores)
        if not self.span.is_full(q.shape[-2], k.shape[-2], distance):  # else the mask is 1 everywhere
            masked = probs * self.span(q.shape[-2], k.shape[-2], q.device, distance)
            total = masked.sum(-1, keepdim=True)
            probs = torch.where(total > 0, masked / total.clamp_min(1e-30), probs)
        out = torch.matmul(attention_dropout(probs.to(v.dtype), self.dropout, self.training), v)
        return out, probs if need_probs else None
