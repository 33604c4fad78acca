"""``python -m reports.calibrate``: how stable are a sweep's verdicts when it has only 3 seeds?

For a sweep with at least 6 seeds run by every compared cell, every verdict of the report
(:func:`reports.tables.seed_verdicts`: seed-level test, Holm within each family) is recomputed on
subsets of k seeds (default 3, the default preset's count: every subset when there are at most
``--draws`` of them, else ``--draws`` random ones), and compared with the verdict on all seeds. It
prints, per comparison, how often the k-seed verdict agrees with the all-seed one, and what the
k-seed verdicts were. A verdict that flips between subsets is one a 3-seed sweep cannot be trusted
to reproduce.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reports.store import DEFAULT_EXPERIMENT, ReportError, default_tracking_uri

#: Fewer seeds than this per compared cell: no calibration (a 3-seed subset of 4 seeds says little).
MIN_SEEDS = 6


def calibrate(sweep, subset_size: int = 3, draws: int = 200, seed: int = 0) -> dict[str, Any]:
    """Verdict agreement between ``subset_size``-seed subsets and all seeds, per comparison.

    Args:
        sweep: A loaded :class:`reports.store.Sweep`.
        subset_size: Seeds per subset.
        draws: At most this many subsets (all of them when there are fewer).
        seed: Seed of the subset draws (the output is deterministic).

    Returns:
        ``{"seeds", "subsets", "subset_size", "comparisons": [{variant, reference, family, verdict,
        effect, p_holm, agreement, subset_verdicts}]}``.

    Raises:
        ReportError: fewer than :data:`MIN_SEEDS` seeds common to the compared cells.
    """
    from reports.tables import comparison_plan, compute, seed_accuracies, seed_verdicts

    tables = compute(sweep)
    rows = tables["cells"]
    reference = tables["reference"] or ""
    plan = comparison_plan(rows, reference)
    if not plan:
        raise ReportError(f"sweep '{sweep.sweep_id}' has no comparison to calibrate (no reference cell "
                          "with finished trials, or no other cell)")
    per_seed = seed_accuracies(sweep, rows)
    cells = sorted({c for p in plan for c in (p["variant"], p["reference"])})
    common = sorted(set.intersection(*(set(per_seed[c]) for c in cells)))
    if len(common) < max(MIN_SEEDS, subset_size + 1):
        counts = ", ".join(f"{c}: {len(per_seed[c])}" for c in cells)
        raise ReportError(f"sweep '{sweep.sweep_id}': calibration needs at least {MIN_SEEDS} seeds finished by "
                          f"every compared cell; {len(common)} are common ({counts})")
    full = seed_verdicts(rows, per_seed, plan)
    combos = list(itertools.combinations(common, subset_size))
    if len(combos) > draws:
        rng = np.random.default_rng(seed)
        combos = [combos[i] for i in sorted(rng.choice(len(combos), size=draws, replace=False))]
    verdicts: list[list[str]] = [[] for _ in plan]
    for subset in combos:
        sub = seed_verdicts(rows, seed_accuracies(sweep, rows, set(subset)), plan)
        for i, test in enumerate(sub):
            verdicts[i].append(test.verdict)
    out = []
    for p, test, seen in zip(plan, full, verdicts):
        counts = Counter(seen)
        out.append({
            "variant": p["variant"], "reference": p["reference"], "family": p["family"],
            "verdict": test.verdict, "effect": test.effect, "p_holm": test.p_holm, "mde": test.mde,
            "agreement": counts[test.verdict] / len(seen),
            "subset_verdicts": dict(sorted(counts.items())),
        })
    return {"sweep": sweep.sweep_id, "seeds": common, "subset_size": subset_size, "subsets": len(combos),
            "comparisons": out}


def format_text(result: dict[str, Any]) -> str:
    """The calibration as a Markdown table (what docs/reports.md quotes)."""
    lines = [f"Sweep `{result['sweep']}`: seeds {', '.join(map(str, result['seeds']))}; "
             f"{result['subsets']} subsets of {result['subset_size']} seeds.", "",
             f"| comparison | all-seed verdict | Δ (pp) | Holm p | MDE (pp) | agreement of {result['subset_size']}-seed "
             "verdicts | their verdicts |",
             "|---|---|---:|---:|---:|---:|---|"]
    for c in result["comparisons"]:
        effect = "n/a" if c["effect"] is None else f"{100 * c['effect']:+.2f}"
        p = "n/a" if c["p_holm"] is None else f"{c['p_holm']:.3f}"
        mde = "n/a" if c["mde"] is None else f"{100 * c['mde']:.2f}"
        seen = ", ".join(f"{v}: {n}" for v, n in c["subset_verdicts"].items())
        lines.append(f"| {c['variant']} vs {c['reference']} | {c['verdict']} | {effect} | {p} | {mde} | "
                     f"{100 * c['agreement']:.0f}% | {seen} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reports.calibrate",
        description=("Recompute every verdict of a sweep (at least 6 seeds) on random k-seed subsets and print "
                     "how often each agrees with the verdict on all seeds."),
    )
    parser.add_argument("--sweep", required=True, help="the sweep's name (its parent run's sweep.id tag)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help=f"MLflow experiment (default: {DEFAULT_EXPERIMENT})")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///<$ABLATION_RUNS_DIR or ~/ablation-runs>/mlflow.db)")
    parser.add_argument("--subset-size", type=int, default=3, help="seeds per subset (default: %(default)s)")
    parser.add_argument("--draws", type=int, default=200,
                        help="at most this many subsets; all of them when fewer (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset draws (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    if args.subset_size < 2:
        parser.error(f"--subset-size must be at least 2 (a verdict needs two seeds), got {args.subset_size}")
    if args.draws < 1:
        parser.error(f"--draws must be at least 1, got {args.draws}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    try:
        from reports.store import connect, load_sweep

        sweep = load_sweep(connect(uri), uri, args.sweep, args.experiment)
        result = calibrate(sweep, args.subset_size, args.draws, args.seed)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_text(result), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
