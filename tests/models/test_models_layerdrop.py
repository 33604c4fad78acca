"""LayerDrop: fixed / probabilistic dropping in training, deterministic evaluation, pruning."""

import pytest
import torch
from models_testutils import make_batch, run_model

from models import ConfigError, build_model, lxmert_tiny
from models.config import LayerDropConfig
from models.flops import count_params
from models.layerdrop import LayerDrop, prune

DEPTHS = {"lang": 9, "visn": 5, "cross": 5}


def tiny_955(*overrides):
    return lxmert_tiny(*overrides, l_layers=9, x_layers=5, r_layers=5, hidden_size=16, intermediate_size=32)


def test_fixed_drop_runs_8_4_4_in_training_and_dropped_layers_get_no_gradient():
    model = build_model(tiny_955("layerdrop.mode=fixed", "layerdrop.n_drop=1")).train()
    batch = make_batch(model.config)
    out = run_model(model, batch)
    ran = model.layers_ran
    assert {k: len(v) for k, v in ran.items()} == {"lang": 8, "visn": 4, "cross": 4}
    (out.logits.sum() + out.visn.sum()).backward()
    enc = model.lxmert.encoder
    for stack, layers in (("lang", enc.lang_layers), ("visn", enc.visn_layers), ("cross", enc.cross_layers)):
        for i, layer in enumerate(layers):
            has_grad = all(p.grad is not None for p in layer.parameters())
            assert has_grad == (i in ran[stack]), (stack, i)


def test_evaluation_runs_every_layer_and_is_deterministic():
    model = build_model(tiny_955("layerdrop.mode=fixed", "layerdrop.n_drop=2")).eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        a = run_model(model, batch).logits
        assert model.layers_ran == {s: list(range(n)) for s, n in DEPTHS.items()}
        b = run_model(model, batch).logits
    assert torch.equal(a, b)


def test_decisions_are_the_same_on_every_rank_and_ignore_the_global_rng():
    cfg = LayerDropConfig(mode="fixed", n_drop=2, seed=7)
    ranks = [LayerDrop(cfg, DEPTHS) for _ in range(2)]
    plans = []
    for rank, ld in enumerate(ranks):
        torch.manual_seed(1000 + rank)  # ranks' global RNGs differ (e.g. different dropout masks)
        before = torch.random.get_rng_state()
        plans.append([ld.plan(training=True) for _ in range(30)])
        assert torch.equal(torch.random.get_rng_state(), before)
    assert plans[0] == plans[1]
    # Without replacement: exactly n_drop distinct layers dropped per stack, and the pattern changes.
    assert all(len(p["lang"]) == 7 and len(p["visn"]) == 3 and len(p["cross"]) == 3 for p in plans[0])
    assert len({tuple(p["lang"]) for p in plans[0]}) > 5
    # A different seed gives a different sequence; resuming at a step continues the same sequence.
    other = LayerDrop(LayerDropConfig(mode="fixed", n_drop=2, seed=8), DEPTHS)
    assert [other.plan(True) for _ in range(30)] != plans[0]
    resumed = LayerDrop(cfg, DEPTHS)
    resumed.step = 10
    assert resumed.plan(True) == plans[0][10]


def test_probability_mode_drops_at_rate_p_and_only_in_named_stacks():
    ld = LayerDrop(LayerDropConfig(mode="prob", p=0.3, stacks="lang", seed=0), DEPTHS)
    kept = [ld.plan(True) for _ in range(400)]
    rate = 1 - sum(len(p["lang"]) for p in kept) / (400 * 9)
    assert 0.25 < rate < 0.35
    assert all(p["visn"] == list(range(5)) and p["cross"] == list(range(5)) for p in kept)
    assert ld.plan(False) == {s: list(range(n)) for s, n in DEPTHS.items()}


def test_every_other_keep_list_and_pruned_model_equals_full_model_skipping_layers():
    cfg = tiny_955("layerdrop.mode=fixed", "layerdrop.eval=every_other", "layerdrop.stacks=lang,cross")
    model = build_model(cfg).eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        full = run_model(model, batch)
    assert model.layers_ran == {"lang": [0, 2, 4, 6, 8], "visn": [0, 1, 2, 3, 4], "cross": [0, 2, 4]}
    pruned = prune(model).eval()
    assert (pruned.config.l_layers, pruned.config.r_layers, pruned.config.x_layers) == (5, 5, 3)
    assert sum(p.numel() for p in pruned.parameters()) == count_params(pruned.config)
    with torch.no_grad():
        small = run_model(pruned, batch)
    assert torch.equal(small.logits, full.logits) and torch.equal(small.visn, full.visn)
    # Renumbered: pruned layer 1 holds the weights of full layer 2.
    assert torch.equal(
        pruned.lxmert.encoder.lang_layers[1].ffn.fc1.weight, model.lxmert.encoder.lang_layers[2].ffn.fc1.weight
    )
    # An explicit keep-list too.
    custom = prune(model, {"lang": [0, 8], "visn": [4], "cross": [1, 3]})
    assert (custom.config.l_layers, custom.config.r_layers, custom.config.x_layers) == (2, 1, 2)
    with pytest.raises(ValueError, match="keep"):
        prune(model, {"lang": [0, 9]})


def test_n_drop_must_leave_a_layer():
    with pytest.raises(ConfigError, match="layerdrop.n_drop=5.*'visn'"):
        tiny_955("layerdrop.mode=fixed", "layerdrop.n_drop=5")
    tiny_955("layerdrop.mode=fixed", "layerdrop.n_drop=5", "layerdrop.stacks=lang")  # lang has 9
