"""The attention registry: a plain dict from name to kernel class. Variants are entries, not subclasses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from models.attention.entmax import EntmaxAttention
from models.attention.softmax import SoftmaxAttention
from models.attention.span import AdaptiveSpanAttention, SpanEntmaxAttention

if TYPE_CHECKING:  # type hints only: models.config imports the registry, never the reverse
    from models.config import AttentionConfig

#: name -> kernel class; every class takes ``(num_heads, cfg, *, span_max, dropout)``.
ATTENTION_REGISTRY: dict[str, type[nn.Module]] = {
    "softmax": SoftmaxAttention,
    "span": AdaptiveSpanAttention,
    "entmax": EntmaxAttention,
    "span_entmax": SpanEntmaxAttention,
}


def build_kernel(name: str, num_heads: int, cfg: AttentionConfig, *, span_max: int, dropout: float) -> nn.Module:
    """Instantiate the kernel registered as ``name``.

    Args:
        name: A key of :data:`ATTENTION_REGISTRY`.
        num_heads: Heads H.
        cfg: The :class:`models.config.AttentionConfig` with the kernel's hyper-parameters.
        span_max: S_max for span kernels at this site.
        dropout: Attention-probability dropout.

    Raises:
        ValueError: ``name`` is not registered (the message lists the valid names).
    """
    try:
        cls = ATTENTION_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; valid: {sorted(ATTENTION_REGISTRY)}") from None
    return cls(num_heads, cfg, span_max=span_max, dropout=dropout)
