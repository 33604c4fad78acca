"""The trial loop without Ray: resume equivalence, hooks, metrics (fast, in-process)."""

from __future__ import annotations

import math

import pytest
import torch

from sweeps.config import parse_cli_overrides
from sweeps.grid import expand, load_grid, load_preset
from sweeps.loop import STATE_FILE, TrialLoop, load_state, prepared_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def trial_config(cache, cell: str, *overrides: str):
    over = parse_cli_overrides([f"data.cache_dir={cache}", "data.train_limit=256", "data.eval_limit=128",
                                "train.batch_size=32", *overrides])
    plan = expand(load_grid("paper"), load_preset("smoke"), cli_overrides=over, cells=[cell])
    cfg = plan.trials[0].config
    return prepared_config(cfg)


def run(cfg, epochs_before_resume: int | None = None, tmp_path=None):
    torch.set_num_threads(1)
    loop = TrialLoop(cfg, log=lambda _m: None)
    states = []
    if epochs_before_resume is None:
        loop.fit(lambda metrics, state: states.append(state))
        return loop, states
    total = cfg.train.epochs
    loop.cfg.train.epochs = epochs_before_resume  # stop early, as a killed worker would
    loop.fit(lambda metrics, state: states.append(state))
    # Through a file, read back as a resumed worker reads it: torch.load(weights_only=True).
    path = tmp_path / STATE_FILE
    torch.save(states[-1], path)
    saved = load_state(path)
    cfg.train.epochs = total
    fresh = TrialLoop(cfg, log=lambda _m: None)  # a new process: new model, optimizer, data
    fresh.load_state_dict(saved)
    fresh.fit(lambda metrics, state: states.append(state))
    return fresh, states


@pytest.mark.parametrize("cell, extra", [
    ("softmax", ()), ("layerdrop_955", ()),
    # the paper's optimizer: Lookahead's slow weights and LAMB's moments in the checkpoint too
    ("span_entmax", ("train.optimizer=lookahead_lamb", "train.schedule=cyclic", "train.lr_min=1e-5")),
])
def test_resuming_from_a_checkpoint_continues_exactly(cache, cell, extra, tmp_path):
    import copy

    cfg = trial_config(cache, cell, "train.epochs=2", *extra)
    straight, _ = run(copy.deepcopy(cfg))
    resumed, _ = run(copy.deepcopy(cfg), epochs_before_resume=1, tmp_path=tmp_path)
    for (name, a), (_, b) in zip(straight.final.model.state_dict().items(), resumed.final.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{cell}: {name} differs after resume")
    assert [e for e, _ in resumed.history] == [1, 2]
    for key in ("train/loss", "eval/acc"):
        assert straight.history[-1][1][key] == resumed.history[-1][1][key], key


def test_epoch_metrics_and_hooks(cache):
    cfg = trial_config(cache, "span", "train.epochs=2", "train.lr=0.5", "model.attention.span_penalty=0.1")
    loop, states = run(cfg)
    metrics = loop.history[-1][1]
    for key in ("train/loss", "train/aux_loss", "train/lr", "train/samples_per_s", "eval/acc", "eval/acc_yes_no",
                "best/acc", "best/epoch", "layers/lang_ran"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert loop.history[0][1]["train/aux_loss"] > 0  # the span penalty reached the loss
    # post_step clamps z into [0, 1] even at an absurd learning rate
    spans = [v for k, v in metrics.items() if k.startswith("span/") and not k.endswith("_max")]
    assert spans and all(0.0 <= s <= cfg.model.attention.span_max_cross for s in spans)
    assert len(states) == 2 and states[-1]["epoch"] == 2


def test_predictions_and_examples_cover_the_evaluation_split(cache):
    cfg = trial_config(cache, "softmax", "train.epochs=1", "train.n_examples=3")
    loop, _ = run(cfg)
    result = loop.final.adapter.predict(loop.final.trainable, loop.final.context())
    table = loop.final.adapter.predictions_table(result).splitlines()
    assert table[0] == "question_id,answer,score,answer_type,question_type,soft_score"
    assert len(table) - 1 == len(loop.final.adapter.data.eval) == 128
    examples = loop.final.adapter.examples(result, 3)
    assert [e["question_id"] for e in examples] == [int(q) for q in loop.final.adapter.data.eval.question_ids[:3]]
    assert all(len(e["top5"]) == 5 and e["top5"][0]["prob"] >= e["top5"][-1]["prob"] for e in examples)


def test_time_account_splits_the_trial_and_carries_over_a_resume(cache):
    import time

    cfg = trial_config(cache, "softmax", "train.epochs=2")
    torch.set_num_threads(1)
    began = time.time() - 2.0  # the trial began 2 s before the loop was built (process start, imports)
    loop = TrialLoop(cfg, log=lambda _m: None, started=began)
    states = []

    def slow_report(metrics, state):  # a checkpoint that takes 0.2 s to persist
        time.sleep(0.2)
        states.append(state)

    loop.cfg.train.epochs = 1  # killed after epoch 1
    first = loop.fit(slow_report)
    t_end = time.time()
    account = {k: first[f"time/{k}"] for k in ("startup_s", "train_s", "eval_s", "checkpoint_s", "other_s")}
    assert account["startup_s"] >= 2.0
    assert account["checkpoint_s"] >= 0.2
    assert account["train_s"] > 0 and account["eval_s"] > 0
    # The parts are the whole trial: its wall time from `began` to the end of fit.
    assert sum(account.values()) == pytest.approx(first["time/wall_s"], abs=1e-6)
    assert began + first["time/wall_s"] <= t_end
    # train + eval are the steps that time/elapsed_s (measured around them in fit) also counts.
    assert account["train_s"] + account["eval_s"] <= first["time/elapsed_s"] + 1e-6
    saved = states[-1]["times"]
    assert saved["train_s"] == pytest.approx(account["train_s"])

    cfg.train.epochs = 2
    t_restart = time.time()
    resumed = TrialLoop(cfg, log=lambda _m: None, started=t_restart)
    resumed.load_state_dict(states[-1])
    final = resumed.fit(slow_report)
    # The second attempt adds to the first as of its checkpoint (built before it was persisted, so
    # without that last persist): its start-up, one more epoch, one more checkpoint.
    assert final["time/train_s"] > saved["train_s"] and final["time/checkpoint_s"] >= 0.2
    assert final["time/startup_s"] >= account["startup_s"]
    assert final["time/wall_s"] == pytest.approx(saved["wall_s"] + (time.time() - t_restart), abs=0.5)
