"""One multi-head attention for self- and cross-attention; the normaliser is an injected kernel."""

from __future__ import annotations

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
        b, q_len, h = x.shape
        nh, hd = self.num_heads, self.head_dim
        if ctx is None:
            # (B, Q, 3H) -> (3, B, nh, Q, hd): views only, no copies.
            q, k, v = self.qkv(x).view(b, q_len, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:h], bias[:h]).view(b, q_len, nh, hd).transpose(1, 2)
            kv = F.linear(ctx, w[h:], bias[h:]).view(b, ctx.shape[1], 2, nh, hd)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out, probs = self.kernel(q, k, v, mask, need_probs)
        out = out.transpose(1, 2).reshape(b, q_len, h)
        return self.out(out), probs

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, heads={self.num_heads}"
