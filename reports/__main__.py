"""``python -m reports``: build a sweep's report, or list the sweeps of an experiment."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from reports.store import DEFAULT_EXPERIMENT, ReportError, default_tracking_uri


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reports",
        description=(
            "Rebuild the paper's VQA tables and figures of a sweep from MLflow: report.html "
            "(self-contained), report.md, tables.tex, tables.json and figures/*.png, logged back "
            "to the sweep's parent run under report/. Without --sweep, list the sweeps of the "
            "experiment (newest first); add --latest to build the newest one."
        ),
    )
    parser.add_argument("--sweep", help="the sweep's name (its parent run's sweep.id tag)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help=f"MLflow experiment (default: {DEFAULT_EXPERIMENT})")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///<$ABLATION_RUNS_DIR or ~/ablation-runs>/mlflow.db)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <folder of mlflow.db>/reports/<sweep> for SQLite "
                             "stores, else ./reports/<sweep>)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    parser.add_argument("--latest", action="store_true",
                        help="without --sweep: build the most recently started sweep of the experiment")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    try:
        sweep = args.sweep
        if sweep is None:
            from reports.store import connect, list_sweeps

            sweeps = list_sweeps(connect(uri), uri, args.experiment)
            if not args.latest:
                print(f"sweeps in experiment '{args.experiment}' of {uri} (newest first):")
                for s in sweeps:
                    started = time.strftime("%Y-%m-%d %H:%M", time.localtime((s["start_time"] or 0) / 1000))
                    print(f"  {s['sweep']:<32} {s['status']:<11} {s['n_trials']:>4} trials  started {started}")
                if not sweeps:
                    print("  (none)")
                print("build one with: python -m reports --sweep NAME (or --latest)")
                return 0
            if not sweeps:
                raise ReportError(f"no sweep in experiment '{args.experiment}' of {uri}")
            sweep = sweeps[0]["sweep"]
            print(f"building the latest sweep: {sweep}")
        from reports.build import build

        path = build(uri, sweep, experiment=args.experiment, out_dir=args.out, log_to_mlflow=not args.no_log)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
