"""The sweep-efficiency benchmark's command line and its side-by-side table (fast; the benchmark
itself starts Ray and runs trials: `python -m benchmarks.executors`)."""

from __future__ import annotations

import pytest

from benchmarks import executors as bench
from sweeps.tune import SweepOutcome, TrialOutcome


def test_bad_arguments_are_refused_naming_them(capsys):
    for argv, message in ((["--paths", "in_process,local"], "--paths: choose from in_process, train"),
                          (["--trials", "0"], "--trials must be >= 1")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err
    assert bench.parse_args(["--paths", "train"]).paths == ["train"]


def _outcome(startups: list[float], step: float, wall: float, phase_wall: float) -> SweepOutcome:
    trials = [TrialOutcome(key=f"softmax-s{i}", cell="softmax", seed=i, status="TERMINATED",
                           metrics={"time/startup_s": s, "time/train_s": step, "time/eval_s": 0.0,
                                    "time/checkpoint_s": 0.0, "time/other_s": wall - s - step, "time/wall_s": wall},
                           duration_s=wall, ran_now=True) for i, s in enumerate(startups)]
    return SweepOutcome(trials=trials, wall_s=phase_wall, concurrency=2)


def test_summary_and_table_compare_the_paths():
    fast = bench.summary(_outcome([0.5, 4.0, 0.3, 0.4], step=10.0, wall=11.0, phase_wall=24.0))
    slow = bench.summary(_outcome([30.0, 32.0, 31.0, 35.0], step=10.0, wall=42.0, phase_wall=90.0))
    assert fast["startup_median_s"] == pytest.approx(0.45) and fast["startup_max_s"] == 4.0
    assert fast["goodput"] == pytest.approx(40 / 44) and fast["wall_over_ideal"] == pytest.approx(24 / 20)
    text = bench.table({"in_process": fast, "train": slow})
    rows = {line[:26].strip(): line[26:].split() for line in text.splitlines()[1:]}
    assert rows["start-up median (s)"] == ["0.45", "31.50", "0.014"]
    assert rows["wall / ideal (step time)"] == ["1.200", "4.500", "0.267"]
    assert "in_proc/train" not in bench.table({"in_process": fast})
