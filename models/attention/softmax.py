"""Softmax attention: the reference normaliser, and the kernel contract every variant follows.

Kernel contract (every entry of :data:`models.attention.ATTENTION_REGISTRY`)::

    kernel = Kernel(num_heads, cfg: AttentionConfig, *, span_max: int, dropout: float)
    out, probs = kernel(q, k, v, mask=None, need_probs=False, distance=None)
        q: (B, H, Q, D); k, v: (B, H, K, D)
        mask: additive float mask broadcastable to (B, H, Q, K): 0 keeps a key, a large negative
              but finite value removes it (build it with :func:`additive_mask`, convert it with
              :func:`cast_mask`: a -inf mask turns fully masked rows into NaN); or None
        distance: keyword-only, a ``models.attention.span.KeyDistance`` or None: the query-key
              distances a positional mechanism (the span) uses instead of ``|i - j|`` (merged
              keys of both modalities, ``models.flow``); kernels without one ignore it
        out: (B, H, Q, D); probs: (B, H, Q, K) before dropout when need_probs else None

Optional hooks, found by :mod:`models.hooks` on any module: ``aux_loss() -> 0-d Tensor``,
``post_step()``, ``stats() -> dict[str, Tensor(H)]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import AttentionConfig
from models.dropout import dropout


def mask_value(dtype: torch.dtype) -> float:
    """The additive value that removes a key: half the dtype's most negative value.

    Half, not ``finfo.min`` (HuggingFace's choice), so that adding a score or a span log-mask can never
    overflow to -inf: a row whose keys are all masked then stays finite (uniform) instead of NaN.
    """
    return -0.5 * torch.finfo(dtype).max


def additive_mask(keep: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, K) 1/0 keep-mask -> (B, 1, 1, K) additive mask in ``dtype`` (None stays None)."""
    if keep is None:
        return None
    keep = keep.to(dtype)
    return ((1.0 - keep) * mask_value(dtype))[:, None, None, :]


def cast_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Cast an additive mask to ``dtype`` without overflowing to -inf (e.g. float32 -> float16)."""
    if mask is None or mask.dtype == dtype:
        return mask
    return mask.clamp(min=mask_value(dtype)).to(dtype)


def attention_dropout(probs: Tensor, p: float, training: bool) -> Tensor:
    """Dropout on attention probabilities (whole keys, as in the original Transformer)."""
    return dropout(probs, p, training)


def softmax_lastdim(scores: Tensor) -> Tensor:
    """Softmax over the last dim, in float32 for low-precision inputs, returned in the input dtype.

    On CPU, ``torch.softmax`` over fewer than 16 elements takes a scalar path about 3x slower (forward +
    backward) than exp / sum; 12-token questions hit it in every language-side attention. The explicit
    form subtracts the detached row max (softmax is shift-invariant, so the gradient is unchanged).
    """
    x = scores if scores.dtype == torch.float32 else scores.float()
    if x.device.type == "cpu" and x.shape[-1] < 16:
        e = (x - x.detach().amax(-1, keepdim=True)).exp_()
        probs = e / e.sum(-1, keepdim=True)
    else:
        probs = torch.softmax(x, -1)
    return probs.to(scores.dtype)


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float, training: bool, need_probs: bool
) -> tuple[Tensor, Tensor | None]:
    """softmax(q k^T / sqrt(d) + mask) v, fused (SDPA) where that is the faster choice.

    Args:
        q: (B, H, Q, D); k, v: (B, H, K, D).
        mask: Additive mask (in q's dtype) broadcastable to (B, H, Q, K), or None.
        p: Attention dropout probability (applied in training).
        training: Whether dropout is active.
        need_probs: Return the probabilities (before dropout).

    Returns:
        (out (B, H, Q, D), probs (B, H, Q, K) or None).
    """
    drop = training and p > 0
    # SDPA unless the probabilities are needed, or on CPU in training with dropout: there SDPA falls
    # back to its unfused math path with a slower dropout (see models.dropout).
    if not need_probs and not (drop and q.device.type == "cpu"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p if drop else 0.0), None
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + mask
    probs = softmax_lastdim(scores)
    out = torch.matmul(attention_dropout(probs, p, training), v)
    return out, probs if need_probs else None


class SoftmaxAttention(nn.Module):
    """Scaled dot-product attention with softmax (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762).

    Uses the fused ``torch.nn.functional.scaled_dot_product_attention`` unless the probabilities are
    requested; then computes them explicitly (the same numbers up to float rounding).

    Args:
        num_heads: Heads H.
        cfg: Unused (uniform kernel signature).
        span_max: Unused (uniform kernel signature).
        dropout: Dropout on the attention probabilities in training.
    """

    def __init__(
        self, num_heads: int, cfg: AttentionConfig | None = None, *, span_max: int = 0, dropout: float = 0.0
    ):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, need_probs: bool = False,
        *, distance: object = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend.

        Args:
            q: (B, H, Q, D) queries.
            k: (B, H, K, D) keys.
            v: (B, H, K, D) values.
            mask: Additive mask broadcastable to (B, H, Q, K), or None.
            need_probs: Also return the (B, H, Q, K) probabilities (before dropout).
            distance: Unused (uniform kernel signature; span kernels read it).

        Returns:
            (out (B, H, Q, D), probs or None).
        """
        return softmax_attention(q, k, v, cast_mask(mask, q.dtype), self.dropout, self.training, need_probs)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, dropout={self.dropout}"
