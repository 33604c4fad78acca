"""Task heads on top of :class:`models.lxmert.LxmertModel`.

Only the VQA answer head lives here for now. Pretraining heads (masked LM, masked-object feature
regression / label classification, image-text matching, the 9,500-answer QA head) belong here too,
each a small module taking ``(lang, visn, pooled)`` from :class:`models.lxmert.LxmertOutput`; their
HuggingFace names (``cls.predictions.*``, ``cls.seq_relationship.*``, ``obj_predict_head.*``) are
already recognised (and reported as ignored) by :mod:`models.checkpoint`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class VQAHead(nn.Module):
    """LXMERT's answer head: Linear(H, 2H) -> GeLU -> LayerNorm -> Linear(2H, A).

    HuggingFace: ``answer_head.logit_fc.{0,2,3}``; the original VQA code: ``logit_fc.{0,2,3}``.

    Args:
        hidden_size: H.
        num_answers: A (3,129 for VQA v2; 9,500 for LXMERT's pretraining QA).
        eps: LayerNorm epsilon.
    """

    def __init__(self, hidden_size: int, num_answers: int, eps: float = 1e-12):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, 2 * hidden_size)
        self.norm = nn.LayerNorm(2 * hidden_size, eps=eps)
        self.fc2 = nn.Linear(2 * hidden_size, num_answers)

    def forward(self, pooled: Tensor) -> Tensor:
        """(B, H) pooled [CLS] -> (B, A) logits."""
        return self.fc2(self.norm(F.gelu(self.fc1(pooled))))
