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


def test_extra_negatives_from_the_queue_join_the_loss_and_are_checkpointed(cache):
    """``pretrain.contrastive_negatives``: the queue's entries are candidates of this step's loss (equal
    to InfoNCE computed with them as extra negatives, unequal to the in-batch loss), the step's true
    pairs are pushed after it, and the queue travels in the stage's checkpoint."""
    import torch.nn.functional as F

    from tasks.pretrain.contrastive import batch_groups, in_batch_info_nce

    torch.set_num_threads(1)
    cfg = trial_config(cache, "paper", "pretrain_equal", "pretrain.tasks=match,contrastive", "model.flow=merged",
                       "pretrain.contrastive_negatives=40", "pretrain.contrastive_dim=16")
    stage = TrialLoop(cfg, log=lambda _m: None).start_stage(0)
    adapter = stage.adapter
    batch = next(iter(adapter.train_batches(0)))
    gen = torch.Generator().manual_seed(0)
    queued_text = F.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    queued_image = F.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    adapter.queue.push(queued_text, queued_image, torch.full((8,), 10_000))  # a group no row has
    adapter.start_epoch(0)
    out = adapter.train_loss(stage.trainable, batch, stage.context())
    got = out.extra[0]["contrastive"].loss

    with torch.no_grad():
        c = adapter._forward(stage.trainable, batch, ["contrastive"], stage.context()).contrastive
    valid = batch["match_labels"] == 1
    groups = batch_groups(batch, len(valid), valid.device)[valid]
    with_queue = in_batch_info_nce(c["text"][valid], c["image"][valid], c["scale"], groups=groups,
                                   extra_text=queued_text, extra_image=queued_image)  # fmt: skip
    in_batch = in_batch_info_nce(c["text"][valid], c["image"][valid], c["scale"], groups=groups)
    torch.testing.assert_close(got.detach(), with_queue.loss, rtol=1e-5, atol=1e-6)
    assert abs(float(in_batch.loss.detach()) - float(got.detach())) > 1e-4

    adapter.after_step(stage.context(), out, True, float(out.loss.detach()), 0.0)
    assert int(adapter.queue.filled) == 8 + int(valid.sum())  # this batch's true pairs joined
    state = adapter.state_dict()["contrastive_queue"]
    fresh = TrialLoop(cfg, log=lambda _m: None).start_stage(0).adapter
    fresh.load_state_dict(adapter.state_dict())
    for key, value in state.items():
        torch.testing.assert_close(fresh.queue.state_dict()[key], value, rtol=0, atol=0)
    metrics, _ = stage.train_epoch()
    assert metrics["pretrain/contrastive_queue"] == 40.0


def test_contrastive_matching_scores_each_true_pair_against_k_texts_of_other_images(cache):
    """``pretrain.itm_negatives=K``: the matching loss equals InfoNCE over the matching head's log-odds of
    each true pair and K texts of other images (a separate forward of that layout), and appending those
    pairs to the batch's forward leaves the other objectives' losses unchanged."""
    from tasks.base import MODEL_INPUTS
    from tasks.pretrain.contrastive import batch_groups, itm_info_nce, negative_pairs

    torch.set_num_threads(1)
    cfg = trial_config(cache, "paper", "pretrain_equal", "pretrain.tasks=match,mlm,mor", "model.flow=merged",
                       "pretrain.itm_negatives=3")
    stage = TrialLoop(cfg, log=lambda _m: None).start_stage(0)
    adapter, model = stage.adapter, stage.model
    with torch.no_grad():  # spread the untrained head's log-odds, so the pairs scored matter to the loss
        for p in model.heads["match"].parameters():
            p.mul_(200.0)
    adapter.start_epoch(0)
    batch = next(iter(adapter.train_batches(0)))
    out = adapter.train_loss(stage.trainable, batch, stage.context())
    results = out.extra[0]

    true = batch["match_labels"] == 1
    groups = batch_groups(batch, len(true), true.device)[true]
    pairs = negative_pairs({k: batch[k][true] for k in MODEL_INPUTS}, 3, groups,
                           torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 0))  # fmt: skip
    with torch.no_grad():
        logits = model(**{k: pairs[k] for k in MODEL_INPUTS}, heads=("match",)).match
        plain = adapter._forward(stage.trainable, batch, ["mlm", "mor"], stage.context())
    expected = itm_info_nce(logits, 4)
    assert results["match"].n == int(true.sum()) == expected.n
    torch.testing.assert_close(results["match"].loss.detach(), expected.loss, rtol=1e-4, atol=1e-5)
    for t in ("mlm", "mor"):
        torch.testing.assert_close(results[t].loss.detach(), adapter.objectives[t].loss(plain, batch).loss,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    adapter.after_step(stage.context(), out, True, float(out.loss.detach()), 0.0)
    assert adapter.train_metrics()["itm_negatives_min"] == 3.0
    assert "loss_match" in stage.evaluate().metrics


def test_contrastive_matching_needs_the_matching_objective():
    from models.configkit import ConfigError
    from tasks.pretrain.config import PretrainConfig

    with pytest.raises(ConfigError, match="pretrain.itm_negatives=4 makes the matching objective contrastive"):
        PretrainConfig(tasks=("mlm", "contrastive"), itm_negatives=4).validate()
