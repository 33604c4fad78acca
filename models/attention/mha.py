"""One multi-head attention for self- and cross-attention; the normaliser is an injected kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a fused query/key/value projection and a swappable kernel.

    Self-attention (``ctx is None``) projects q, k and v in one matmul. Cross-attention projects the
    queries from ``x`` and the keys/values from ``ctx`` with row slices of the same weight, so one
    module (one set of weights and one kernel, e.g. one span z per head) serves both directions of an
    LXMERT cross-modality layer.

    The fused weight ``qkv.weight`` (3H, H) stacks HuggingFace's ``query``, ``key`` and ``value``
    weights in that order (see :mod:`models.checkpoint`).

    Args:
        hidden_size: Model width H.
        num_heads: Heads; must divide H.
        kernel: The normaliser (an entry of ``ATTENTION_REGISTRY``), called as
            ``kernel(q, k, v, mask, need_probs) -> (out, probs)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, kernel: nn.Module):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.kernel = kernel

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, H) -> q, k, v, each (B, heads, N, head_dim), from one matmul (views, no copies)."""
        b, n, _ = x.shape
        return self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, need_probs: bool = False,
        distance: object = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Kernel + output projection: (B, heads, Q, hd) queries -> (B, Q, H), probs or None.

        ``distance`` (a ``KeyDistance``) reaches the kernel only when given, so a kernel written
        against the plain ``(q, k, v, mask, need_probs)`` contract still runs everywhere else.
        """
        if distance is None:
            out, probs = self.kernel(q, k, v, mask, need_probs)
        else:
            out, probs = self.kernel(q, k, v, mask, need_probs, distance=distance)
        return self.merge(out), probs

    def merge(self, heads: Tensor) -> Tensor:
        """Output projection of the heads' outputs: (B, heads, Q, hd) -> (B, Q, H)."""
        b, _, q_len, _ = heads.shape
        return self.out(heads.transpose(1, 2).reshape(b, q_len, self.hidden_size))

    def forward(
        self, x: Tensor, ctx: Tensor | None = None, mask: Tensor | None = None, need_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``x`` to ``ctx`` (or to itself).

        Args:
            x: (B, Q, H) queries' hidden states.
            ctx: (B, K, H) keys'/values' hidden states, or None for self-attention.
            mask: Additive mask over the keys, (B, 1, 1, K), or None.
            need_probs: Return the (B, heads, Q, K) attention probabilities too.

        Returns:
            (out (B, Q, H) after the output projection, probs or None).
        """
        heads, probs = self.context(x, ctx, mask, need_probs)
        return self.merge(heads), probs

    def context(
        self, x: Tensor, ctx: Tensor | None = None, mask: Tensor | None = None, need_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`forward` before the output projection: the heads' outputs (B, heads, Q, hd), probs.

        (Per-head gating, e.g. :mod:`models.finetune`, mixes heads here, before :meth:`merge`.)
        """
        if ctx is None:
            q, k, v = self.project(x)
        else:
            b, h = x.shape[0], self.hidden_size
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:h], bias[:h]).view(b, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
            kv = F.linear(ctx, w[h:], bias[h:]).view(b, ctx.shape[1], 2, self.num_heads, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.kernel(q, k, v, mask, need_probs)

    def forward_both(
        self, a: Tensor, b: Tensor, mask_a: Tensor | None, mask_b: Tensor | None, need_probs: bool = False
    ) -> tuple[tuple[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]:
        """Bidirectional cross-attention with shared weights: ``a`` attends to ``b`` and ``b`` to ``a``.

        Equal to ``forward(a, b, mask_b)`` and ``forward(b, a, mask_a)``, but both streams are
        projected by one matmul (q, k, v of the concatenated sequences: one weight gradient, no
        accumulation of two), and each serves as queries in one direction and as keys and values in
        the other.

        Args:
            a: (B, Na, H); b: (B, Nb, H) hidden states of the two streams.
            mask_a: (B, 1, 1, Na) additive mask of ``a`` as keys; mask_b likewise.
            need_probs: Return the probabilities too.

        Returns:
            ((out_a (B, Na, H), probs_a), (out_b (B, Nb, H), probs_b)).
        """
        (heads_a, p_a), (heads_b, p_b) = self.context_both(a, b, mask_a, mask_b, need_probs)
        return (self.merge(heads_a), p_a), (self.merge(heads_b), p_b)

    def context_both(
        self, a: Tensor, b: Tensor, mask_a: Tensor | None, mask_b: Tensor | None, need_probs: bool = False
    ) -> tuple[tuple[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]:
        """:meth:`forward_both` before the output projection: ((heads_a (B, heads, Na, hd), probs_a),
        (heads_b (B, heads, Nb, hd), probs_b))."""
        n_a = a.shape[1]
        q, k, v = self.project(torch.cat([a, b], dim=1))  # (B, heads, Na + Nb, hd) each
        qa, ka, va = q[:, :, :n_a], k[:, :, :n_a], v[:, :, :n_a]
        qb, kb, vb = q[:, :, n_a:], k[:, :, n_a:], v[:, :, n_a:]
        return self.kernel(qa, kb, vb, mask_b, need_probs), self.kernel(qb, ka, va, mask_a, need_probs)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, heads={self.num_heads}"
