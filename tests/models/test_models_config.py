"""Configs: flat dotted keys round-trip, overrides coerce types, validation names the field."""

import pytest

from models import (
    AttentionConfig,
    ConfigError,
    LayerDropConfig,
    ModelConfig,
    apply_overrides,
    from_flat_dict,
    lxmert_10_6_6,
    lxmert_base,
    lxmert_tiny,
    to_flat_dict,
)
from models.attention import ATTENTION_REGISTRY


def test_flat_dict_round_trips_through_strings():
    cfg = lxmert_base("attention.name=span_entmax", "attention.stacks=lang,cross/cross", "layerdrop.mode=fixed")
    flat = to_flat_dict(cfg)
    assert flat["attention.name"] == "span_entmax" and flat["layerdrop.n_drop"] == 1
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    # MLflow hands params back as strings.
    assert from_flat_dict({k: str(v) for k, v in flat.items()}) == cfg


def test_overrides_coerce_and_presets_are_numbers_only():
    cfg = apply_overrides(lxmert_tiny(), ["hidden_size=64", "attention.span_ramp=4", "layerdrop.p=0.25",
                                          "layerdrop.mode=prob"])  # fmt: skip
    assert cfg.hidden_size == 64 and cfg.attention.span_ramp == 4 and cfg.layerdrop.p == 0.25
    assert (lxmert_10_6_6().l_layers, lxmert_10_6_6().x_layers, lxmert_10_6_6().r_layers) == (10, 6, 6)
    assert lxmert_base() == ModelConfig()
    assert lxmert_tiny(l_layers=9).l_layers == 9


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: ModelConfig(hidden_size=100, num_heads=12), "hidden_size=100"),
        (lambda: lxmert_base("layerdrop.mode=fixed", "layerdrop.n_drop=5"), "layerdrop.n_drop=5"),
        (lambda: AttentionConfig(name="sparse"), "attention.name='sparse'"),
        (lambda: AttentionConfig(stacks="lang,text"), "attention.stacks"),
        (lambda: LayerDropConfig(stacks="decoder"), "layerdrop.stacks"),
        (lambda: LayerDropConfig(mode="random"), "layerdrop.mode"),
        (lambda: LayerDropConfig(eval="half"), "layerdrop.eval"),
        (lambda: AttentionConfig(alpha_min=1.0), "attention.alpha_min"),
        (lambda: AttentionConfig(span_init=1.5), "attention.span_init"),
        (lambda: apply_overrides(lxmert_tiny(), ["hidden_size=abc"]), "'hidden_size' expects int, got 'abc'"),
        (lambda: apply_overrides(lxmert_tiny(), ["attention.nme=span"]), "attention.nme"),
    ],
)
def test_validation_names_the_field(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    assert field in str(err.value)


def test_unknown_attention_lists_the_registry():
    with pytest.raises(ConfigError) as err:
        AttentionConfig(name="flash")
    for name in ATTENTION_REGISTRY:
        assert name in str(err.value)


def test_attention_sites():
    att = AttentionConfig(name="span", stacks="cross/cross")
    assert att.uses("cross", "cross") and not att.uses("cross", "lang_self") and not att.uses("lang", "self")
    assert AttentionConfig(stacks="cross").uses("cross", "visn_self")
