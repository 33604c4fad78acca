"""Fine-tuning strategies (models/finetune) applied by the one training loop, without Ray.

A `finetuning` grid cell pretrains the encoder, hands it over to the VQA model and only then applies
its strategy: SpotTune's frozen copies must hold the pretrained encoder (not the VQA model's fresh
initialisation) and stay bit-identical through training, the policy must train under its own
optimiser, a resume mid-fine-tuning must rebuild the same plan and continue exactly, and the
per-epoch usage statistics must reach the tracker.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_pretrain_loop import Crash, FakeTracker, roundtrip

from sweeps.config import parse_cli_overrides
from sweeps.grid import expand, load_grid, load_preset
from sweeps.loop import TrialLoop, prepared_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def cell_config(cache, cell: str, *overrides: str):
    """A `finetuning` grid cell at the smoke preset, shrunk: 2-1-1 layers (the policy's depth),
    one pretraining epoch over a tiny synthetic corpus, 128 questions."""
    over = parse_cli_overrides([f"data.cache_dir={cache}", "data.train_limit=128", "data.eval_limit=64",
                                "model.l_layers=2", "model.r_layers=1", "model.x_layers=1",
                                "train.batch_size=32", "train.epochs=1", "pretrain.corpus_images=48",
                                "pretrain.corpus_eval_images=8", "pretrain.epochs=1", "pretrain.batch_size=32",
                                *overrides])  # fmt: skip
    plan = expand(load_grid("finetuning"), load_preset("smoke"), cli_overrides=over, cells=[cell])
    return prepared_config(plan.trials[0].config)


def pretrain_then_hand_over(cfg):
    """Run the pretraining stage and the hand-over; returns (loop, pretrained encoder state)."""
    loop = TrialLoop(cfg, log=lambda _m: None)
    assert loop.final.plan is None  # not before the pretrained encoder is in
    stage = loop.start_stage(0)
    loop._run_stage(stage, lambda metrics, state: None, None)
    pretrained = {k.removeprefix("lxmert."): v.clone() for k, v in stage.model.state_dict().items()
                  if k.startswith("lxmert.")}  # fmt: skip
    loop._hand_over(stage, loop.final, None)
    return loop, pretrained


@pytest.mark.parametrize("cell", ["spottune_block", "spottune_res"])
def test_spottune_gates_the_pretrained_encoder_and_trains_the_policy_under_its_own_optimizer(cache, cell):
    torch.set_num_threads(1)
    loop, pretrained = pretrain_then_hand_over(cell_config(cache, cell))
    final = loop.final
    plan = final.plan
    assert plan is not None and plan.name == cell and plan.adaptive
    frozen_before = {k: v.clone() for k, v in plan.encoder.frozen_state_dict().items()}
    layer_keys = [k for k in frozen_before if k.startswith("encoder.")]
    assert layer_keys
    for key in layer_keys:  # the frozen copies are the pretrained encoder's layers, not a fresh init
        assert torch.equal(frozen_before[key], pretrained[key]), key
    policy = plan.extra_modules["policy"]
    policy_before = {k: v.clone() for k, v in policy.named_parameters()}
    # The policy trains under its own optimiser (SGD), and only there; frozen copies in none.
    policy_ids = {id(p) for p in policy.parameters()}
    main_ids = {id(p) for g in final.optimizer.param_groups for p in g["params"]}
    frozen_ids = {id(p) for n, p in final.model.named_parameters() if ".frozen." in n}
    assert frozen_ids and not (main_ids & policy_ids) and not (main_ids & frozen_ids)
    (sgd,) = final.extra_optimizers.values()
    assert isinstance(sgd, torch.optim.SGD)
    assert {id(p) for g in sgd.param_groups for p in g["params"]} == policy_ids

    loop._run_stage(final, lambda metrics, state: None, None)

    frozen_after = plan.encoder.frozen_state_dict()
    for key in layer_keys:
        assert torch.equal(frozen_after[key], frozen_before[key]), f"frozen {key} changed in training"
    tuned = plan.encoder.finetuned_state_dict()
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in layer_keys), "no fine-tuned copy trained"
    changed = [k for k, p in policy.named_parameters() if not torch.equal(p, policy_before[k])]
    assert changed, "the policy received no update through the Gumbel-Softmax"

    metrics = loop.history[-1][1]
    assert 0.0 <= metrics["finetune/usage"] <= 1.0 and 0.0 <= metrics["finetune/eval_usage"] <= 1.0
    assert 0.0 < metrics["finetune/policy_entropy"] <= math.log(2) + 1e-6
    assert metrics["finetune/temperature"] == 5.0
    layers = {k for k in metrics if k.startswith("finetune/usage/")}
    assert layers == {"finetune/usage/lang/0", "finetune/usage/lang/1", "finetune/usage/visn/0",
                      "finetune/usage/cross/0"}  # fmt: skip
    types = {k: v for k, v in metrics.items() if k.startswith("finetune/usage_type/")}
    assert "finetune/usage_type/what_color" in types and all(0 <= v <= 1 for v in types.values())
    assert metrics["train/step_s"] > 0 and metrics["train/resident_mb"] > 0

    # argmax evaluation is deterministic: evaluating again gives the same numbers.
    again = final.evaluate().metrics
    assert again["acc"] == metrics["eval/acc"] and again["loss"] == metrics["eval/loss"]


@pytest.mark.parametrize("cell,trained_layers", [("frozen", set()), ("last_k", {"lang_layers.1", "visn_layers.0",
                                                                                   "cross_layers.0"})])
def test_frozen_layers_stay_bit_identical_and_only_the_chosen_ones_train(cache, cell, trained_layers):
    torch.set_num_threads(1)
    loop, pretrained = pretrain_then_hand_over(cell_config(cache, cell))
    assert loop.final.plan.name == cell and not loop.final.extra_optimizers
    loop._run_stage(loop.final, lambda metrics, state: None, None)
    encoder = loop.final.model.lxmert.state_dict()
    for key, value in encoder.items():
        if not key.startswith("encoder.") or not value.is_floating_point():
            continue
        layer = ".".join(key.split(".")[1:3])
        if layer in trained_layers:
            continue
        assert torch.equal(value, pretrained[key]), f"{cell}: frozen {key} changed"
    for layer in trained_layers:
        assert any(not torch.equal(v, pretrained[k]) for k, v in encoder.items()
                   if k.startswith(f"encoder.{layer}.")), f"{cell}: {layer} did not train"  # fmt: skip
    assert not torch.equal(encoder["pooler.dense.weight"], pretrained["pooler.dense.weight"])
    assert "finetune/usage" not in loop.history[-1][1]  # no policy, no usage statistics


def test_resuming_mid_finetuning_rebuilds_the_plan_and_continues_exactly(cache):
    torch.set_num_threads(1)
    # Adam for the policy: its optimiser then has a state that the checkpoint must carry.
    cfg = cell_config(cache, "spottune", "train.epochs=2", "model.finetune.policy_optimizer=adam",
                      "model.finetune.policy_lr=0.001", "model.finetune.temperature_schedule=exp",
                      "model.finetune.temperature_decay=0.9", "model.finetune.temperature_unit=step")
    tracker = FakeTracker()
    straight = TrialLoop(copy.deepcopy(cfg), log=lambda _m: None)
    straight.fit(lambda metrics, state: None, tracker)

    first = TrialLoop(copy.deepcopy(cfg), log=lambda _m: None)
    saved = []

    def crash_after_first_finetuning_epoch(metrics, state):
        saved.append(roundtrip(state))
        if metrics.get("epoch") == 1:
            raise Crash

    with pytest.raises(Crash):
        first.fit(crash_after_first_finetuning_epoch)
    state = saved[-1]
    assert state["finetune_plan"] == "spottune" and state["pretrain"]["done"] is True
    assert state["extra_optimizers"]["policy"]["state"], "the policy optimiser's state is not checkpointed"
    resumed = TrialLoop(copy.deepcopy(cfg), log=lambda _m: None)  # a new process
    resumed.load_state_dict(state)
    assert resumed.final.plan is not None and resumed.final.plan.name == "spottune"
    resumed.fit(lambda metrics, state: None)

    a, b = straight.final.model.state_dict(), resumed.final.model.state_dict()
    assert list(a) == list(b)
    for name in a:  # policy, both copies, usage counts
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"{name} differs after resume")
    for key in ("eval/acc", "train/loss", "finetune/usage", "finetune/policy_entropy", "finetune/temperature"):
        assert straight.history[-1][1][key] == resumed.history[-1][1][key], key
    assert straight.history[-1][1]["finetune/temperature"] < 5.0  # the per-step schedule ran

    # What MLflow gets: per-epoch usage metrics and the per-decision CSV; the analytic cost once.
    decisions = len(straight.final.plan.decision_names)
    for epoch in (1, 2):
        assert "finetune/usage" in tracker.epochs[epoch]
        lines = tracker.texts[f"finetune/usage_epoch{epoch}.csv"].splitlines()
        assert lines[0].startswith("epoch,decision,train,eval,type:") and len(lines) == 1 + decisions
    once = {k: v for m, _ in tracker.metrics for k, v in m.items()}
    assert once["model/finetune_decisions"] == decisions and once["model/finetune_params_policy"] > 0
