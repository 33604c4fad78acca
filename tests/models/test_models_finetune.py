"""Fine-tuning strategies (models/finetune): SpotTune's gates against the plain models they must equal,
frozen weights after real optimiser steps, the policy's gradient, evaluation modes, FLOPs and params
against torch's counter and the built models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models_testutils import make_batch, run_model
from torch.utils.flop_counter import FlopCounterMode

from models import (
    ConfigError,
    FinetuneConfig,
    apply_overrides,
    from_flat_dict,
    hooks,
    lxmert_base,
    lxmert_tiny,
    to_flat_dict,
)
from models.builders import backbone, init_weights
from models.finetune import (
    FINETUNE_REGISTRY,
    GRANULARITY,
    GatedModule,
    GroupUsage,
    apply_finetune,
    decision_count,
    get_strategy,
    make_optimizer,
    straight_through_gumbel,
)
from models.flops import count_params, finetune_cost, flops_per_sample
from models.heads import VQAHead

SPOTTUNE = sorted(GRANULARITY)


def tiny(name: str, *overrides: str, **fields):
    """Hidden 32, 4 heads, 2 language / 1 cross / 1 vision layers."""
    fields = {"l_layers": 2, "x_layers": 1, "r_layers": 1, **fields}
    return lxmert_tiny(f"finetune.name={name}", *overrides, **fields)


def pretrained(cfg, seed: int = 0):
    """A randomly initialised encoder standing in for pretrained weights, and an untouched copy."""
    torch.manual_seed(seed)
    encoder = backbone(cfg)
    init_weights(encoder, cfg.initializer_range)
    return encoder, copy.deepcopy(encoder)


def vqa_loss(out, head, batch_size: int = 3):
    targets = torch.linspace(0, 1, batch_size * head.fc2.out_features).reshape(batch_size, -1)
    return F.binary_cross_entropy_with_logits(head(out.pooled), targets)


def train_steps(plan, batch, steps: int = 3, seed: int = 0):
    """Real optimiser steps: AdamW with weight decay on the plan's groups and a head, the policy's own
    optimiser; returns the head."""
    torch.manual_seed(seed)
    cfg = plan.encoder.config
    head = VQAHead(cfg.hidden_size, cfg.num_answers)
    main_params = [p for g in plan.param_groups if "optimizer" not in g for p in g["params"]]
    opts = [torch.optim.AdamW(main_params + list(head.parameters()), lr=1e-2, weight_decay=0.1)]
    opts += [make_optimizer(g) for g in plan.param_groups if "optimizer" in g]
    plan.encoder.train()
    for step in range(steps):
        plan.set_temperature(0, step)
        loss = vqa_loss(run_model(plan.encoder, batch), head) + hooks.aux_loss(plan.encoder)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        hooks.post_step(plan.encoder)
    return head


def with_shared_parts_of(reference, wrapped):
    """``reference`` (the pretrained encoder) with ``wrapped``'s embeddings and pooler, which are not
    gated and train in SpotTune: the model every decision at "frozen" must equal."""
    for part in ("embeddings", "visual_embeddings", "pooler"):
        getattr(reference, part).load_state_dict(getattr(wrapped, part).state_dict())
    return reference


# --------------------------------------------------------------------------------------------------
# Acceptance: forced decisions reproduce standard fine-tuning and the frozen model, bit for bit


@pytest.mark.parametrize("name", SPOTTUNE)
@pytest.mark.parametrize("mode", ["eval", "train_no_dropout"])
def test_forced_decisions_equal_standard_and_frozen_models(name, mode):
    overrides = ["hidden_dropout=0", "attention_dropout=0"] if mode == "train_no_dropout" else []
    cfg = tiny(name, *overrides)
    encoder, reference = pretrained(cfg)
    batch = make_batch(cfg, visual_pad=True)
    plan = apply_finetune(encoder)
    train_steps(plan, batch)  # the fine-tuned copies move away from the frozen ones
    wrapped = plan.encoder
    wrapped.train(mode != "eval")

    standard = backbone(cfg)
    standard.load_state_dict(wrapped.finetuned_state_dict())  # strict: every key of a plain encoder
    standard.train(mode != "eval")
    frozen = with_shared_parts_of(reference, wrapped).train(mode != "eval")

    wrapped.force("finetuned")
    out_ft = run_model(wrapped, batch, output_attentions=True)
    wrapped.force("frozen")
    out_fr = run_model(wrapped, batch, output_attentions=True)
    ref_ft = run_model(standard, batch, output_attentions=True)
    ref_fr = run_model(frozen, batch, output_attentions=True)
    for ours, ref in ((out_ft, ref_ft), (out_fr, ref_fr)):
        for field in ("lang", "visn", "pooled"):
            assert torch.equal(getattr(ours, field), getattr(ref, field)), field
        assert ours.attentions.keys() == ref.attentions.keys()
        assert all(torch.equal(ours.attentions[k], ref.attentions[k]) for k in ref.attentions)
    # not equal by construction: the two copies really differ after training
    assert (out_ft.pooled - out_fr.pooled).abs().max() > 1e-3


@pytest.mark.parametrize("name", SPOTTUNE)
def test_each_sample_follows_its_own_decisions(name):
    """Sample 0 frozen everywhere, sample 1 fine-tuned everywhere, sample 2 frozen: in one batch each
    row equals its reference model's row (the mix is per sample)."""
    cfg = tiny(name)
    encoder, reference = pretrained(cfg)
    batch = make_batch(cfg)
    plan = apply_finetune(encoder)
    train_steps(plan, batch)
    wrapped = plan.encoder.eval()
    standard = backbone(cfg).eval()
    standard.load_state_dict(wrapped.finetuned_state_dict())
    frozen = with_shared_parts_of(reference, wrapped).eval()
    decisions = torch.zeros(3, len(plan.decision_names))
    decisions[1] = 1
    wrapped.force(decisions)
    mixed = run_model(wrapped, batch).pooled
    torch.testing.assert_close(mixed[1], run_model(standard, batch).pooled[1], rtol=0, atol=1e-6)
    expected_frozen = run_model(frozen, batch).pooled
    torch.testing.assert_close(mixed[[0, 2]], expected_frozen[[0, 2]], rtol=0, atol=1e-6)
    assert torch.equal(wrapped.last_decisions, decisions)


def test_both_branches_read_the_same_input():
    """A gated layer at "frozen" computes frozen(x), not frozen(finetuned(x)) (the reference code's
    SpotTune_Block fed the frozen layer the fine-tuned layer's output)."""
    cfg = tiny("spottune_block")
    encoder, _ = pretrained(cfg)
    plan = apply_finetune(encoder)
    gate = plan.encoder.encoder.lang_layers[0]
    assert isinstance(gate, GatedModule)
    with torch.no_grad():
        for p in gate.finetuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gate.eval()
    x = torch.randn(2, 5, cfg.hidden_size)
    plan.encoder.board.current = torch.zeros(2, plan.encoder.board.size)
    out, _ = gate(x, None)
    plan.encoder.board.current = None
    assert torch.equal(out, gate.frozen(x, None)[0])
    in_series = gate.frozen(gate.finetuned(x, None)[0], None)[0]
    assert (out - in_series).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# What trains: frozen weights stay bit-identical after real steps, the policy gets a gradient


def frozen_params(plan):
    trainable = {id(p) for p in plan.trainable_parameters()}
    return {n: p for n, p in plan.encoder.named_parameters() if id(p) not in trainable}


@pytest.mark.parametrize("name", SPOTTUNE + ["frozen", "last_k"])
def test_frozen_weights_get_no_gradient_and_stay_bit_identical(name):
    cfg = tiny(name, "finetune.train_embeddings=false")
    encoder, _ = pretrained(cfg)
    plan = apply_finetune(encoder)
    frozen = frozen_params(plan)
    before = {n: p.detach().clone() for n, p in frozen.items()}
    trainable_before = {id(p): p.detach().clone() for p in plan.trainable_parameters()}
    assert frozen and all(not p.requires_grad for p in frozen.values())
    train_steps(plan, make_batch(cfg), steps=3)
    assert all(p.grad is None for p in frozen.values())
    assert all(torch.equal(p, before[n]) for n, p in frozen.items())
    # the others did train (so the steps above were real): every parameter of the main group that got
    # a gradient (the vision half of the last cross layer gets none: the head reads the [CLS] only)
    main = [p for g in plan.param_groups if "optimizer" not in g for p in g["params"]]
    with_grad = [p for p in main if p.grad is not None]
    assert len(with_grad) >= 0.7 * len(main)
    assert all(not torch.equal(p, trainable_before[id(p)]) for p in with_grad)
    if name in SPOTTUNE:  # the frozen copies are the pretrained weights, embeddings included
        _, reference = pretrained(cfg)
        assert plan.encoder.frozen_state_dict().keys() == reference.state_dict().keys()
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in plan.encoder.frozen_state_dict().items()
                   if not k.startswith("pooler"))  # fmt: skip


def test_param_groups_cover_every_trainable_parameter_once():
    for name in FINETUNE_REGISTRY:
        cfg = tiny(name)
        plan = apply_finetune(pretrained(cfg)[0])
        grouped = [id(p) for p in plan.trainable_parameters()]
        assert len(grouped) == len(set(grouped))
        assert set(grouped) == {id(p) for p in plan.encoder.parameters() if p.requires_grad}
        if name in SPOTTUNE:
            assert [g["name"] for g in plan.param_groups] == ["encoder", "policy"]
            policy = plan.param_groups[1]
            assert policy["optimizer"] == {"name": "sgd", "lr": 1e-4, "momentum": 0.0}
            assert {id(p) for p in policy["params"]} == {id(p) for p in plan.extra_modules["policy"].parameters()}
            assert isinstance(make_optimizer(policy), torch.optim.SGD)


def test_standard_returns_the_encoder_with_everything_trainable():
    cfg = tiny("standard")
    encoder, _ = pretrained(cfg)
    plan = get_strategy("standard")(encoder, cfg.finetune)
    assert plan.encoder is encoder and plan.decision_names == [] and plan.set_temperature(3, 10) is None
    assert len(plan.trainable_parameters()) == len(list(encoder.parameters()))


@pytest.mark.parametrize("k", [1, 2])
def test_last_k_trains_exactly_the_top_k_layers_of_each_stack(k):
    cfg = tiny("last_k", f"finetune.k={k}", l_layers=3, x_layers=2, r_layers=2)
    encoder, reference = pretrained(cfg)
    plan = apply_finetune(encoder)
    train_steps(plan, make_batch(cfg), steps=2)
    enc, ref = encoder.encoder, reference.encoder
    for stack in ("lang_layers", "visn_layers", "cross_layers"):
        layers, ref_layers = getattr(enc, stack), getattr(ref, stack)
        for i, (layer, ref_layer) in enumerate(zip(layers, ref_layers)):
            top = i >= len(layers) - k
            assert all(p.requires_grad == top for p in layer.parameters()), (stack, i)
            for p, q in zip(layer.parameters(), ref_layer.parameters()):
                # a top layer moved wherever it got a gradient (not the last cross layer's vision half)
                assert torch.equal(p, q) != (top and p.grad is not None), (stack, i)
    assert all(p.requires_grad for p in encoder.pooler.parameters())


def test_frozen_can_freeze_the_embeddings_too():
    cfg = tiny("frozen")
    plan = apply_finetune(pretrained(cfg)[0])
    trainable = {n for n, p in plan.encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("embeddings", "visual_embeddings", "pooler")) for n in trainable)
    plan = apply_finetune(pretrained(tiny("frozen", "finetune.train_embeddings=false"))[0])
    assert {n for n, p in plan.encoder.named_parameters() if p.requires_grad} == {"pooler.dense.weight",
                                                                                   "pooler.dense.bias"}


@pytest.mark.parametrize("name", SPOTTUNE)
def test_policy_gets_gradients_through_the_gumbel_softmax(name):
    cfg = tiny(name)
    plan = apply_finetune(pretrained(cfg)[0])
    wrapped = plan.encoder.train()
    head = VQAHead(cfg.hidden_size, cfg.num_answers)
    batch = make_batch(cfg)
    vqa_loss(run_model(wrapped, batch), head).backward()
    policy = plan.extra_modules["policy"].network
    grads = {n: p.grad for n, p in policy.named_parameters()}
    # everything but the vision half of its last cross layer (its [CLS] does not read it)
    dead = ("lxmert.encoder.cross_layers.0.visn_self_att.", "lxmert.encoder.cross_layers.0.visn_ffn.")
    assert all((g is None) == n.startswith(dead) for n, g in grads.items())
    assert grads["head.fc2.weight"].abs().sum() > 0 and grads["lxmert.embeddings.word.weight"].abs().sum() > 0
    # forced decisions bypass the policy: then it gets nothing, so the gradient above came through the sample
    policy.zero_grad(set_to_none=True)
    wrapped.force("finetuned")
    vqa_loss(run_model(wrapped, batch), head).backward()
    assert all(p.grad is None for p in policy.parameters())


def test_straight_through_sample_matches_torch_gumbel_softmax():
    """Same noise as ``F.gumbel_softmax(hard=True)``: same hard values, same gradient; ours is exactly
    0 or 1 (torch's ``hard - soft.detach() + soft`` may land an ulp off)."""
    logits = torch.randn(64, 7, 2)
    grads = []
    for fn in (lambda x: straight_through_gumbel(x, 5.0),
               lambda x: F.gumbel_softmax(x, tau=5.0, hard=True)[..., 1]):  # fmt: skip
        x = logits.clone().requires_grad_(True)
        torch.manual_seed(3)
        y = fn(x)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        grads.append((y.detach(), x.grad))
    (ours, g_ours), (torchs, g_torch) = grads
    assert torch.equal(ours.round(), torchs.round()) and set(ours.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(g_ours, g_torch)
    assert g_ours.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Evaluation modes, usage statistics, losses, temperature


def test_argmax_evaluation_is_deterministic_and_sample_is_not():
    cfg = tiny("spottune")
    plan = apply_finetune(pretrained(cfg)[0])
    wrapped = plan.encoder.eval()
    batch = make_batch(cfg)
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append((run_model(wrapped, batch).pooled, wrapped.last_decisions))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    inputs = [batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos")]
    logits = plan.extra_modules["policy"].network(*inputs)
    assert torch.equal(runs[0][1], (logits[..., 1] > logits[..., 0]).float())
    wrapped.policy.eval_mode = "sample"
    samples = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        run_model(wrapped, batch)
        samples.append(wrapped.last_decisions)
    assert not torch.equal(samples[0], samples[1])


def test_global_mode_uses_units_most_training_samples_fine_tuned():
    cfg = tiny("spottune_res", "finetune.eval_mode=global")
    plan = apply_finetune(pretrained(cfg)[0])
    wrapped = plan.encoder
    batch = make_batch(cfg)
    wrapped.eval()
    with pytest.raises(RuntimeError, match="eval_mode=global needs"):
        run_model(wrapped, batch)
    d = len(plan.decision_names)
    pattern = torch.zeros(3, d)
    pattern[:2, ::2] = 1  # even units: 2 of 3 samples fine-tune; odd units: none
    pattern[0, 1] = 1  # unit 1: 1 of 3
    wrapped.train()
    wrapped.force(pattern)
    run_model(wrapped, batch)
    run_model(wrapped, batch)
    wrapped.force(None)
    expected = (pattern.mean(0) > 0.5).float()
    torch.testing.assert_close(wrapped.usage("train"), pattern.mean(0).double())
    wrapped.eval()
    run_model(wrapped, batch)
    assert torch.equal(wrapped.last_decisions, expected.expand(3, -1))
    # the counts ride along in the state dict (a resumed run evaluates the same fixed policy)
    clone = apply_finetune(pretrained(cfg)[0])
    clone.encoder.load_state_dict(wrapped.state_dict())
    assert torch.equal(clone.encoder.global_decisions(), expected)
    plan.reset_usage()
    assert int(sum(u.train_seen for u in wrapped.units())) == 0


def test_usage_and_entropy_stats_through_the_hooks():
    cfg = tiny("spottune")
    plan = apply_finetune(pretrained(cfg)[0])
    wrapped = plan.encoder.train()
    batch = make_batch(cfg)
    for _ in range(2):
        run_model(wrapped, batch)
    stats = hooks.collect_stats(wrapped)
    # one entry per gated unit, one value per decision of the unit; frozen copies report nothing
    assert len(stats["lang/1/self/usage"]) == cfg.num_heads + 1
    assert len(stats["cross/0/cross/usage"]) == cfg.num_heads + 1 and len(stats["cross/0/visn_ffn/usage"]) == 2
    usage_keys = [k for k in stats if k.endswith("/usage")]
    assert sum(len(stats[k]) for k in usage_keys) == len(plan.decision_names)
    flat = [v for k in usage_keys for v in stats[k]]
    torch.testing.assert_close(torch.tensor(flat, dtype=torch.float64), wrapped.usage("train"), rtol=0, atol=1e-7)
    assert all(0.0 <= v <= 1.0 for v in flat)
    entropy = stats["policy/entropy"][0]
    assert 0.0 < entropy <= float(torch.log(torch.tensor(2.0))) + 1e-6
    assert stats["policy/temperature"] == [5.0]
    # per-sample decisions of the last forward, for per-question-type usage
    assert wrapped.last_decisions.shape == (3, len(plan.decision_names))
    by_type = GroupUsage()
    by_type.update(plan.last_decisions(), ["what color", "is there", "what color"])
    rates = by_type.rates()
    assert torch.equal(rates["is there"], wrapped.last_decisions[1].double())
    assert torch.equal(rates["what color"], wrapped.last_decisions[[0, 2]].double().mean(0))


def test_frozen_copies_are_invisible_to_the_hooks():
    cfg = tiny("spottune_block", "attention.name=span", "attention.span_init=0.5")
    plan = apply_finetune(pretrained(cfg)[0])
    wrapped = plan.encoder.train()
    run_model(wrapped, make_batch(cfg))
    stats = hooks.collect_stats(wrapped)
    spans = sorted(k for k in stats if k.endswith("/span"))
    # one span per attention site of the encoder (the fine-tuned copies), named as in a plain model
    plain = hooks.collect_stats(backbone(cfg))
    assert spans == sorted(k for k in plain if k.endswith("/span"))
    penalties = [n for n, _ in hooks._modules_with(wrapped, "aux_loss") if n.endswith("span")]
    assert len(penalties) == len(spans) and all(".finetuned." in n for n in penalties)
    assert all(p.requires_grad for p in hooks.mechanism_parameters(wrapped))


def test_constrain_k_and_entropy_losses():
    cfg = tiny("spottune_block", "finetune.constrain_k=2", "finetune.constrain_scale=0.5",
               "finetune.entropy_weight=0.1")  # fmt: skip
    plan = apply_finetune(pretrained(cfg)[0])
    wrapped = plan.encoder.train()
    run_model(wrapped, make_batch(cfg))
    d = wrapped.policy._sampled
    usage = d.detach().mean(0).clamp(1e-6, 1 - 1e-6)
    entropy = -(usage * usage.log() + (1 - usage) * (1 - usage).log()).mean()
    expected = 0.5 * (usage.sum() - 2) ** 2 + 0.1 * entropy
    loss = hooks.aux_loss(wrapped)
    torch.testing.assert_close(loss, expected.float())
    loss.backward()
    assert plan.extra_modules["policy"].network.head.fc2.weight.grad.abs().sum() > 0
    # off by default, and zero outside training
    off = apply_finetune(pretrained(tiny("spottune_block"))[0])
    off.encoder.train()
    run_model(off.encoder, make_batch(cfg))
    assert hooks.aux_loss(off.encoder) == 0
    wrapped.eval()
    run_model(wrapped, make_batch(cfg))
    assert hooks.aux_loss(wrapped) == 0


def test_temperature_schedules():
    assert FinetuneConfig().temperature_at(7, 700) == 5.0
    exp = FinetuneConfig(temperature_schedule="exp", temperature_decay=0.5, temperature_min=1.0)
    assert [exp.temperature_at(e, 0) for e in range(4)] == [5.0, 2.5, 1.25, 1.0]
    lin = FinetuneConfig(temperature_schedule="linear", temperature_decay=0.01, temperature_unit="step")
    assert lin.temperature_at(9, 100) == pytest.approx(4.0) and lin.temperature_at(0, 10_000) == 0.5
    plan = apply_finetune(pretrained(tiny("spottune", "finetune.temperature_schedule=exp",
                                          "finetune.temperature_decay=0.5"))[0])  # fmt: skip
    assert plan.set_temperature(2, 0) == 1.25 and plan.extra_modules["policy"].temperature == 1.25


# --------------------------------------------------------------------------------------------------
# Policy construction, decision counts, configuration errors


def test_policy_starts_from_the_pretrained_encoder():
    cfg = tiny("spottune", l_layers=3, x_layers=2, r_layers=2)
    encoder, reference = pretrained(cfg)
    plan = apply_finetune(encoder)
    policy = plan.extra_modules["policy"].network.lxmert
    assert (policy.config.l_layers, policy.config.r_layers, policy.config.x_layers) == (2, 1, 1)
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in policy.state_dict().items())
    random = apply_finetune(pretrained(tiny("spottune", "finetune.policy_init=random", "finetune.policy_hidden=16",
                                            "finetune.policy_heads=2"))[0])  # fmt: skip
    assert random.extra_modules["policy"].network.lxmert.config.hidden_size == 16


def test_decision_counts_of_lxmert_9_5_5():
    """19 per layer; 425 per component (as the reference code: 15 per single-stream layer, 43 per
    cross layer); 58 per residual segment. Counted on the built model (meta tensors, no memory)."""
    expected = {"spottune_block": 19, "spottune": 425, "spottune_res": 58}
    for name, n in expected.items():
        cfg = lxmert_base(f"finetune.name={name}")
        assert decision_count(cfg, name) == n
        with torch.device("meta"):
            plan = apply_finetune(backbone(cfg))
        assert len(plan.decision_names) == len(set(plan.decision_names)) == n
        assert plan.extra_modules["policy"].network.head.fc2.out_features == 2 * n
    names = apply_finetune(backbone(tiny("spottune_res"))).decision_names
    assert names[:4] == ["lang/0/self", "lang/0/ffn", "lang/1/self", "lang/1/ffn"]
    assert names[-6:] == ["cross/0/cross/lang", "cross/0/cross/visn", "cross/0/lang_self", "cross/0/visn_self",
                          "cross/0/lang_ffn", "cross/0/visn_ffn"]  # fmt: skip


def test_registry_and_config_errors_name_the_key():
    with pytest.raises(KeyError, match=r"unknown fine-tuning strategy 'nope'; valid: \['frozen', 'last_k'"):
        get_strategy("nope")
    with pytest.raises(ConfigError, match=r"finetune.name='nope' is not a registered.*'spottune_block'"):
        lxmert_tiny("finetune.name=nope")
    with pytest.raises(ConfigError, match="finetune.k=3 exceeds the 2 layer"):
        lxmert_tiny("finetune.name=last_k", "finetune.k=3")
    with pytest.raises(ConfigError, match="finetune.eval_mode='mean'"):
        lxmert_tiny("finetune.eval_mode=mean")
    with pytest.raises(ConfigError, match="policy_init=copy needs the policy as wide"):
        lxmert_tiny("finetune.name=spottune", "finetune.policy_hidden=16")
    with pytest.raises(ConfigError, match="finetune.policy_l_layers=3 exceeds"):
        lxmert_tiny("finetune.name=spottune", "finetune.policy_l_layers=3")
    with pytest.raises(ConfigError, match="finetune.k='two' is not a int|finetune.k"):
        lxmert_tiny("finetune.k=two")
    with pytest.raises(TypeError, match="LxmertModel"):
        apply_finetune(torch.nn.Linear(2, 2), FinetuneConfig(name="spottune"))


def test_finetune_keys_round_trip_through_flat_dicts():
    cfg = lxmert_tiny("finetune.name=spottune_res", "finetune.temperature=2.5", "finetune.train_embeddings=false")
    flat = to_flat_dict(cfg)
    assert flat["finetune.name"] == "spottune_res" and flat["finetune.train_embeddings"] is False
    assert from_flat_dict({k: str(v) for k, v in flat.items()}) == cfg
    assert apply_overrides(lxmert_tiny(), {"finetune.k": "2"}).finetune.k == 2


# --------------------------------------------------------------------------------------------------
# FLOPs and parameters: both copies + the policy, against torch's FLOP counter and the built models


@pytest.mark.parametrize("name", sorted(FINETUNE_REGISTRY))
@pytest.mark.parametrize("embeddings", ["true", "false"])
def test_finetune_cost_matches_torchs_flop_counter(name, embeddings):
    # attention dropout on: in CPU training the explicit matmuls run (the counter does not see CPU SDPA)
    cfg = lxmert_tiny(f"finetune.name={name}", f"finetune.train_embeddings={embeddings}", "attention_dropout=0.1",
                      l_layers=3, x_layers=2, r_layers=2)  # fmt: skip
    plan = apply_finetune(pretrained(cfg)[0])
    head = VQAHead(cfg.hidden_size, cfg.num_answers)
    batch = make_batch(cfg, batch=2, tokens=7, regions=5, pad=False)
    plan.encoder.train()
    with FlopCounterMode(display=False) as forward:
        loss = head(run_model(plan.encoder, batch).pooled).sum()
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    cost = finetune_cost(cfg, n_tokens=7, n_regions=5)
    assert forward.get_total_flops() / 2 == cost.forward
    assert backward.get_total_flops() / 2 == cost.backward
    params = list(plan.encoder.parameters()) + list(head.parameters())
    policy = {id(p) for m in plan.extra_modules.values() for p in m.parameters()}
    assert cost.params_total == sum(p.numel() for p in params)
    assert cost.params_policy == sum(p.numel() for p in params if id(p) in policy)
    assert cost.params_trainable == sum(p.numel() for p in params if p.requires_grad and id(p) not in policy)
    if name == "standard":
        assert cost.forward == flops_per_sample(cfg, 7, 5)


def test_finetune_cost_of_lxmert_base():
    base = finetune_cost(lxmert_base())
    assert base.forward == flops_per_sample(lxmert_base())
    frozen = finetune_cost(lxmert_base("finetune.name=frozen", "finetune.train_embeddings=false"))
    assert frozen.backward < 0.01 * base.backward  # only pooler and head
    spot = finetune_cost(lxmert_base("finetune.name=spottune"))
    assert spot.decisions == 425
    # both copies of every layer run, plus a 2-1-1 policy
    layers = base.forward - flops_per_sample(lxmert_base(l_layers=0, x_layers=0, r_layers=0))
    assert spot.forward == pytest.approx(base.forward + layers + spot.policy_forward, rel=1e-3)
    layer_params = count_params(lxmert_base()) - count_params(lxmert_base(l_layers=0, x_layers=0, r_layers=0))
    assert spot.params_trainable == base.params_trainable == 213_930_297
    assert spot.params_frozen == layer_params  # one frozen copy of every layer
    global_eval = finetune_cost(lxmert_base("finetune.name=spottune", "finetune.eval_mode=global"))
    assert global_eval.eval_forward == spot.eval_forward - spot.policy_forward


def test_plain_weights_cannot_be_loaded_into_the_wrapped_encoder_by_accident():
    """The reference code could leave its frozen copies at another initialisation; here the gated model
    has other names, so a strict load of a plain encoder's weights fails loudly."""
    cfg = tiny("spottune")
    plan = apply_finetune(pretrained(cfg)[0])
    with pytest.raises(RuntimeError, match="Missing key"):
        plan.encoder.load_state_dict(backbone(cfg).state_dict())


# --------------------------------------------------------------------------------------------------
# The side-by-side benchmark runs end to end


def test_bench_tiny_run_prints_every_strategy_and_ratios(capsys):
    from benchmarks import finetune as bench

    table = bench.run(bench.parse_args(["--size", "tiny", "--repeats", "1", "--steps", "1",
                                        "--strategies", "frozen,spottune"]))  # fmt: skip
    assert list(table) == ["standard", "frozen", "spottune"]
    assert table["standard"]["time_ratio"] == 1.0 and table["standard"]["peak_ratio"] == 1.0
    assert table["spottune"]["peak_mb"] > table["standard"]["peak_mb"] > table["frozen"]["peak_mb"] > 0
    assert table["spottune"]["decisions"] == 40 and table["spottune"]["flops_ratio"] > 2
    assert "time vs std" in capsys.readouterr().out
