"""``model.finetune.*`` keys in the experiment config: listed, round-tripped, validated (the loop applies
every registered strategy: tests/sweeps/test_finetune_loop.py)."""

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


def test_every_registered_strategy_validates_and_a_misspelt_one_is_refused_by_name():
    for name in ("frozen", "last_k", "spottune_block", "spottune", "spottune_res"):
        apply_overrides(ExperimentConfig(), {"model.finetune.name": name}).validate()
    with pytest.raises(ConfigError, match="finetune.name='spotune' is not a registered"):
        apply_overrides(ExperimentConfig(), {"model.finetune.name": "spotune"}).validate()


def test_a_strategy_on_a_task_without_an_encoder_is_refused_naming_the_task():
    from tasks.base import TASKS, TaskAdapter

    class NoEncoder(TaskAdapter):
        name = "no_encoder_task"
        encoder_attr = None

    TASKS[NoEncoder.name] = NoEncoder
    try:
        cfg = apply_overrides(ExperimentConfig(), {"model.finetune.name": "frozen", "train.task": NoEncoder.name})
        with pytest.raises(ConfigError, match="task 'no_encoder_task' has no encoder"):
            cfg.validate()
        apply_overrides(cfg, {"model.finetune.name": "standard"}).validate()
    finally:
        del TASKS[NoEncoder.name]
