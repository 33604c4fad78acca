"""Which executor a trial gets, what it asks of Tune, and how the sweep sums its trials' time
(fast: no Ray processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeps import executor
from sweeps.ablation import timing_lines
from sweeps.config import ConfigError, ExperimentConfig, apply_overrides
from sweeps.tune import (
    SweepOutcome,
    TrialOutcome,
    reuse_trial_processes,
    trainable_resources,
    tune_max_failures,
)


def resources(**overrides):
    return apply_overrides(ExperimentConfig(), {f"resources.{k}": v for k, v in overrides.items()}).resources


@pytest.mark.parametrize("overrides, expected", [
    ({}, "in_process"),  # one CPU worker: the default and smoke presets
    ({"num_workers": 2}, "train"),
    ({"gpus_per_worker": 1}, "train"),
    ({"gpus_per_worker": 0.5}, "train"),
    ({"executor": "train"}, "train"),
    ({"executor": "in_process", "gpus_per_worker": 1}, "in_process"),
    ({"num_workers": 2, "executor": "train"}, "train"),
])
def test_auto_picks_in_process_for_one_cpu_worker_and_the_config_can_force_either(overrides, expected):
    res = resources(**overrides)
    res.validate()
    assert executor.choose(res) == expected
    flat = {k.split(".", 1)[1]: v for k, v in {f"r.{k}": getattr(res, k) for k in vars(res)}.items()}
    assert executor.choose(flat) == expected  # the flattened spec the trainable sees


def test_bad_executor_settings_name_the_key():
    with pytest.raises(ConfigError, match="resources.executor must be one of auto, in_process, train; got 'local'"):
        resources(executor="local").validate()
    with pytest.raises(ConfigError, match="executor=in_process .* one worker; got resources.num_workers=2"):
        resources(executor="in_process", num_workers=2).validate()


def spec(executor_name: str, cpus: float = 1.0, gpus: float = 0.0, max_failures: int = 2) -> dict:
    return {"executor": executor_name, "resources": {"cpus_per_worker": cpus, "gpus_per_worker": gpus,
                                                     "max_failures": max_failures}}


def test_in_process_trainable_holds_the_trial_cpus_and_the_train_path_only_memory():
    bundle = trainable_resources({"trial": spec("in_process", cpus=2)}).bundles
    assert bundle == [{"CPU": 2.0}]
    assert trainable_resources({"trial": spec("in_process", gpus=1)}).bundles == [{"CPU": 1.0, "GPU": 1.0}]
    train = trainable_resources({"trial": spec("train", cpus=4)}).bundles[0]
    assert train.get("CPU", 0) == 0 and train["memory"] > 0  # the workers hold the CPUs
    # A spec written before executors existed runs on the Train path, as it did.
    legacy = spec("train")
    legacy.pop("executor")
    assert trainable_resources({"trial": legacy}).bundles == [train]


def test_tune_retries_and_actor_reuse_follow_the_executors():
    assert tune_max_failures([spec("train", max_failures=5)]) == 1  # Ray Train restarts the group itself
    assert tune_max_failures([spec("in_process", max_failures=2)]) == 3
    assert tune_max_failures([spec("in_process", max_failures=0), spec("train")]) == 1
    assert reuse_trial_processes([spec("in_process"), spec("in_process")])
    assert not reuse_trial_processes([spec("in_process"), spec("train")]) and not reuse_trial_processes([])


def outcome(key: str, startup: float, train: float, eval_: float, checkpoint: float, wall: float,
            duration: float, ran_now: bool = True) -> TrialOutcome:
    other = wall - startup - train - eval_ - checkpoint
    metrics = {"time/startup_s": startup, "time/train_s": train, "time/eval_s": eval_,
               "time/checkpoint_s": checkpoint, "time/other_s": other, "time/wall_s": wall}
    return TrialOutcome(key=key, cell="softmax", seed=0, status="TERMINATED", metrics=metrics,
                        duration_s=duration, ran_now=ran_now)


def test_goodput_and_wall_over_ideal_count_step_time_only():
    trials = [outcome("a", startup=2, train=40, eval_=8, checkpoint=1, wall=55, duration=56),
              outcome("b", startup=1, train=30, eval_=6, checkpoint=1, wall=40, duration=41),
              outcome("c", startup=1, train=30, eval_=6, checkpoint=1, wall=40, duration=41),
              # finished before this run (a restored sweep): counts nowhere
              outcome("d", startup=9, train=99, eval_=9, checkpoint=9, wall=200, duration=200, ran_now=False)]
    sweep = SweepOutcome(trials=trials, wall_s=80.0, concurrency=2)
    assert sweep.time_sum("startup_s") == 4 and sweep.time_sum("wall_s") == 135
    assert sweep.step_s == 120  # 48 + 36 + 36
    assert sweep.goodput == pytest.approx(120 / 135)
    assert sweep.step_ideal_s == pytest.approx(60)  # 120 s of steps over 2 slots
    assert sweep.wall_over_ideal == pytest.approx(80 / 60)
    assert sweep.overhead_ratio == pytest.approx(80 / (138 / 2))  # the old ratio: whole trial times
    metrics = sweep.timing_metrics()
    assert metrics["sweep/goodput"] == pytest.approx(120 / 135)
    assert metrics["sweep/wall_over_ideal"] == pytest.approx(80 / 60)
    assert metrics["sweep/trials_sum_s"] == 135 and metrics["sweep/other_s"] == pytest.approx(135 - 4 - 100 - 20 - 3)
    lines = "\n".join(timing_lines(sweep, total_wall=100.0))
    assert "goodput 0.889" in lines and "wall / ideal 1.333" in lines and "1.667 (whole command)" in lines
    assert "start-up 4 s, train 100 s, eval 20 s, checkpoint 3 s, other 8 s" in lines
    assert "overhead ratio, start-up counted as trial time: 1.159" in lines


def test_trials_without_a_time_account_leave_goodput_out():
    old = TrialOutcome(key="a", cell="softmax", seed=0, status="TERMINATED", metrics={}, duration_s=10,
                       ran_now=True)
    sweep = SweepOutcome(trials=[old], wall_s=12.0, concurrency=2)
    assert "sweep/goodput" not in sweep.timing_metrics()
    lines = timing_lines(sweep, total_wall=15.0)
    assert len(lines) == 1 and "overhead ratio" in lines[0]


def _dead_drivers_trial(tmp_path, epochs=(2, 3)):
    """A rerun's view of an in-process trial whose driver died: Tune's checkpoint folders (one per
    epoch, the newest named by the trial's pointer) and the pointer in ``train/<key>/``."""
    import torch

    trial_dir, home = tmp_path / "ray" / "sw" / "k-s0", tmp_path / "ray" / "sw" / "train" / "k-s0"
    for i, epoch in enumerate(epochs):
        folder = trial_dir / f"checkpoint_{i:06d}"
        folder.mkdir(parents=True)
        torch.save({"model": {}, "optimizer": {}, "epoch": epoch}, folder / "state.pt")
    executor._write_pointer(home, str(trial_dir / f"checkpoint_{len(epochs) - 1:06d}"))
    return trial_dir, home


def test_a_rerun_in_process_trial_resumes_from_the_checkpoint_its_pointer_names_out_of_tunes_numbering(tmp_path):
    trial_dir, home = _dead_drivers_trial(tmp_path)
    read, where = executor.find_resume(home)
    resumed = home / executor.RESUMED
    assert where == str(resumed) and read()["epoch"] == 3  # the newest, not the first folder
    # Tune's new numbering (checkpoint_000000, ...) cannot overwrite it, and the dead driver's
    # other folders, which no Tuner would count against num_to_keep, are gone
    assert not list(trial_dir.glob("checkpoint_*"))
    # killed again before the resumed trial reported: the same checkpoint once more
    read, where = executor.find_resume(home)
    assert where == str(resumed) and read()["epoch"] == 3
    # a trial that never reported a checkpoint starts afresh
    assert executor.find_resume(tmp_path / "train" / "other") is None


def test_a_pointer_left_behind_by_a_kill_during_the_move_falls_back_to_the_moved_folder(tmp_path):
    trial_dir, home = _dead_drivers_trial(tmp_path, epochs=(4,))
    (trial_dir / "checkpoint_000000").rename(home / executor.RESUMED)  # moved, pointer not yet rewritten
    read, where = executor.find_resume(home)
    assert where == str(home / executor.RESUMED) and read()["epoch"] == 4


def test_a_planted_checkpoint_found_through_the_pointer_is_refused_without_running_code(tmp_path):
    import torch

    from sweeps.failures import CheckpointRefused, classify

    trial_dir, home = _dead_drivers_trial(tmp_path, epochs=(1,))
    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model": {}, "optimizer": {}, "epoch": 1, "x": RunsCode()}, trial_dir / "checkpoint_000000" / "state.pt")
    read, where = executor.find_resume(home)
    with pytest.raises(CheckpointRefused, match="could run code") as err:
        read()
    assert not marker.exists() and where in str(err.value)
    assert classify(err.value)[0] == "checkpoint"  # ends the trial with its cause, not retried
