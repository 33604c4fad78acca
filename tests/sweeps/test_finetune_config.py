"""``model.finetune.*`` keys in the experiment config: listed, round-tripped, and refused by today's loop
until it applies them (models/finetune builds the strategies; issue 14's loop will run them)."""

import pytest

from sweeps.config import ConfigError, ExperimentConfig, apply_overrides, flatten, unflatten


def test_finetune_keys_are_listed_with_their_defaults(capsys):
    from sweeps.ablation import main

    assert main(["--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line in ("model.finetune.name=standard", "model.finetune.eval_mode=argmax", "model.finetune.policy_lr=0.0001",
                 "model.finetune.temperature=5.0", "model.finetune.constrain_scale=0.0"):  # fmt: skip
        assert line in lines


def test_finetune_keys_round_trip_as_mlflow_strings():
    cfg = apply_overrides(ExperimentConfig(), {"model.finetune.k": "2", "model.finetune.policy_lr": "3e-4",
                                               "model.finetune.train_embeddings": "false"})  # fmt: skip
    assert cfg.model.finetune.k == 2 and cfg.model.finetune.train_embeddings is False
    flat = flatten(cfg)
    assert unflatten(ExperimentConfig, {k: str(v) for k, v in flat.items()}) == cfg
    cfg.validate()  # standard: runs as before


def test_strategies_the_loop_does_not_apply_yet_are_refused_by_name():
    cfg = apply_overrides(ExperimentConfig(), {"model.finetune.name": "spottune"})
    with pytest.raises(ConfigError, match="model.finetune.name='spottune' is not wired into the training loop"):
        cfg.validate()
    with pytest.raises(ConfigError, match="finetune.name='spotune' is not a registered"):
        apply_overrides(ExperimentConfig(), {"model.finetune.name": "spotune"}).validate()
