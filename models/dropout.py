"""Dropout that is cheaper on CPU than ``torch.nn.functional.dropout``, with the same distribution.

On CPU, PyTorch's dropout draws its mask with ``bernoulli_``, element by element in double
precision; comparing uniform float32 draws with ``p`` gives the same Bernoulli(1 - p) mask about 3x
faster (fwd + bwd of a (1024, 256) tensor: 1.7 ms vs 5.0 ms on one thread). Dropout is ~15% of a
training step of the small (hidden 64-128) models the sweeps train on one CPU thread, so this is
worth a module. On other devices the fused ``F.dropout`` kernel is used. Both draw from torch's
global generator, so ``torch.manual_seed`` makes runs repeatable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)`` (in training)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    # The mask keeps x's dtype (0 or 1/(1-p)); autograd saves it for the backward multiply.
    keep = torch.rand(x.shape, dtype=torch.float32, device=x.device).ge_(p).mul_(1.0 / (1.0 - p))
    return x * keep.to(x.dtype)


class Dropout(nn.Module):
    """:func:`dropout` as a module (a drop-in for ``nn.Dropout``)."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
