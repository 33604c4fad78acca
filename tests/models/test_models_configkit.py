"""One configuration system: the same key gets the same coercion and the same error type whichever
package's config it lives in (models, tasks, pretraining, sweeps), and typed lists round-trip
through their flat MLflow form unchanged."""

from __future__ import annotations

import pytest

import models
import sweeps.config
import tasks
import tasks.pretrain.config
from models import apply_overrides as model_overrides
from models import lxmert_tiny
from models.configkit import ConfigError, coerce, flatten, unflatten
from sweeps.config import ExperimentConfig
from sweeps.config import apply_overrides as sweep_overrides
from tasks import DataConfig
from tasks.pretrain.config import PretrainConfig


def test_every_package_raises_the_same_error_type():
    assert models.ConfigError is tasks.ConfigError is sweeps.config.ConfigError is ConfigError
    assert tasks.pretrain.config.ConfigError is ConfigError


@pytest.mark.parametrize(
    "raw, typ, expected",
    [("3", int, 3), (3.0, int, 3), ("3e-4", float, 3e-4), (2, float, 2.0), ("yes", bool, True), ("OFF", bool, False),
     (1, bool, True), (7, str, "7"), ("a, b,,c", tuple[str, ...], ("a", "b", "c")),
     (["lang", "cross"], tuple[str, ...], ("lang", "cross")), ("", tuple[str, ...], ())],
)  # fmt: skip
def test_one_coercion_rule(raw, typ, expected):
    got = coerce("k", raw, typ)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "raw, typ",
    [("3.0", int), ("3.5", int), (3.5, int), (True, int), (True, float), ("nan", float), ("inf", float),
     (["a"], str), (None, str), (True, str), ("maybe", bool), (2, bool), ({"a": 1}, tuple[str, ...]),
     ([["a"]], tuple[str, ...])],
)  # fmt: skip
def test_one_refusal_rule(raw, typ):
    with pytest.raises(ConfigError, match="'k'"):
        coerce("k", raw, typ)


def test_the_same_value_means_the_same_thing_in_every_package():
    # "3.0" for an int: refused by the model's, the data's and the sweep's overrides alike
    for apply in (lambda: model_overrides(lxmert_tiny(), ["hidden_size=3.0"]),
                  lambda: DataConfig.from_flat({"data.grid": "3.0"}, "data."),
                  lambda: sweep_overrides(ExperimentConfig(), {"train.epochs": "3.0"})):  # fmt: skip
        with pytest.raises(ConfigError, match="expects int, got '3.0'"):
            apply()
    # and YAML's 3.0 (a float) is 3 in each
    assert model_overrides(lxmert_tiny(), {"num_heads": 2.0}).num_heads == 2
    assert DataConfig.from_flat({"data.grid": 3.0}, "data.").grid == 3
    assert sweep_overrides(ExperimentConfig(), {"train.epochs": 3.0}).train.epochs == 3


def test_typed_lists_round_trip_through_flat_strings_and_yaml_lists():
    cfg = sweep_overrides(ExperimentConfig(), {
        "model.attention.stacks": ["lang", "cross/cross"], "data.train_splits": "train, test",
        "pretrain.tasks": "mlm,match", "pretrain.schedule": ["match@epoch>=2"]})  # fmt: skip
    assert cfg.model.attention.stacks == ("lang", "cross/cross")
    assert cfg.data.train_splits == ("train", "test")
    flat = flatten(cfg)
    # the flat form (MLflow params) keeps the comma-separated strings logged before lists were typed
    assert flat["model.attention.stacks"] == "lang,cross/cross" and flat["pretrain.tasks"] == "mlm,match"
    assert flat["data.train_splits"] == "train,test" and flat["pretrain.schedule"] == "match@epoch>=2"
    assert flat["model.layerdrop.stacks"] == "lang,visn,cross"
    back = unflatten(ExperimentConfig, {k: str(v) for k, v in flat.items()})
    assert back == cfg
    # built directly in Python, a string or a list is the same typed list
    assert PretrainConfig(tasks="mlm, qa").tasks == PretrainConfig(tasks=["mlm", "qa"]).tasks == ("mlm", "qa")
    assert DataConfig(train_splits="train").train_splits == ("train",)


def test_a_wrong_type_built_in_python_names_the_key():
    with pytest.raises(ConfigError, match=r"DataConfig.grid must be int, got '3'"):
        DataConfig(grid="3")
    with pytest.raises(ConfigError, match=r"pretrain.epochs must be int, got 1.5"):
        PretrainConfig(epochs=1.5).validate()


def test_every_bad_key_is_reported_at_once_with_its_source():
    with pytest.raises(ConfigError) as err:
        sweep_overrides(ExperimentConfig(), {"train.lr": "fast", "model.hiden_size": 3, "data.grid": "x"},
                        source="grid.yaml cell 'softmax'")  # fmt: skip
    text = str(err.value)
    assert text.count("grid.yaml cell 'softmax'") == 3
    assert "'train.lr' expects float" in text and "Did you mean: model.hidden_size" in text
    assert "'data.grid' expects int" in text
