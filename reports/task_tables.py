"""The report of a sweep on another task than VQA (GQA, NLVR2): its metric's words and its own table.

The paper grid applies to any task (``data.name=gqa`` / ``nlvr2``), and the report's tables 1-3 are
built the same way from each trial's ``best/acc``; this module makes them say what that number is
and adds the task's table:

* :func:`task_of` reads the task from the usable trials' ``data.name`` param (one task per sweep);
* :func:`strip_vqa_paper` drops the grid's VQA v2 paper numbers from the cells before the tables are
  computed (they are VQA accuracies; beside a GQA or NLVR2 accuracy they would mislead), so no
  column, difference or "seeds for paper Δ" uses them;
* :func:`add` puts ``tables["task"]`` (JSON-ready): per cell, accuracy over seeds, NLVR2's
  consistency over seeds, and both compared with the reference cell by the report's seed-level
  test (:func:`reports.tables.comparison_plan` / :func:`reports.tables.seed_verdicts`: paired
  t-test over seeds, Holm within each family), beside LXMERT's published number for the task
  (labelled as such: the base model pretrained on LXMERT's corpus, not a cell of this grid);
* :func:`table` renders it (:mod:`reports.render` calls it).

Reads MLflow's values only (through :class:`reports.store.Sweep`); imports neither sweeps nor tasks.
"""

from __future__ import annotations

from typing import Any

import schema
from reports.store import Sweep

#: What each task's ``best/acc`` is and LXMERT's published number for it (Tan & Bansal 2019, Table 2;
#: the README of github.com/airsplay/lxmert for the local GQA evaluation).
TASKS: dict[str, dict[str, Any]] = {
    "gqa": {
        "name": "GQA",
        "metric": schema.EVAL_METRIC_GQA,
        "acc_label": "GQA acc.",
        "phrase": "GQA accuracy",
        "definition": (
            "GQA accuracy (LXMERT's GQAEvaluator): each labelled question scores the label score of the "
            "predicted answer (GQA's labels are one answer of score 1, so this is exact match), averaged over "
            "the labelled questions of the evaluation split (`eval/n_labelled`)."
        ),
        "lxmert": "LXMERT (base, pretrained): 59.80 on test-dev with this evaluator (60.00 on GQA's server)",
        "extra": {},
    },
    "nlvr2": {
        "name": "NLVR2",
        "metric": schema.EVAL_METRIC_NLVR2,
        "acc_label": "NLVR2 acc.",
        "phrase": "NLVR2 accuracy",
        "definition": (
            "NLVR2 accuracy (LXMERT's NLVR2Evaluator): the share of statements whose True / False is "
            "predicted right, over the labelled statements of the evaluation split. Consistency (NLVR2's "
            "official metrics.py): the share of sentences all of whose image pairs are predicted right, a "
            "sentence being the identifier with its pair id blanked; both at each trial's best epoch (by "
            "accuracy)."
        ),
        "lxmert": "LXMERT (base, pretrained): 74.95 accuracy on valid (NLVR2's dev)",
        "extra": {"consistency": schema.EVAL_CONSISTENCY},
    },
}


def task_of(sweep: Sweep) -> str | None:
    """The task of the sweep's usable trials when it is one of :data:`TASKS` (else None: VQA,
    easy-VQA, or trials of several tasks, which :func:`add` notes)."""
    names = {t.params.get("data.name", "") for t in sweep.trials if t.usable}
    return names.pop() if len(names) == 1 and next(iter(names)) in TASKS else None


def strip_vqa_paper(sweep: Sweep) -> str | None:
    """For a sweep on a task of :data:`TASKS`, clear its cells' paper numbers (VQA v2 accuracies) in
    place; returns the task (None: nothing changed)."""
    task = task_of(sweep)
    if task is not None:
        for cell in sweep.cells.values():
            cell.paper = {}
    return task


def _at_best(trial, metric: str) -> float | None:
    """``metric``'s value at the trial's best epoch (``best/epoch``), from its history."""
    best = int(round(trial.metrics.get(schema.BEST_EPOCH, 0)))
    return trial.history.get(metric, {}).get(best)


def add(tables: dict[str, Any], sweep: Sweep, task: str | None) -> None:
    """Put the task's numbers in ``tables["task"]`` (None for VQA sweeps) and make the accuracy
    definition name the task's metric."""
    from reports.stats import summarize
    from reports.tables import DEFINITIONS, comparison_plan, seed_verdicts

    names = {t.params.get("data.name", "") for t in sweep.trials if t.usable} - {""}
    if task is None:
        tables["task"] = None
        if len(names & set(TASKS)) and len(names) > 1:
            tables["notes"].append(f"Trials of several tasks ({', '.join(sorted(names))}) are averaged together: "
                                   "their accuracies measure different things.")
        return
    spec = TASKS[task]
    rows = tables["cells"]
    reference = tables["reference"]
    out_rows = []
    extra_tests: dict[str, dict[str, Any]] = {}
    for metric, key in spec["extra"].items():
        per_seed = {name: {t.seed: v for t in sweep.usable(name) if t.seed is not None
                           and (v := _at_best(t, key)) is not None} for name in rows}
        plan = [p for p in comparison_plan(rows, reference) if p["slot"] == "vs_reference"] if reference else []
        plan = [p for p in plan if per_seed[p["variant"]] and per_seed[p["reference"]]]
        for p in plan:
            p["family"] = f"{metric} vs {reference}"
        tests = seed_verdicts(rows, per_seed, plan)
        extra_tests[metric] = {p["variant"]: {"seed_test": t.as_dict(), "caveats": []} for p, t in zip(plan, tests)}
        for name in rows:
            rows[name].setdefault("task_extra", {})[metric] = summarize(list(per_seed[name].values())).as_dict()
    for name, row in rows.items():
        out_rows.append({
            "cell": name,
            "label": row["label"],
            "n": row["n"],
            "n_planned": row["n_planned"],
            "status": row["status"],
            "acc": row["acc"],
            "vs_reference": row["vs_reference"],
            "extra": {m: {"summary": row.get("task_extra", {}).get(m),
                          "vs_reference": extra_tests.get(m, {}).get(name)} for m in spec["extra"]},
        })  # fmt: skip
        row.pop("task_extra", None)
    tables["task"] = {"task": task, "name": spec["name"], "acc_label": spec["acc_label"], "phrase": spec["phrase"],
                      "lxmert": spec["lxmert"], "extra": list(spec["extra"]), "rows": out_rows}  # fmt: skip
    tables.setdefault("definitions", dict(DEFINITIONS))["accuracy"] = spec["definition"] + " " + DEFINITIONS["accuracy"]
    tables["metric"] = spec["metric"]


def table(tables: dict[str, Any]):
    """The task's table (a :class:`reports.render.Table`): one row per cell that ran."""
    from reports import render

    t = tables["task"]
    ref = render._label(tables, tables["reference"])
    header = ["Variant", "Seeds", f"{t['acc_label']} (best epoch) mean ± std", "95% CI over seeds",
              f"Δ vs {ref} over seeds (pp) [95% CI]", "Verdict (seeds as the unit)"]
    for m in t["extra"]:
        header += [f"{m.capitalize()} mean ± std", f"{m.capitalize()} Δ vs {ref} (pp) [95% CI]",
                   f"{m.capitalize()} verdict"]
    rows = []
    for r in t["rows"]:
        if r["status"] == "not run":
            continue
        line = [r["label"], render.seeds_cell(r), render.mean_std(r["acc"]), render.interval(r["acc"]),
                render.delta(r["vs_reference"]), render.verdict(r["vs_reference"], ref)]
        for m in t["extra"]:
            e = r["extra"][m]
            line += [render.mean_std(e["summary"]) if e["summary"] else render.DASH, render.delta(e["vs_reference"]),
                     render.verdict(e["vs_reference"], ref)]
        rows.append(line)
    notes = [f"Reference, not a cell of this sweep: {t['lxmert']} (Tan & Bansal 2019). The grid's VQA v2 paper "
             "numbers do not apply to this task and are not shown."]
    if t["extra"]:
        notes.append("Each metric's comparisons are one Holm family (all cells vs the reference).")
    return render._table("task", f"{t['name']}: {t['phrase']} on the evaluation split (percent)", header, rows,
                         ["l", "r"] + ["r"] * (len(header) - 2), notes)
