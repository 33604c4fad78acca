"""Attention: one :class:`MultiHeadAttention`, many normalisers behind one kernel contract.

See :mod:`models.attention.softmax` for the contract and :data:`ATTENTION_REGISTRY` for the variants.
"""

from models.attention.entmax import EntmaxAttention, alpha_entmax
from models.attention.mha import MultiHeadAttention
from models.attention.registry import ATTENTION_REGISTRY, build_kernel
from models.attention.softmax import SoftmaxAttention, additive_mask, mask_value
from models.attention.span import (
    NO_DISTANCE,
    AdaptiveSpanAttention,
    KeyDistance,
    SpanEntmaxAttention,
    SpanMask,
)

__all__ = [
    "ATTENTION_REGISTRY",
    "AdaptiveSpanAttention",
    "EntmaxAttention",
    "KeyDistance",
    "MultiHeadAttention",
    "NO_DISTANCE",
    "SoftmaxAttention",
    "SpanEntmaxAttention",
    "SpanMask",
    "additive_mask",
    "alpha_entmax",
    "build_kernel",
    "mask_value",
]
