"""A new attention normaliser is one class and one registry entry: nothing else in models/ changes.

The normaliser below exists only in this file (softmax with a learned temperature per head). Once
registered, the config accepts its name, the model builds and trains it, the analytic parameter
count includes its parameters, a real LXMERT checkpoint imports around them, its parameters get the
mechanism learning rate group, and the engagement check words its evidence in its own terms.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models_testutils import hf_qa_model, make_batch, run_model
from torch import Tensor, nn

from models import build_model, hooks, lxmert_tiny
from models.attention.registry import ATTENTION_REGISTRY
from models.checkpoint import load_pretrained
from models.config import ConfigError
from models.flops import count_params


class TemperedSoftmax(nn.Module):
    """softmax(scores / tau_h), tau_h = exp(log_tau_h) learned per head."""

    def __init__(self, num_heads: int, cfg, *, span_max: int = 0, dropout: float = 0.0):
        super().__init__()
        self.log_tau = nn.Parameter(torch.zeros(num_heads))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, need_probs: bool = False,
                **_: object) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 / self.log_tau.exp().view(-1, 1, 1)
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores.float(), -1).to(v.dtype)
        return probs @ v, probs if need_probs else None

    def stats(self) -> dict[str, Tensor]:
        return {"tau": self.log_tau.detach().exp()}

    def mechanism_parameters(self) -> list[nn.Parameter]:
        return [self.log_tau]

    def engagement(self) -> dict[str, object]:
        moved = float(self.log_tau.detach().abs().max())
        return {"mechanism": "tau", "engaged": moved > 0.01, "moved": moved}

    @staticmethod
    def engagement_evidence(items: list[dict[str, object]]) -> str:
        return f"log-temperature moved by up to {max(float(e['moved']) for e in items):.3f}"


@pytest.fixture
def tempered(monkeypatch):
    monkeypatch.setitem(ATTENTION_REGISTRY, "tempered", TemperedSoftmax)
    return lxmert_tiny("attention.name=tempered", num_answers=12)


def test_an_unregistered_name_is_refused_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"attention.name='tempered' is not a registered attention.*softmax"):
        lxmert_tiny("attention.name=tempered")


def test_a_registered_normaliser_builds_counts_trains_and_reports_engagement(tempered):
    model = build_model(tempered)
    kernels = [m for m in model.modules() if isinstance(m, TemperedSoftmax)]
    assert kernels, "the registered kernel is not used"
    # the analytic count knows the new parameters without an edit to models/flops.py
    assert count_params(tempered) == sum(p.numel() for p in model.parameters())
    assert count_params(tempered) == count_params(lxmert_tiny(num_answers=12)) + sum(
        k.log_tau.numel() for k in kernels)  # fmt: skip
    # its parameters are the mechanism's (own learning-rate group)
    assert {id(p) for p in hooks.mechanism_parameters(model)} == {id(k.log_tau) for k in kernels}
    assert not hooks.engagement(model)["tau"]["engaged"]  # at its init: the kernel computes softmax
    opt = torch.optim.Adam(hooks.mechanism_parameters(model), lr=0.05)  # first step: 0.05 where grad != 0
    run_model(model, make_batch(tempered)).logits.pow(2).mean().backward()
    # (not every site: the last layer's region stream does not reach the pooled answer)
    assert any(k.log_tau.grad is not None and k.log_tau.grad.abs().sum() > 0 for k in kernels)
    opt.step()
    tau = hooks.engagement(model)["tau"]
    assert tau["engaged"] and tau["sites"] == len(kernels)
    assert tau["evidence"].startswith("log-temperature moved by up to ")
    assert any(name.endswith("/tau") for name in hooks.collect_stats(model))


def test_a_real_lxmert_checkpoint_imports_around_the_new_parameters(tempered):
    hf = hf_qa_model(tempered, seed=3)
    model = build_model(tempered)
    report = load_pretrained(model, hf.state_dict(), verbose=False)
    assert report.complete and not report.fresh and not report.unexpected
    assert sorted(report.kernel) == sorted(n for n, _ in model.named_parameters() if n.endswith("log_tau"))
    assert len(report.loaded) + len(report.kernel) == len(list(model.parameters()))
