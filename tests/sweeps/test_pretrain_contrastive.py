"""The pretraining stage selects the contrastive objective (``pretrain.tasks`` with ``contrastive``)."""

from __future__ import annotations

import math

import pytest
import torch
from test_pretrain_loop import trial_config

from sweeps.loop import TrialLoop


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_pretraining_stage_trains_and_evaluates_the_contrastive_objective(cache):
    torch.set_num_threads(1)
    cfg = trial_config(cache, "paper", "pretrain_equal", "pretrain.tasks=match,contrastive", "model.flow=merged")
    stage = TrialLoop(cfg, log=lambda _m: None).start_stage(0)  # the trial's pretraining stage
    assert "contrastive" in stage.model.heads
    metrics, _ = stage.train_epoch()
    metrics.update({f"pretrain/eval_{k}": v for k, v in stage.evaluate().metrics.items()})
    for key in ("pretrain/loss_contrastive", "pretrain/acc_contrastive", "pretrain/eval_loss_contrastive",
                "pretrain/loss_contrastive_t2i", "pretrain/weight_contrastive"):  # fmt: skip
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["pretrain/weight_contrastive"] == 1.0
