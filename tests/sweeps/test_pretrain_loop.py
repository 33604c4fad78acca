"""The pretraining stage of a trial, without Ray: exact resume mid-pretraining, what is logged and
where, the schedule, and the strict transfer of the encoder to the VQA model."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import pytest
import torch

from sweeps.config import parse_cli_overrides
from sweeps.grid import expand, load_grid, load_preset
from sweeps.loop import STATE_FILE, TrialLoop, load_state, prepared_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def trial_config(cache, grid: str, cell: str, *overrides: str):
    over = parse_cli_overrides([f"data.cache_dir={cache}", "data.train_limit=128", "data.eval_limit=64",
                                "train.batch_size=32", "train.epochs=1", "pretrain.corpus_images=48",
                                "pretrain.corpus_eval_images=8", "pretrain.epochs=2", "pretrain.batch_size=32",
                                "pretrain.weight_every=2", *overrides])  # fmt: skip
    plan = expand(load_grid(grid), load_preset("smoke"), cli_overrides=over, cells=[cell])
    cfg = plan.trials[0].config
    return prepared_config(cfg)


class Crash(RuntimeError):
    pass


def roundtrip(state):
    """What a new process gets back from a checkpoint file (read as a worker reads it:
    ``torch.load(weights_only=True)``, which builds nothing but tensors and plain containers)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / STATE_FILE
        torch.save(state, path)
        return load_state(path)


class FakeTracker:
    """Records what the loop sends to MLflow (TrialTracker's interface)."""

    def __init__(self):
        self.metrics: list[tuple[dict, int]] = []
        self.stage: dict[str, dict[int, dict]] = {}
        self.epochs: dict[int, dict] = {}
        self.texts: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    def catch_up(self, history):
        return sum(self.log_epoch(e, m) for e, m in history)

    def log_epoch(self, epoch, metrics):
        if epoch in self.epochs:
            return False
        self.epochs[epoch] = dict(metrics)
        return True

    def log_stage_epoch(self, counter, epoch, metrics):
        logged = self.stage.setdefault(counter, {})
        if epoch in logged:
            return False
        logged[epoch] = dict(metrics)
        return True

    def log_metrics(self, metrics, step=0):
        self.metrics.append((dict(metrics), step))

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_text(self, text, name):
        self.texts[name] = text

    def log_dict(self, data, name):
        self.texts[name] = str(data)

    def log_bytes(self, data, name):
        self.texts[name] = f"{len(data)} bytes"

    def finish(self, status="FINISHED"):
        self.tags["status"] = status


@pytest.mark.parametrize("grid,cell", [("paper", "grad_std"), ("weighting", "uncertainty"), ("weighting", "gradnorm")])
def test_resuming_in_the_middle_of_pretraining_continues_exactly(cache, grid, cell):
    torch.set_num_threads(1)
    cfg = trial_config(cache, grid, cell)
    straight = TrialLoop(copy.deepcopy(cfg), log=lambda _m: None)
    straight.fit(lambda metrics, state: None)

    first = TrialLoop(copy.deepcopy(cfg), log=lambda _m: None)
    saved = []

    def crash_after_first_pretraining_epoch(metrics, state):
        saved.append(roundtrip(state))
        if metrics.get("pretrain/epoch") == 1:
            raise Crash  # the worker dies right after its checkpoint was written

    with pytest.raises(Crash):
        first.fit(crash_after_first_pretraining_epoch)
    assert saved[-1]["pretrain"]["done"] is False and saved[-1]["pretrain"]["stage"]["epoch"] == 1
    resumed = TrialLoop(copy.deepcopy(cfg), log=lambda _m: None)  # a new process
    resumed.load_state_dict(saved[-1])
    resumed.fit(lambda metrics, state: None)

    for (name, a), (_, b) in zip(straight.final.model.state_dict().items(), resumed.final.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{cell}: {name} differs after resume")
    ha, hb = straight.summaries["pretrain"]["history"], resumed.summaries["pretrain"]["history"]
    assert [e for e, _ in hb] == [1, 2]
    for key in ("pretrain/loss_mlm", "pretrain/weight_mor", "pretrain/eval_loss_qa", "pretrain/loss"):
        assert ha[-1][1][key] == hb[-1][1][key], key
    assert straight.history[-1][1]["eval/acc"] == resumed.history[-1][1]["eval/acc"]


def test_pretraining_logs_per_task_losses_and_weights_then_transfers(cache):
    torch.set_num_threads(1)
    cfg = trial_config(cache, "paper", "grad_std")
    loop = TrialLoop(cfg, log=lambda _m: None)
    tracker = FakeTracker()
    reported = []
    loop.fit(lambda metrics, state: reported.append((dict(metrics), state)), tracker)
    pre = tracker.stage["pretrain/epoch"]
    assert sorted(pre) == [1, 2] and sorted(tracker.epochs) == [1]  # each stage counts its own epochs
    for epoch, m in pre.items():
        for t in ("mlm", "mor", "match", "qa"):
            for key in (f"pretrain/loss_{t}", f"pretrain/weight_{t}", f"pretrain/eval_loss_{t}", f"pretrain/acc_{t}"):
                assert math.isfinite(m[key]), (epoch, key)
        assert sum(m[f"pretrain/weight_{t}"] for t in ("mlm", "mor", "match", "qa")) == pytest.approx(4.0)
        for key in ("pretrain/loss_mor_feat", "pretrain/loss_mor_obj", "pretrain/s_mlm", "pretrain/weighting_s",
                    "pretrain/samples_per_s", "time/elapsed_s"):  # fmt: skip
            assert key in m, key
    # the first reports are the pretraining epochs' (with their checkpoints), then fine-tuning's
    assert [m.get("pretrain/epoch") for m, _ in reported] == [1.0, 2.0, None]
    assert reported[0][1]["pretrain"]["done"] is False and reported[-1][1]["pretrain"]["done"] is True
    assert "weight" in tracker.texts["pretrain/weights.csv"].splitlines()[0]
    report = tracker.texts["pretrain/transfer_report.txt"]
    assert "0 missing" in report and "fresh (no counterpart, initialised anew): head" in report
    assert tracker.tags["pretrain.weighting"] == "grad_std" and "6 fresh (head)" in tracker.tags["pretrain.transfer"]
    n_encoder = sum(1 for n, _ in loop.final.model.named_parameters() if n.startswith("lxmert."))
    assert loop.summaries["pretrain"]["transfer"]["loaded"] == n_encoder
    # fine-tuning time includes pretraining's
    assert loop.history[-1][1]["time/elapsed_s"] > pre[2]["pretrain/time_s"]
    # a resume after the transfer does not pretrain again
    again = TrialLoop(copy.deepcopy(cfg), log=lambda _m: None)
    again.load_state_dict(roundtrip(reported[-1][1]))
    assert "pretrain" in again.summaries and again.running is None


def test_schedule_switches_qa_on_in_the_second_epoch(cache):
    torch.set_num_threads(1)
    cfg = trial_config(cache, "paper", "pretrain_equal", "pretrain.schedule=qa@epoch>=2")
    loop = TrialLoop(cfg, log=lambda _m: None)
    loop.fit(lambda metrics, state: None)
    first, second = (m for _, m in loop.summaries["pretrain"]["history"])
    assert first["pretrain/weight_qa"] == 0.0 and "pretrain/loss_qa" not in first
    assert second["pretrain/weight_qa"] == 1.0 and "pretrain/loss_qa" in second
    assert first["pretrain/weight_mlm"] == 1.0


def test_trials_without_pretraining_checkpoint_no_pretraining_state(cache):
    cfg = trial_config(cache, "paper", "softmax")
    loop = TrialLoop(cfg, log=lambda _m: None)
    assert loop.specs == [("finetune", "vqa")] and "pretrain" not in loop.state_dict()
