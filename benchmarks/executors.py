"""Sweep-efficiency benchmark: the same trials through each executor, side by side, in one run.

    python -m benchmarks.executors                                  # 6 tiny trials (smoke model, 1 epoch), both paths
    python -m benchmarks.executors --preset default --trials 4 train.epochs=2   # the default preset's trial size
    python -m benchmarks.executors --paths in_process --trials 2    # one path only

Starts a local Ray instance with ``--cpus`` CPUs (default 2) and an MLflow store in a temporary
runs dir, then runs ``--trials`` trials (seeds 0..N-1 of ``--cell``) as a sweep once per path
(``resources.executor=in_process`` / ``train``), through the sweep driver itself
(:func:`sweeps.tune.run`), and prints for each path the trials' start-up (``time/startup_s``:
the trainable's first line to the first training step; median and max), the time account summed
over the trials, goodput (train + eval step time over the trials' summed wall times), wall / ideal
(the trials phase's wall time over the summed step time divided by the slots) and the sweep's older
overhead ratio; last the ratios between the paths. The paths run one after the other on the same
machine, so compare their ratios, not absolute seconds, and run it on a quiet machine when you can.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PATHS = ("in_process", "train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.executors",
        description="Run the same N trials through the in-process and the Ray Train executors on a local "
                    "Ray instance; print start-up, goodput and wall / ideal for each, and their ratios.",
        epilog="Overrides (key=value) apply to every trial of both paths, after the preset, e.g. "
               "train.epochs=2 data.train_limit=2000.",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every trial")
    parser.add_argument("--trials", type=int, default=6, help="trials per path (seeds 0..N-1; default %(default)s)")
    parser.add_argument("--preset", default="smoke", help="preset of the trials (default: %(default)s)")
    parser.add_argument("--cell", default="softmax", help="grid cell of the trials (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial (default: %(default)s)")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="executors to compare, in the order they run (default: %(default)s)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default: %(default)s)")
    parser.add_argument("--max-concurrent", type=int, default=0,
                        help="trials at once (default: as many as the CPUs fit)")
    parser.add_argument("--runs-dir", default="", help="where runs, checkpoints and MLflow go (default: a temp dir)")
    parser.add_argument("--cache-dir", default="",
                        help="prepared-data cache (default: $ABLATION_RUNS_DIR/cache or ~/ablation-runs/cache)")
    parser.add_argument("--verbose", action="store_true", help="stream the trials' logs")
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        parser.error(f"--paths: choose from {', '.join(PATHS)}; got {args.paths!r}")
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    args.paths = paths
    return args


def summary(outcome) -> dict[str, float]:
    """The numbers the benchmark compares, from one path's :class:`sweeps.tune.SweepOutcome`."""
    ran = [t for t in outcome.trials if t.ran_now]
    startups = [t.time("startup_s") for t in ran] or [float("nan")]
    return {
        "trials": float(len(ran)),
        "startup_median_s": statistics.median(startups),
        "startup_max_s": max(startups),
        "goodput": outcome.goodput,
        "wall_over_ideal": outcome.wall_over_ideal,
        "overhead_ratio": outcome.overhead_ratio,
        "phase_wall_s": outcome.wall_s,
        **{part: outcome.time_sum(part) for part in ("startup_s", "train_s", "eval_s", "checkpoint_s", "other_s",
                                                     "wall_s")},
    }


ROWS = (
    ("trials finished", "trials", "{:.0f}"),
    ("start-up median (s)", "startup_median_s", "{:.2f}"),
    ("start-up max (s)", "startup_max_s", "{:.2f}"),
    ("goodput", "goodput", "{:.3f}"),
    ("wall / ideal (step time)", "wall_over_ideal", "{:.3f}"),
    ("overhead ratio (old)", "overhead_ratio", "{:.3f}"),
    ("trials phase wall (s)", "phase_wall_s", "{:.1f}"),
    ("sum trial wall (s)", "wall_s", "{:.1f}"),
    ("sum start-up (s)", "startup_s", "{:.1f}"),
    ("sum train (s)", "train_s", "{:.1f}"),
    ("sum eval (s)", "eval_s", "{:.1f}"),
    ("sum checkpoint (s)", "checkpoint_s", "{:.1f}"),
    ("sum other (s)", "other_s", "{:.1f}"),
)


def table(results: dict[str, dict[str, float]]) -> str:
    """One column per path, and ``in_process / train`` when both ran."""
    paths = list(results)
    both = "in_process" in results and "train" in results
    head = f"{'':<26}" + "".join(f"{p:>12}" for p in paths) + (f"{'in_proc/train':>15}" if both else "")
    lines = [head]
    for label, key, fmt in ROWS:
        row = f"{label:<26}" + "".join(f"{fmt.format(results[p][key]):>12}" for p in paths)
        if both:
            a, b = results["in_process"][key], results["train"][key]
            row += f"{(a / b if b else float('nan')):>15.3f}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sweeps import tracking
    from sweeps.ablation import ROOT, build_plan, prepare_data
    from sweeps.config import ConfigError
    from sweeps.tune import SweepPaths, run

    own_tmp = None
    if args.runs_dir:
        runs_dir = Path(args.runs_dir).expanduser().resolve()
    else:
        own_tmp = tempfile.TemporaryDirectory(prefix="sweeps-bench-")
        runs_dir = Path(own_tmp.name)
    cache = Path(args.cache_dir or Path(os.environ.get("ABLATION_RUNS_DIR", "~/ablation-runs")) / "cache").expanduser()
    overrides = [f"data.cache_dir={cache}", f"train.epochs={args.epochs}", *args.overrides]
    plans = {}
    try:
        for path in args.paths:
            ns = argparse.Namespace(preset=args.preset, grid=None, cells=args.cell,
                                    seeds=",".join(str(s) for s in range(args.trials)),
                                    overrides=[*overrides, f"resources.executor={path}"])
            plans[path] = prepare_data(build_plan(ns), runs_dir)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import ray

    uri = tracking.default_tracking_uri(runs_dir) if not os.environ.get("MLFLOW_TRACKING_URI") else \
        os.environ["MLFLOW_TRACKING_URI"]
    tracking.check_tracking(uri)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=args.verbose,
             runtime_env={"working_dir": str(ROOT),
                          "excludes": ["runs/", ".venv/", ".git/", "*.pt", "*.db", "docs/"]})
    results: dict[str, dict[str, float]] = {}
    try:
        first = plans[args.paths[0]].trials[0].config
        print(f"benchmark: {args.trials} trial(s) of {args.cell} ({args.preset} preset, hidden "
              f"{first.model.hidden_size}, {first.model.l_layers}-{first.model.x_layers}-{first.model.r_layers} "
              f"layers, {first.train.epochs} epoch(s) of {first.data.train_limit or 'all'} questions) per path, "
              f"local Ray with {args.cpus} CPU; runs dir {runs_dir}", flush=True)
        for path in args.paths:
            name = f"bench-{path}"
            sweeper = tracking.SweepTracker(uri, "sweeps-bench", name, runs_dir)
            parent = sweeper.start({"sweep.status": "running"}, {"path": path, "n_trials": args.trials})
            context = {"tracking_uri": uri, "experiment_id": sweeper.experiment_id, "parent_run_id": parent,
                       "sweep_id": name, "tags": {"bench.path": path}}
            print(f"\n== {path} ==", flush=True)
            t0 = time.time()
            outcome = run(plans[path], SweepPaths(runs_dir, name), context, max_concurrent=args.max_concurrent,
                          restore=False)
            print(f"{path}: {len(outcome.trials) - len(outcome.failed)}/{len(outcome.trials)} trials in "
                  f"{time.time() - t0:.1f} s", flush=True)
            sweeper.finish("FINISHED" if not outcome.failed else "FAILED", outcome.timing_metrics(),
                           {"sweep.status": "complete" if not outcome.failed else "incomplete"})
            if outcome.failed:
                for t in outcome.failed:
                    print(f"  FAILED {t.key}: {t.error}", file=sys.stderr)
                return 1
            results[path] = summary(outcome)
    finally:
        ray.shutdown()
        if own_tmp is not None:
            own_tmp.cleanup()
    print("\n" + table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
