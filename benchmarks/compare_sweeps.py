"""Compare two sweeps' logged metrics, trial by trial, step by step (timings left out).

Used to show that a change of the training code leaves what a sweep computes unchanged: run the
same grid, seeds and config before and after the change into two stores, then::

    python -m benchmarks.compare_sweeps sqlite:///before/mlflow.db sqlite:///after/mlflow.db

Trials are matched by their ``trial.key`` tag (the latest sweep in each store unless ``--sweep-a`` /
``--sweep-b`` name one). Every metric's whole history (every step) is compared exactly; metrics
that measure time or speed (``time/*``, ``*_s``, ``*samples_per_s``, ``*weighting_frac``) are
skipped, as are those listed with ``--ignore``. Metrics present on one side only are listed
separately. Exit status 0 when every compared value is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys

TIMING = re.compile(r"(^time/|_s$|samples_per_s$|weighting_frac$|^sweep/)")


def _trial_runs(uri: str, sweep: str | None) -> tuple[str, dict]:
    from mlflow import MlflowClient

    import schema

    client = MlflowClient(uri)
    experiments = client.search_experiments()
    runs = [r for e in experiments for r in client.search_runs([e.experiment_id], max_results=5000)]
    parents = [r for r in runs if r.data.tags.get(schema.SWEEP_ROLE) == schema.ROLE_PARENT]
    if sweep is None:
        if not parents:
            raise SystemExit(f"{uri}: no sweep (no run tagged {schema.SWEEP_ROLE}={schema.ROLE_PARENT})")
        sweep = max(parents, key=lambda r: r.info.start_time).data.tags[schema.SWEEP_ID]
    trials = {r.data.tags[schema.TRIAL_KEY]: r for r in runs
              if r.data.tags.get(schema.SWEEP_ID) == sweep and schema.TRIAL_KEY in r.data.tags
              and r.data.tags.get(schema.SWEEP_ROLE) == schema.ROLE_TRIAL}  # fmt: skip
    if not trials:
        raise SystemExit(f"{uri}: sweep {sweep!r} has no trial runs")
    return sweep, {key: (client, run) for key, run in trials.items()}


def _history(client, run, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_sweeps", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("a", help="MLflow tracking URI of the first sweep (e.g. sqlite:///runs/mlflow.db)")
    parser.add_argument("b", help="MLflow tracking URI of the second sweep")
    parser.add_argument("--sweep-a", default=None, help="sweep.id in the first store (default: its latest)")
    parser.add_argument("--sweep-b", default=None, help="sweep.id in the second store (default: its latest)")
    parser.add_argument("--ignore", default="", help="comma-separated regular expressions of metrics to skip")
    args = parser.parse_args(argv)
    ignore = [re.compile(p) for p in args.ignore.split(",") if p.strip()]

    sweep_a, runs_a = _trial_runs(args.a, args.sweep_a)
    sweep_b, runs_b = _trial_runs(args.b, args.sweep_b)
    print(f"A: {args.a} sweep {sweep_a} ({len(runs_a)} trials)\nB: {args.b} sweep {sweep_b} ({len(runs_b)} trials)")
    differ = False
    for key in sorted(set(runs_a) | set(runs_b)):
        if key not in runs_a or key not in runs_b:
            print(f"{key}: only in {'A' if key in runs_a else 'B'}")
            differ = True
            continue
        (ca, ra), (cb, rb) = runs_a[key], runs_b[key]
        names_a, names_b = set(ra.data.metrics), set(rb.data.metrics)
        skipped = {n for n in names_a | names_b if TIMING.search(n) or any(p.search(n) for p in ignore)}
        compared = sorted((names_a & names_b) - skipped)
        values, mismatches = 0, []
        for name in compared:
            ha, hb = _history(ca, ra, name), _history(cb, rb, name)
            values += len(ha)
            if ha != hb:
                mismatches.append(f"    {name}: A {ha[:4]} B {hb[:4]}")
        only_a, only_b = sorted(names_a - names_b - skipped), sorted(names_b - names_a - skipped)
        verdict = "identical" if not mismatches else f"{len(mismatches)} metric(s) DIFFER"
        print(f"{key}: {len(compared)} metrics, {values} logged values compared, {verdict}; "
              f"{len(skipped)} timing metrics skipped")  # fmt: skip
        if mismatches:
            print("\n".join(mismatches))
        if only_a:
            print(f"    only in A: {', '.join(only_a)}")
        if only_b:
            print(f"    only in B: {', '.join(only_b)}")
        differ = differ or bool(mismatches)
    print("RESULT:", "every compared metric identical" if not differ else "differences found")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
