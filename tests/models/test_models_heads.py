"""NLVR2's pair head: LXMERT's layout (logit_fc.{0,2,3} of tasks/nlvr2_model.py), its input shape,
its initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import lxmert_tiny
from models.builders import pair_head
from models.heads import PairHead


def test_pair_head_computes_lxmerts_nlvr2_classifier():
    torch.manual_seed(0)
    h = 8
    # LXMERT's logit_fc: Linear(2H, 2H), GeLU (erf), BertLayerNorm(2H, eps=1e-12), Linear(2H, 2)
    lxmert_fc = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.GELU(), nn.LayerNorm(2 * h, eps=1e-12), nn.Linear(2 * h, 2))
    head = PairHead(h)
    head.load_state_dict({{"0": "fc1", "2": "norm", "3": "fc2"}[k.split(".")[0]] + "." + k.split(".")[1]: v
                          for k, v in lxmert_fc.state_dict().items()})  # fmt: skip
    pooled = torch.randn(5, 2, h)
    # LXMERT: x.view(-1, hid_dim * 2) of the (2B, H) pooled outputs ordered img0, img1 per example
    torch.testing.assert_close(head(pooled), lxmert_fc(pooled.reshape(5, 2 * h)))
    with pytest.raises(ValueError, match=r"expects \(B, 2, H\) pooled outputs, got \(5, 16\)"):
        head(pooled.reshape(5, 2 * h))


def test_pair_head_builder_initialises_like_bert():
    cfg = lxmert_tiny()
    torch.manual_seed(0)
    head = pair_head(cfg)
    assert head.fc1.weight.shape == (2 * cfg.hidden_size, 2 * cfg.hidden_size) and head.fc2.weight.shape[0] == 2
    assert torch.equal(head.fc1.bias, torch.zeros_like(head.fc1.bias)) and torch.equal(head.norm.weight, torch.ones(64))
    assert head.fc1.weight.std().item() == pytest.approx(cfg.initializer_range, rel=0.1)
