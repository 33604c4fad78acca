"""The numbers of a report, computed from a :class:`~reports.store.Sweep`.

The result is a plain, JSON-ready dict (written as ``tables.json``); every rendered table
(Markdown, HTML, LaTeX) is formatted from it, so the three always agree. Accuracies are kept as
fractions in [0, 1], exactly as MLflow holds them; renderers show percent.

Definitions (also stated in every report, see :data:`DEFINITIONS`):

* a cell's accuracy over seeds is built from each usable trial's ``best/acc`` (evaluation accuracy
  at the best epoch, ``best/epoch``); the last epoch's ``eval/acc`` is kept beside it; whether
  that is the official VQA accuracy or LXMERT's soft score comes from the trials' ``eval.metric``
  tag (:func:`eval_metric`), and the report's labels follow it;
* mean, sample standard deviation (ddof=1; none for one seed) and 95% t-interval over seeds;
* difference from the reference cell (softmax; equal task weights in Table 3): seeds are the
  unit of replication (:mod:`reports.inference`: paired t-test over seeds, Holm's correction per
  family, probability of improvement, minimum detectable effect); the question-level bootstrap of
  :func:`question_bootstrap` is kept as a secondary column (same training runs, question
  resampling only);
* cells whose mechanism never engaged (trial tag ``mechanism.engaged=false``) and cells still
  learning at their last epoch are flagged, and their comparisons say so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

import schema
from reports import inference
from reports.stats import N_RESAMPLES, paired_bootstrap, rng_for, summarize
from reports.store import Sweep, Trial

#: The cell every other cell is compared with.
REFERENCE_CELL = "softmax"
#: A trial whose evaluation accuracy rose by more than this many percentage points over its last
#: epoch is still learning (its cell is compared on the steep part of its learning curve).
STILL_LEARNING_PP = 1.0
#: Pretraining objectives in LXMERT's order (Table 3's columns; others follow alphabetically).
PRETRAIN_TASKS = ("mlm", "mor", "match", "qa")
PRETRAIN_TASK_LABELS = {"mlm": "MLM", "mor": "Masked obj.", "match": "Matching", "qa": "Image QA"}
#: Answer types in the order the paper lists them; others follow alphabetically.
TYPE_ORDER = ("yes_no", "number", "other")
TYPE_LABELS = {"yes_no": "yes/no", "number": "number", "other": "other"}

#: How the report shows a learned per-head statistic of ``stats/attention_heads.csv`` (its ``stat``
#: column). Display only: which statistics exist is read from the data, so a normaliser that logs a
#: new statistic gets its rows and its figure with no edit here (defaults: its own name, 3 digits,
#: a per-layer figure numbered after the paper's four). ``figure``: the paper's figure number;
#: ``per_head``: draw every head of one seed instead of per-layer means over seeds.
STAT_DISPLAY: dict[str, dict[str, Any]] = {
    "span": {"label": "span (tokens)", "digits": 1, "figure": 1, "per_head": False, "what": "adaptive span"},
    "alpha": {"label": "alpha", "digits": 3, "figure": 3, "per_head": True, "what": "entmax alpha",
              "axis": "alpha (1 softmax, 2 sparsemax)", "ylim": (0.95, 2.05), "hline": 1.5,
              "note": "The paper reports text heads preferring sparse attention (alpha toward 2) and vision / "
                      "cross-modal heads dense (alpha below 1.5)."},
    # SpotTune's per-decision usage rides in the same per-head CSV but is no attention statistic: its
    # own section (reports/finetuning.py: table and heatmap) shows it.
    "usage": {"attention": False},
    "eval_usage": {"attention": False},
}
#: Stacks of the model in display order (others follow alphabetically).
STACK_ORDER = ("lang", "visn", "cross")
#: The per-trial time account (``time/<name>`` metrics, docs/tracking.md), in display order.
TIME_ACCOUNTS = tuple(name.removeprefix(schema.TIME_NS) for name in schema.TIME_ACCOUNT)


def stat_display(stat: str) -> dict[str, Any]:
    """Display settings of a statistic (:data:`STAT_DISPLAY`, else defaults from its name)."""
    base = {"label": stat, "digits": 3, "figure": None, "per_head": False, "what": stat}
    return {**base, **STAT_DISPLAY.get(stat, {})}


def stat_order(stats: set[str] | list[str]) -> list[str]:
    """The attention statistics among ``stats`` in display order: the known ones by figure number, then
    the rest alphabetically (statistics marked ``"attention": False`` are left to their own section)."""
    stats = {s for s in stats if STAT_DISPLAY.get(s, {}).get("attention", True)}
    known = sorted((s for s in stats if s in STAT_DISPLAY), key=lambda s: STAT_DISPLAY[s]["figure"])
    return known + sorted(stats - set(STAT_DISPLAY))


#: The child-run tag that says what a trial's `eval/acc` (and `best/acc`) measures. Runs that lack
#: it were logged before it existed, when `eval/acc` was always LXMERT's soft score.
METRIC_TAG = schema.EVAL_METRIC_TAG
OFFICIAL, SOFT, MIXED = "vqa_official", "soft_score", "mixed"
#: What the accuracy columns are, by the sweep's metric (`eval_metric`).
METRIC_DEFINITIONS = {
    OFFICIAL: (
        "VQA accuracy: the official VQA metric (the current rules of the VQA authors' evaluation "
        "code) of the top answer against each question's human answers, averaged over questions."
    ),
    SOFT: (
        "Soft score, not the official VQA accuracy: the evaluation questions had only LXMERT's soft "
        "labels (no official annotation file), so each question scores the soft target of the top "
        "answer (0, 0.3, 0.6, 0.9 or 1), averaged over questions."
    ),
    MIXED: (
        "Mixed metrics: some trials report the official VQA accuracy and some LXMERT's soft score "
        "(their `eval.metric` tags differ), so the numbers are not comparable across those trials."
    ),
}

DEFINITIONS = {
    "accuracy": (
        "Evaluation-split accuracy at each trial's best epoch: MLflow's `best/acc`, logged with `best/epoch`. The "
        "paper reports one end-of-training number; `best/acc` is the closest equivalent that does "
        "not depend on when training stopped. The last epoch's `eval/acc` is shown beside it where "
        "it differs."
    ),
    "answer_types": "Per answer type: `eval/acc_<type>` at the trial's best epoch.",
    "over_seeds": (
        "Mean over seeds, sample standard deviation (ddof=1; 'n/a' with one seed) and the two-sided "
        "95% Student-t interval mean +- t(0.975, n-1) * std / sqrt(n). Only FINISHED trials listed in "
        "the sweep's plan are averaged; every other trial is listed under 'Incomplete'."
    ),
    "seed_test": (
        "Seeds are the unit of replication: data order, initialisation and dropout change with the seed, "
        "and at small budgets their effect dwarfs most differences between variants. Δ is the mean over seeds "
        "of (cell - reference) accuracy at each trial's best epoch; when both cells ran the same seeds they "
        "are paired (the same seed means the same data order) and tested with a paired t-test over the "
        "per-seed differences, its 95% t-interval given; otherwise Welch's t-test over the two sets of seeds. "
        f"p-values are Holm-adjusted within each family of comparisons (all cells vs the same reference). "
        f"Verdict: 'better' / 'worse' when the Holm-adjusted p is below {inference.ALPHA}, else 'no "
        "detectable difference'. P(improve) is the probability that a seed of the cell beats a seed of the "
        "reference (Mann-Whitney U / pairs; Agarwal et al. 2021). MDE is the smallest difference this many "
        f"seeds detect with {inference.POWER:.0%} power at the observed seed-to-seed standard deviation of "
        "the differences; 'seeds for paper Δ' is how many seeds per cell the paper's own claimed difference "
        "would need at that standard deviation."
    ),
    "bootstrap": (
        f"Same training runs, question resampling only (secondary): for every seed run by both the variant "
        f"and the reference, "
        f"per-question score differences from `eval/predictions.csv` (best epoch) are averaged over "
        f"those seeds; the {N_RESAMPLES} resamples draw questions with replacement from a generator "
        f"seeded by the two cell names (deterministic). Reported: the observed mean difference, the "
        f"percentile 95% interval, and the two-sided p-value 2 * min(P(b <= 0), P(b >= 0)) "
        f"(with +1 smoothing). It ignores seed-to-seed variance, the larger source of variation in a "
        f"training ablation, so it never decides a verdict."
    ),
    "degenerate": (
        "A cell is flagged when its mechanism never engaged in a trial (MLflow tag `mechanism.engaged=false`, "
        "with the measured evidence in `mechanism.evidence`): a span that never fell below the longest "
        "distance it could mask computes softmax exactly; a learned alpha that never moved is fixed-alpha "
        "entmax; LayerDrop that dropped no layer is the plain model. Its comparisons then compare a model "
        "with (nearly) itself."
    ),
    "learning": (
        "A trial is still learning when its evaluation accuracy rose by more than "
        f"{STILL_LEARNING_PP:g} pp over its last epoch; comparisons of cells whose trials were still learning compare points "
        "on the steep part of their learning curves, and are marked so."
    ),
    "prior": (
        "A trial is flagged when, at its best epoch, some question types are answered no better than the "
        "blind prior: the answer a model reading only the question would give (the most frequent training "
        "answer of the same question text, else of its question type), scored like the model. A type counts "
        "when the model's accuracy on it is at most 1 pp above the prior's (types with fewer than 20 "
        "evaluation questions, or whose prior already scores 99%, are skipped): MLflow metric "
        "`eval/at_prior_share` (share of evaluation questions in such types) and tag `eval.at_prior` (the "
        "types, with both accuracies). Such a model has not learned those questions; a comparison of two "
        "such cells compares what they learned elsewhere."
    ),
    "throughput": "Training samples/s: per trial, the mean over epochs of `train/samples_per_s`; then over seeds.",
    "wall_time": (
        "Train + eval time per trial: `time/trial_s`, the time the trial spent training and "
        "evaluating (without Ray start-up or checkpoint restores); mean over seeds."
    ),
    "time_account": (
        "Start-up / train / eval per trial: `time/startup_s` (from the trial's first line to its first "
        "training step, summed over attempts), `time/train_s` (training epochs) and `time/eval_s` "
        "(evaluation), mean over seeds; shown for sweeps whose trials log them."
    ),
    "units": "Accuracies in tables.json are fractions in [0, 1]; rendered tables show percent.",
    "pretraining": (
        "Table 3 (cells that pretrain before fine-tuning): per task, the final pretraining loss is "
        "`pretrain/eval_loss_<task>` at the last pretraining epoch, the unweighted loss on the held-out "
        "corpus with masks fixed by the trial seed (so cells with the same seed score the same "
        "batches); the weight is `pretrain/weight_<task>`, the mean weight over the last pretraining "
        "epoch's steps (0 while a schedule kept the task off). Means +- std over seeds. The VQA "
        "accuracy is compared with the equal-weights cell (LXMERT's weighting) by the same paired "
        "bootstrap. The paper has no numbers for these cells."
    ),
}


def eval_metric(sweep: Sweep) -> str:
    """What the sweep's accuracies measure: ``vqa_official``, ``soft_score`` or ``mixed`` (from the
    usable trials' `METRIC_TAG`; a run without the tag reported the soft score)."""
    kinds = {t.tags.get(METRIC_TAG) or SOFT for t in sweep.trials if t.usable}
    return kinds.pop() if len(kinds) == 1 else (MIXED if kinds else SOFT)


def _summary(values: list[float]) -> dict[str, Any]:
    return summarize(values).as_dict()


def type_order(types: set[str]) -> list[str]:
    """Answer types in display order."""
    return [t for t in TYPE_ORDER if t in types] + sorted(types - set(TYPE_ORDER))


def _trial_numbers(trial: Trial) -> dict[str, Any]:
    """What one usable trial contributes to its row."""
    m, h = trial.metrics, trial.history
    best_epoch = int(round(m.get(schema.BEST_EPOCH, 0)))
    eval_hist = h.get(schema.EVAL_ACC, {})
    last_epoch = max(eval_hist) if eval_hist else None
    by_type = {}
    for name, hist in h.items():
        if name.startswith(schema.EVAL_ACC_PREFIX) and best_epoch in hist:
            by_type[name[len(schema.EVAL_ACC_PREFIX):]] = hist[best_epoch]
    sps = list(h.get(schema.TRAIN_SAMPLES_PER_S, {}).values())
    wall = m.get(schema.TIME_TRIAL)
    if wall is None and h.get(schema.TIME_ELAPSED):
        wall = h[schema.TIME_ELAPSED][max(h[schema.TIME_ELAPSED])]
    epochs = sorted(eval_hist)
    last_gain = eval_hist[epochs[-1]] - eval_hist[epochs[-2]] if len(epochs) >= 2 else None
    engaged = trial.tags.get(schema.MECHANISM_ENGAGED)
    at_prior = h.get(schema.EVAL_AT_PRIOR_SHARE, {}).get(best_epoch)
    return {
        "seed": trial.seed,
        "key": trial.key,
        "run_id": trial.run_id,
        "acc": m[schema.BEST_ACC],
        "last_gain": last_gain,
        "still_learning": last_gain is not None and 100.0 * last_gain > STILL_LEARNING_PP,
        "engaged": None if engaged is None else _truthy(engaged),
        "evidence": trial.tags.get(schema.MECHANISM_EVIDENCE, ""),
        "at_prior_share": at_prior,
        "at_prior_types": trial.tags.get(schema.EVAL_AT_PRIOR, ""),
        "best_epoch": best_epoch,
        "last_epoch": last_epoch,
        "acc_last": eval_hist[last_epoch] if last_epoch is not None else None,
        "by_type": by_type,
        "samples_per_s": float(np.mean(sps)) if sps else None,
        "wall_s": wall,
        "params": m.get(schema.MODEL_PARAMS),
        "flops_per_sample": m.get(schema.MODEL_FLOPS),
        "time": {a: m[f"{schema.TIME_NS}{a}"] for a in TIME_ACCOUNTS if f"{schema.TIME_NS}{a}" in m},
        "pretrain": _pretrain_numbers(trial),
    }


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _pretrain_numbers(trial: Trial) -> dict[str, Any] | None:
    """What a pretraining trial logged at its last pretraining epoch (None: it did not pretrain).

    MLflow's latest value of a metric is the one at its highest step, and pretraining metrics are
    logged at step = pretraining epoch: the run's metrics are the last epoch's, no history needed.
    """
    p, m = trial.params, trial.metrics
    if not _truthy(p.get("pretrain.enabled")):
        return None
    out: dict[str, Any] = {"weighting": p.get("pretrain.weighting", "?"), "epochs": int(m.get(schema.PRETRAIN_EPOCH, 0)),
                           "loss": {}, "eval_loss": {}, "weight": {}, "time_s": m.get(schema.PRETRAIN_TIME),
                           "weighting_frac": m.get(schema.PRETRAIN_WEIGHTING_FRAC)}  # fmt: skip
    for name, value in m.items():
        for kind in ("eval_loss", "loss", "weight"):
            prefix = f"{schema.PRETRAIN_STAGE}/{kind}_"
            task = name[len(prefix):] if name.startswith(prefix) else ""
            if task and "_" not in task:  # loss_mor_feat etc. are components of a task's loss
                out[kind][task] = value
    return out


def pretrain_task_order(tasks: set[str]) -> list[str]:
    return [t for t in PRETRAIN_TASKS if t in tasks] + sorted(tasks - set(PRETRAIN_TASKS))


def _pretrain_summary(per: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A cell's pretraining numbers over its seeds (None when no trial pretrained)."""
    pre = [p["pretrain"] for p in per if p.get("pretrain") is not None]
    if not pre:
        return None
    tasks = pretrain_task_order({t for p in pre for k in ("eval_loss", "loss", "weight") for t in p[k]})
    weightings = sorted({p["weighting"] for p in pre})
    return {
        "weighting": weightings[0] if len(weightings) == 1 else "mixed: " + ", ".join(weightings),
        "epochs": sorted({p["epochs"] for p in pre}),
        "tasks": tasks,
        **{kind: {t: _summary([p[kind][t] for p in pre if t in p[kind]]) for t in tasks}
           for kind in ("eval_loss", "loss", "weight")},
        "time_s": _summary([p["time_s"] for p in pre if p["time_s"] is not None]),
        "weighting_frac": _summary([p["weighting_frac"] for p in pre if p["weighting_frac"] is not None]),
    }


def _time_summary(per: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell's time account over seeds: ``{account: summary}`` for the accounts its trials logged
    (empty when none did: a sweep from before the account existed shows no such column)."""
    frame = pd.DataFrame([p["time"] for p in per], columns=list(TIME_ACCOUNTS))
    return {a: _summary(frame[a].dropna().tolist()) for a in TIME_ACCOUNTS if frame[a].notna().any()}


def _constant(values: list[float | None]) -> tuple[float | None, bool]:
    """The common value of per-seed constants (params, FLOPs) and whether they all agreed."""
    present = [v for v in values if v is not None]
    if not present:
        return None, True
    return float(np.mean(present)), len(set(present)) == 1


def _signature(trials: list[Trial]) -> tuple[tuple[str, ...] | None, bool]:
    """(architecture signature, uses LayerDrop) of a cell from its runs' params."""
    for t in trials:
        p = t.params
        if "model.l_layers" in p:
            sig = tuple(p.get(k, "") for k in ("model.l_layers", "model.x_layers", "model.r_layers",
                                               "model.attention.name", "model.attention.stacks",
                                               "model.hidden_size"))
            return sig, p.get("model.layerdrop.mode", "none") not in ("", "none")
    return None, False


def question_bootstrap(sweep: Sweep, variant: str, reference: str) -> dict[str, Any]:
    """Paired bootstrap of ``variant`` minus ``reference`` over questions (secondary evidence).

    Seeds are paired (seed s of the variant with seed s of the reference); the per-question
    differences are averaged over the paired seeds, then questions are resampled. Questions are
    those present in every paired predictions file. It resamples questions only: the training runs
    are held fixed, so it says nothing about seed-to-seed variance and never decides a verdict.
    """
    out: dict[str, Any] = {"seeds": [], "bootstrap": None, "reason": ""}
    var = {t.seed: t for t in sweep.usable(variant) if t.predictions}
    ref = {t.seed: t for t in sweep.usable(reference) if t.predictions}
    if not ref:
        out["reason"] = f"no finished {reference} trial with eval/predictions.csv"
        return out
    if not var:
        out["reason"] = "no finished trial of this cell with eval/predictions.csv"
        return out
    seeds = sorted(s for s in set(var) & set(ref) if s is not None)
    if not seeds:
        out["reason"] = (f"no seed run by both (this cell: {sorted(s for s in var if s is not None)}, "
                         f"{reference}: {sorted(s for s in ref if s is not None)})")
        return out
    common = set.intersection(*(set(var[s].predictions) & set(ref[s].predictions) for s in seeds))
    qids = sorted(common)
    if not qids:
        out["reason"] = "the paired predictions share no question"
        return out
    diffs = np.zeros(len(qids))
    for s in seeds:
        vp, rp = var[s].predictions, ref[s].predictions
        diffs += np.array([vp[q][0] - rp[q][0] for q in qids])
    diffs /= len(seeds)
    result = paired_bootstrap(diffs, rng_for(variant, reference))
    out["seeds"] = seeds
    out["bootstrap"] = result.as_dict()
    return out


def _paper_effect(rows: dict[str, dict[str, Any]], variant: str, reference: str) -> float | None:
    """The paper's own difference (test-dev, as a fraction) when both cells carry the paper's numbers."""
    a, b = rows[variant]["paper"].get("test_dev"), rows[reference]["paper"].get("test_dev")
    return None if a is None or b is None else (float(a) - float(b)) / 100.0


def seed_accuracies(sweep: Sweep, rows: dict[str, dict[str, Any]],
                    seeds: set[int] | None = None) -> dict[str, dict[int, float]]:
    """``{cell: {seed: best/acc}}`` of the usable trials (of ``seeds`` only, when given)."""
    return {name: {t.seed: float(t.metrics[schema.BEST_ACC]) for t in sweep.usable(name)
                   if t.seed is not None and (seeds is None or t.seed in seeds)} for name in rows}


def comparison_plan(rows: dict[str, dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Which cell is compared with which, in which Holm family, and where the result is shown.

    Every cell against ``reference`` (family ``vs <reference>``); a LayerDrop cell also against its
    own architecture without LayerDrop; Table 3's pretraining cells against the equal-weights cell
    (LXMERT's weighting, the same budget; family ``vs <equal>``). ``slot`` is the row key the
    comparison fills, ``listed`` whether it appears in the comparisons table.
    """
    plan: list[dict[str, Any]] = []
    if reference in rows:
        for name, row in rows.items():
            if name == reference or row["n"] == 0:
                continue
            plan.append({"variant": name, "reference": reference, "kind": "vs reference",
                         "family": f"vs {reference}", "slot": "vs_reference", "listed": True})
    for name, row in rows.items():
        if row["n"] and row["baseline"] and row["baseline"] != reference:
            plan.append({"variant": name, "reference": row["baseline"], "kind": "vs baseline without LayerDrop",
                         "family": "LayerDrop vs its baseline", "slot": None, "listed": True})
    table3 = [n for n, r in rows.items() if r["table"] == 3]
    equal = next((n for n in table3 if (rows[n]["pretrain"] or {}).get("weighting") == "equal"), None)
    for name in table3:
        if name == equal or equal is None or rows[name]["n"] == 0:
            continue
        plan.append({"variant": name, "reference": equal, "kind": "vs equal task weights",
                     "family": f"vs {equal}", "slot": "vs_equal",
                     "listed": name != reference and equal != reference})
    return plan


def seed_verdicts(rows: dict[str, dict[str, Any]], per_seed: dict[str, dict[int, float]],
                  plan: list[dict[str, Any]]) -> list[inference.SeedComparison]:
    """The seed-level test of every planned comparison, Holm-corrected within each family."""
    tests = [inference.compare_seeds(p["variant"], p["reference"], per_seed[p["variant"]], per_seed[p["reference"]],
                                     paper_effect=_paper_effect(rows, p["variant"], p["reference"]),
                                     family=p["family"]) for p in plan]
    inference.holm(tests)
    return tests


def _caveats(rows: dict[str, dict[str, Any]], comp: dict[str, Any]) -> list[str]:
    """Why a comparison's verdict must be read with care: a degenerate cell, a cell still learning."""
    out = []
    for name in (comp["variant"], comp["reference"]):
        row = rows[name]
        if row["degenerate"]:
            seeds = ", ".join(str(d["seed"]) for d in row["degenerate"])
            out.append(f"{name}: mechanism never engaged (seed {seeds})")
        if row["still_learning"]:
            out.append(f"{name}: still learning at its last epoch (seed "
                       f"{', '.join(str(s) for s in row['still_learning'])})")
        if row.get("at_prior"):
            lo, hi = (f"{100 * f([d['share'] for d in row['at_prior']]):.0f}" for f in (min, max))
            out.append(f"{name}: no better than the blind prior on {lo if lo == hi else f'{lo}-{hi}'}% "
                       f"of questions (seed {', '.join(str(d['seed']) for d in row['at_prior'])})")
    return out


def compute(sweep: Sweep, reference: str = REFERENCE_CELL) -> dict[str, Any]:
    """All numbers of the report for ``sweep`` (JSON-ready, deterministic for a given store)."""
    rows: dict[str, dict[str, Any]] = {}
    all_types: set[str] = set()
    signatures: dict[str, tuple[tuple[str, ...] | None, bool]] = {}
    for name, cell in sweep.cells.items():
        trials = sweep.cell_trials(name)
        used = [t for t in trials if t.usable]
        per = [_trial_numbers(t) for t in used]
        planned = [t for t in trials if t.planned]
        for p in per:
            all_types.update(p["by_type"])
        params, params_same = _constant([p["params"] for p in per])
        flops, flops_same = _constant([p["flops_per_sample"] for p in per])
        signatures[name] = _signature(trials)
        if cell.pending and not used:
            status = "not run"
        elif not used:
            status = "no finished trial"
        elif len(used) < len(planned):
            status = "partial"
        else:
            status = "complete"
        acc_last = [p["acc_last"] for p in per if p["acc_last"] is not None]
        rows[name] = {
            "cell": name,
            "label": cell.label,
            "table": cell.table,
            "status": status,
            "pending": cell.pending,
            "seeds_planned": [t.seed for t in planned],
            "seeds": [p["seed"] for p in per],
            "n_planned": len(planned),
            "n": len(per),
            "acc": _summary([p["acc"] for p in per]),
            "acc_last": _summary(acc_last),
            "last_differs": any(p["acc_last"] is not None and p["acc_last"] != p["acc"] for p in per),
            "acc_by_type": {},
            "best_epoch": [p["best_epoch"] for p in per],
            "last_epoch": [p["last_epoch"] for p in per],
            "paper": dict(cell.paper),
            "params": params,
            "params_vary": not params_same,
            "flops_per_sample": flops,
            "flops_vary": not flops_same,
            "samples_per_s": _summary([p["samples_per_s"] for p in per if p["samples_per_s"] is not None]),
            "wall_s": _summary([p["wall_s"] for p in per if p["wall_s"] is not None]),
            "time": _time_summary(per),
            "layerdrop": signatures[name][1],
            "baseline": None,
            "vs_reference": None,
            "vs_equal": None,
            "pretrain": _pretrain_summary(per),
            "run_ids": [p["run_id"] for p in per],
            "degenerate": [{"seed": p["seed"], "evidence": p["evidence"]} for p in per if p["engaged"] is False],
            "engaged_seeds": [p["seed"] for p in per if p["engaged"] is True],
            "still_learning": [p["seed"] for p in per if p["still_learning"]],
            "at_prior": [{"seed": p["seed"], "share": p["at_prior_share"], "types": p["at_prior_types"]}
                         for p in per if p["at_prior_share"]],
            "last_gain": _summary([p["last_gain"] for p in per if p["last_gain"] is not None]),
        }
        rows[name]["_per"] = per
    types = type_order(all_types)
    for row in rows.values():
        per = row.pop("_per")
        row["acc_by_type"] = {
            t: _summary([p["by_type"][t] for p in per if t in p["by_type"]]) for t in types
        }

    # LayerDrop's baseline: the cell with the same architecture and attention, without LayerDrop.
    for name, (sig, layerdrop) in signatures.items():
        if layerdrop and sig is not None:
            for other, (osig, olayerdrop) in signatures.items():
                if other != name and osig == sig and not olayerdrop:
                    rows[name]["baseline"] = other
                    break

    # Per-seed accuracies: the unit of every verdict.
    per_seed = seed_accuracies(sweep, rows)
    plan = comparison_plan(rows, reference)
    tests = seed_verdicts(rows, per_seed, plan)
    comparisons = []
    equal = next((p["reference"] for p in plan if p["slot"] == "vs_equal"), None)
    if equal is None:
        equal = next((n for n, r in rows.items()
                      if r["table"] == 3 and (r["pretrain"] or {}).get("weighting") == "equal"), None)
    for p, test in zip(plan, tests):
        comp = {"variant": p["variant"], "reference": p["reference"], "kind": p["kind"], "family": p["family"],
                "seed_test": test.as_dict(), **question_bootstrap(sweep, p["variant"], p["reference"])}
        comp["caveats"] = _caveats(rows, comp)
        if p["slot"]:
            rows[p["variant"]][p["slot"]] = comp
        if p["listed"]:
            comparisons.append(comp)
    table3 = [n for n, r in rows.items() if r["table"] == 3]

    incomplete = [
        {"key": t.key, "cell": t.cell, "seed": t.seed, "status": t.status, "run_id": t.run_id, "reason": t.reason}
        for t in sweep.trials if not t.usable
    ]
    pending = [{"cell": c.name, "label": c.label, "reason": c.pending} for c in sweep.cells.values() if c.pending]
    tags = sweep.tags
    metric = eval_metric(sweep)
    return {
        "sweep": {
            "id": sweep.sweep_id,
            "experiment": sweep.experiment,
            "parent_run_id": sweep.parent_run_id,
            "grid": tags.get(schema.SWEEP_GRID, ""),
            "preset": tags.get(schema.SWEEP_PRESET, ""),
            "status": tags.get(schema.SWEEP_STATUS, ""),
            "parent_run_status": sweep.parent_status,
            "git_commit": tags.get("git.commit", ""),
            "git_dirty": tags.get("git.dirty", ""),
            "source_hash": tags.get("source.hash", ""),
            "wall_s": sweep.metrics.get("sweep/wall_s"),
            "trials_wall_s": sweep.metrics.get("sweep/trials_wall_s"),
            "overhead_ratio": sweep.metrics.get("sweep/overhead_ratio"),
            "concurrency": sweep.metrics.get("sweep/concurrency"),
            "goodput": sweep.metrics.get("sweep/goodput"),
            "wall_over_ideal": sweep.metrics.get("sweep/wall_over_ideal"),
            "step_ideal_s": sweep.metrics.get("sweep/step_ideal_s"),
            "trials_sum_s": sweep.metrics.get("sweep/trials_sum_s"),
            "time": {a: sweep.metrics[f"sweep/{a}"] for a in TIME_ACCOUNTS if f"sweep/{a}" in sweep.metrics},
            "planned_trials": sum(t.planned for t in sweep.trials),
            "usable_trials": sum(t.usable for t in sweep.trials),
        },
        "metric": metric,
        "definitions": {**DEFINITIONS, "accuracy": METRIC_DEFINITIONS.get(metric, "") + " " + DEFINITIONS["accuracy"]},
        "reference": reference if reference in rows else None,
        "reference_table3": equal,
        "answer_types": types,
        "cells": rows,
        "tables": {
            "table1": [n for n, r in rows.items() if r["table"] == 1],
            "table2": [n for n, r in rows.items() if r["table"] == 2],
            "table3": table3,
            "other": [n for n, r in rows.items() if r["table"] not in (1, 2, 3)],
        },
        "comparisons": comparisons,
        "attention": attention_summary(sweep),
        "incomplete": {"trials": incomplete, "pending": pending},
        "notes": list(sweep.notes),
    }


def head_frame(sweep: Sweep) -> pd.DataFrame:
    """Every usable trial's ``stats/attention_heads.csv`` rows as one frame (column ``cell`` added).

    Columns: cell, seed, epoch, stack, layer, attention, stat, head, value; empty when no trial logged
    a statistic.
    """
    columns = ["cell", "seed", "epoch", "stack", "layer", "attention", "stat", "head", "value"]
    records = [{"cell": name, "seed": t.seed, **r} for name in sweep.cells for t in sweep.usable(name)
               for r in (t.heads or [])]
    return pd.DataFrame.from_records(records, columns=columns)


def attention_summary(sweep: Sweep) -> list[dict[str, Any]]:
    """Every learned per-head statistic per cell and stack: first and last epoch, over every head and seed.

    Which statistics exist comes from the data (the ``stat`` column), so a new normaliser's statistic
    appears here without an edit. The paper's claims (text heads sparse, alpha toward 2; vision and
    cross-modal heads dense; spans shrink in single-modality layers) are read off this table.
    """
    heads = head_frame(sweep)
    if heads.empty:
        return []
    stacks = [s for s in STACK_ORDER if s in set(heads["stack"])] + sorted(set(heads["stack"]) - set(STACK_ORDER))
    out = []
    for name in sweep.cells:
        cell = heads[heads["cell"] == name]
        for stat in stat_order(set(cell["stat"])):
            for stack in stacks:
                sel = cell[(cell["stat"] == stat) & (cell["stack"] == stack)]
                if sel.empty:
                    continue
                first, last = int(sel["epoch"].min()), int(sel["epoch"].max())
                v_first = sel.loc[sel["epoch"] == first, "value"]
                v_last = sel.loc[sel["epoch"] == last, "value"]
                out.append({
                    "cell": name, "stat": stat, "stack": stack,
                    "first_epoch": first, "last_epoch": last,
                    "mean_first": float(np.mean(v_first.to_numpy())), "mean_last": float(np.mean(v_last.to_numpy())),
                    "min_last": float(v_last.min()), "max_last": float(v_last.max()),
                    "n_values_last": int(len(v_last)),
                    # head -1: per-layer means from metric histories (the run lacked the CSV).
                    "per_head": bool((sel["head"] >= 0).all()),
                })
    return out
