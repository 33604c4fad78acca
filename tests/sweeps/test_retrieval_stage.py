"""The zero-shot retrieval stage (issue 16) in the one loop, without Ray: three stages, the whole
pretraining model handed to the retrieval stage, its metrics equal to scoring that model directly,
exact resume after it, and the config's refusals."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from test_pretrain_loop import FakeTracker, roundtrip, trial_config

from models.checkpoint import CheckpointError
from models.configkit import ConfigError
from sweeps.config import ExperimentConfig, apply_overrides
from sweeps.loop import TrialLoop, _whole_model

RETRIEVAL = ("retrieval.enabled=true", "retrieval.images=24", "pretrain.epochs=1", "model.flow=merged")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


class Crash(RuntimeError):
    pass


def test_retrieval_stage_scores_the_whole_pretraining_model(cache):
    """Its metrics equal tasks.retrieval.evaluate on a fresh pretraining model loaded with the last
    pretraining checkpoint: the matching head (and every other weight) was handed over."""
    import tasks.pretrain as tp
    from tasks.pretrain.adapter import pretraining_model
    from tasks.retrieval import RetrievalSet, evaluate
    from tasks.retrieval.adapter import retrieval_set_path

    torch.set_num_threads(1)
    cfg = trial_config(cache, "paper", "pretrain_equal", *RETRIEVAL, "pretrain.tasks=match,mlm")
    loop = TrialLoop(cfg, log=lambda _m: None)
    assert loop.specs == [("pretrain", "pretrain"), ("retrieval", "retrieval"), ("finetune", "vqa")]
    tracker = FakeTracker()
    reported = []
    loop.fit(lambda metrics, state: reported.append((dict(metrics), roundtrip(state))), tracker)
    # one report per pretraining epoch, one for the retrieval pass, one per fine-tuning epoch
    assert [("pretrain/epoch" in m, "retrieval/epoch" in m) for m, _ in reported] == [(True, False), (False, True),
                                                                                       (False, False)]
    logged = tracker.stage["retrieval/epoch"][0]
    pretrained = reported[0][1]["pretrain"]["stage"]["model"]

    model = pretraining_model(cfg, tp.load(cfg.pretrain, cfg.data))
    model.load_state_dict(pretrained)
    rset = RetrievalSet.open(retrieval_set_path(cfg))
    direct, _ = evaluate(model, rset, "itm", log=None)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_meanr", "rsum", "n_texts"):
        assert logged[f"retrieval/eval_{key}"] == direct[key], key
    assert logged["retrieval/eval_n_images"] == 24 and logged["retrieval/eval_n_texts"] == 48
    # every pretraining parameter reached the retrieval stage; the VQA model then took the encoder only
    n_params = sum(1 for _ in model.parameters())
    assert loop.summaries["pretrain"]["transfer"]["loaded"] == n_params
    assert loop.summaries["retrieval"]["transfer"]["fresh"] == 6  # the VQA head
    assert tracker.tags["retrieval.scoring"] == "itm"
    ranks = tracker.texts["retrieval/ranks.csv"].splitlines()
    assert ranks[0] == "query,index,positive,rank" and len(ranks) == 1 + 48 + 24


def test_a_crash_after_the_retrieval_pass_resumes_without_scoring_again(cache):
    torch.set_num_threads(1)
    cfg = trial_config(cache, "paper", "pretrain_equal", *RETRIEVAL, "pretrain.tasks=match,mlm")
    straight = TrialLoop(copy.deepcopy(cfg), log=lambda _m: None)
    straight.fit(lambda metrics, state: None)

    saved = []

    def crash_after_retrieval(metrics, state):
        saved.append(roundtrip(state))
        if "retrieval/epoch" in metrics:
            raise Crash

    with pytest.raises(Crash):
        TrialLoop(copy.deepcopy(cfg), log=lambda _m: None).fit(crash_after_retrieval)
    assert saved[-1]["pretrain"]["done"] is True and saved[-1]["retrieval"]["stage"]["passes"] == 1
    resumed = TrialLoop(copy.deepcopy(cfg), log=lambda _m: None)
    resumed.load_state_dict(saved[-1])
    tracker = FakeTracker()
    resumed.fit(lambda metrics, state: None, tracker)
    assert list(tracker.stage.get("retrieval/epoch", {})) == [0]  # caught up from the checkpoint, not rescored
    (_, a), = straight.summaries["retrieval"]["history"]
    (_, b), = resumed.summaries["retrieval"]["history"]
    timing = ("seconds", "pairs_per_s", "time_s", "elapsed_s")
    assert {k: v for k, v in a.items() if not k.endswith(timing)} == {k: v for k, v in b.items() if not k.endswith(timing)}
    for (name, a), (_, b) in zip(straight.final.model.state_dict().items(), resumed.final.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after resume")


def test_whole_model_transfer_refuses_a_different_model():
    a = SimpleNamespace(name="pretrain", model=torch.nn.Sequential(torch.nn.Linear(3, 4)))
    b = SimpleNamespace(name="retrieval", model=torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                                                    torch.nn.Linear(4, 2)))
    with pytest.raises(CheckpointError, match="stage 'retrieval' takes over the whole model of stage 'pretrain'"):
        _whole_model(a, b)
    c = SimpleNamespace(name="retrieval", model=torch.nn.Sequential(torch.nn.Linear(3, 4)))
    report = _whole_model(a, c)
    assert report.applied and len(report.loaded) == 2
    torch.testing.assert_close(c.model[0].weight, a.model[0].weight, rtol=0, atol=0)


@pytest.mark.parametrize("overrides,message", [
    ({"retrieval.enabled": "true"}, "it needs pretrain.enabled=true"),
    ({"retrieval.enabled": "true", "pretrain.enabled": "true", "pretrain.tasks": "mlm,mor"},
     "retrieval.scoring=itm needs the 'match' head"),
    ({"retrieval.enabled": "true", "pretrain.enabled": "true", "retrieval.scoring": "embedding"},
     "retrieval.scoring=embedding needs the 'contrastive' head"),
    ({"retrieval.scoring": "cosine"}, "retrieval.scoring='cosine': expected one of itm, embedding"),
    ({"retrieval.images": "700"}, "retrieval.images=700: a synthetic set holds 1 to 648 images"),
    ({"retrieval.enabled": "true", "pretrain.enabled": "true", "retrieval.source": "files"},
     "retrieval.source=files needs retrieval.captions"),
    ({"pretrain.contrastive_temperature": "0"}, "pretrain.contrastive_temperature=0.0 must be > 0"),
])  # fmt: skip
def test_retrieval_config_is_refused_naming_the_key(overrides, message):
    cfg = apply_overrides(ExperimentConfig(), {"data.name": "easyvqa", **overrides})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.validate()


def test_stages_put_retrieval_between_pretraining_and_fine_tuning():
    on = apply_overrides(ExperimentConfig(), {"data.name": "easyvqa", "pretrain.enabled": "true",
                                              "retrieval.enabled": "true"})
    assert on.stages() == [("pretrain", "pretrain"), ("retrieval", "retrieval"), ("finetune", "vqa")]
    off = apply_overrides(on, {"retrieval.enabled": "false"})
    assert off.stages() == [("pretrain", "pretrain"), ("finetune", "vqa")]


def test_contrastive_keys_reach_the_head(cache):
    cfg = trial_config(cache, "paper", "pretrain_equal", "pretrain.tasks=match,contrastive", "pretrain.contrastive_dim=24",
                       "pretrain.contrastive_temperature=0.2", "pretrain.contrastive_learn_temperature=false")
    head = TrialLoop(cfg, log=lambda _m: None).start_stage(0).model.heads["contrastive"]
    assert head.text.out_features == 24 and not head.learn_temperature
    assert float(head.scale()) == pytest.approx(5.0) and "log_scale" not in dict(head.named_parameters())
