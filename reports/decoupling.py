"""The decoupling table (issue 16): zero-shot retrieval and downstream VQA accuracy per attention flow
and loss set, with the report's seed-level statistics, and parameters and FLOPs per flow.

Cells are those whose trials ran the retrieval stage (param ``retrieval.enabled``), whatever the grid
(``sweeps/grids/decoupling.yaml`` is the one built for it). Every cell is compared with the reference
cell (``base``: merged attention with ITM + MLM + MRM, Hendricks et al.'s base; else the first such
cell) on two numbers, each its own Holm family: ``rsum`` (the six recalls summed, points) and the
VQA accuracy at the best epoch (``best/acc``). Seeds are the unit (:func:`reports.inference.compare_seeds`,
paired over common seeds). Reads MLflow data only (a :class:`reports.store.Sweep`).
"""

from __future__ import annotations

from typing import Any

import schema
from reports import inference
from reports.render import DASH
from reports.stats import summarize
from reports.store import Sweep

#: The reference cell of the decoupling grid.
REFERENCE = "base"
#: Metrics of the retrieval stage the table shows (bare names under ``retrieval/eval_``).
SHOWN = (*schema.RETRIEVAL_RECALLS, "i2t_medr", "t2i_medr", schema.RETRIEVAL_RSUM)


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _params(trials, key: str) -> str:
    values = sorted({t.params.get(key, "") for t in trials if t.params.get(key)})
    return ", ".join(values) if values else "?"


def _losses(trials) -> str:
    """``match,mlm,mor`` plus how the contrastive losses were set (contrastive ITM's K, queued negatives)."""
    text = _params(trials, schema.PARAM_PRETRAIN_TASKS)
    extras = []
    for key, what in ((schema.PARAM_ITM_NEGATIVES, "contrastive ITM, K={}"),
                      (schema.PARAM_CONTRASTIVE_NEGATIVES, "{} queued negatives")):  # fmt: skip
        value = _params(trials, key)
        if value not in ("?", "0"):
            extras.append(what.format(value))
    return text + (f" ({'; '.join(extras)})" if extras else "")


def _layout(trials) -> str:
    """``merged, 0-6-0`` (flow, language-fusion-vision layers) from the runs' params."""
    for t in trials:
        p = t.params
        if "model.x_layers" in p:
            flow = p.get(schema.PARAM_FLOW, "modality_specific")
            if flow == "mixed":
                flow += f" (merged from {p.get('model.flow_merged_from', '?')})"
            return f"{flow}, {p.get('model.l_layers', '?')}-{p.get('model.x_layers', '?')}-{p.get('model.r_layers', '?')}"
    return "?"


def compute(sweep: Sweep, tables: dict[str, Any]) -> dict[str, Any] | None:
    """The decoupling numbers of ``sweep`` (JSON-ready), or None when no trial ran the retrieval stage.

    Args:
        sweep: The sweep as read from MLflow.
        tables: :func:`reports.tables.compute`'s result (its per-cell params and FLOPs are reused).
    """
    cells = [name for name in sweep.cells
             if any(_truthy(t.params.get(schema.PARAM_RETRIEVAL_ENABLED)) for t in sweep.cell_trials(name))]
    if not cells:
        return None
    reference = REFERENCE if REFERENCE in cells else cells[0]
    rows: dict[str, dict[str, Any]] = {}
    per_seed: dict[str, dict[str, dict[int, float]]] = {"rsum": {}, "acc": {}}
    for name in cells:
        trials = sweep.cell_trials(name)
        used = [t for t in sweep.usable(name) if f"{schema.RETRIEVAL_PREFIX}{schema.RETRIEVAL_RSUM}" in t.metrics]
        seeds = [t.seed for t in used]
        metric = {m: summarize([t.metrics[f"{schema.RETRIEVAL_PREFIX}{m}"] for t in used
                                if f"{schema.RETRIEVAL_PREFIX}{m}" in t.metrics]).as_dict() for m in SHOWN}
        per_seed["rsum"][name] = {t.seed: float(t.metrics[f"{schema.RETRIEVAL_PREFIX}rsum"]) for t in used
                                  if t.seed is not None}
        per_seed["acc"][name] = {t.seed: float(t.metrics[schema.BEST_ACC]) for t in used
                                 if t.seed is not None and schema.BEST_ACC in t.metrics}
        base = tables["cells"].get(name, {})
        sizes = [t.metrics.get(f"{schema.RETRIEVAL_PREFIX}n_images") for t in used]
        rows[name] = {
            "cell": name,
            "label": sweep.cells[name].label or name,
            "flow": _layout(trials),
            "losses": _losses(trials),
            "scoring": _params(trials, schema.PARAM_RETRIEVAL_SCORING),
            "seeds": seeds,
            "n": len(used),
            "n_planned": sum(t.planned for t in trials),
            "retrieval": metric,
            "acc": summarize(list(per_seed["acc"][name].values())).as_dict(),
            "candidates": sorted({int(s) for s in sizes if s is not None}),
            "params": base.get("params"),
            "flops_per_sample": base.get("flops_per_sample"),
            "vs_reference": {},
        }
    tests = []
    for what in ("rsum", "acc"):
        for name in cells:
            if name == reference or rows[name]["n"] == 0:
                continue
            tests.append((what, inference.compare_seeds(name, reference, per_seed[what][name], per_seed[what][reference],
                                                        family=f"decoupling {what} vs {reference}")))
    inference.holm([t for _, t in tests])
    for what, test in tests:
        rows[test.variant]["vs_reference"][what] = test.as_dict()
    return {"reference": reference, "cells": rows, "order": cells}


def _mean_std(s: dict[str, Any], scale: float, digits: int) -> str:
    from reports.render import mean_std

    return mean_std(s, scale=scale, digits=digits)


def _delta(t: dict[str, Any] | None, scale: float) -> str:
    if t is None or t["effect"] is None:
        return DASH
    if t["ci_low"] is None:
        return f"{scale * t['effect']:+.2f} [n/a]"
    return f"{scale * t['effect']:+.2f} [{scale * t['ci_low']:+.2f}, {scale * t['ci_high']:+.2f}]"


def _verdict(t: dict[str, Any] | None, ref_label: str) -> str:
    from reports.render import verdict

    return DASH if t is None else verdict({"seed_test": t}, ref_label)


def table(tables: dict[str, Any]):
    """The rendered decoupling table (a :class:`reports.render.Table`), or None when the sweep has none."""
    from reports.render import _table, constant, seeds_cell

    d = tables.get("decoupling")
    if not d:
        return None
    ref = d["reference"]
    ref_label = f"`{ref}`"
    header = ["Variant", "Seeds", "Attention flow, layers (l-x-r)", "Pretraining losses", "Scoring",
              "Image→text R@1 / R@5 / R@10", "Text→image R@1 / R@5 / R@10", "Median rank i2t / t2i",
              "rsum mean ± std", f"Δ rsum vs {ref_label} [95% CI]", "Verdict (rsum, seeds as the unit)",
              "VQA acc. (best epoch) mean ± std", f"Δ VQA acc. vs {ref_label} (pp) [95% CI]",
              "Verdict (VQA acc.)", "Params", "FLOPs / sample"]  # fmt: skip
    rows = []
    for name in d["order"]:
        r = d["cells"][name]
        m = r["retrieval"]

        def recalls(direction: str, m=m) -> str:
            return " / ".join(_mean_std(m[f"{direction}_r{k}"], 1.0, 1) for k in (1, 5, 10))

        medr = " / ".join(_mean_std(m[f"{q}_medr"], 1.0, 1) for q in ("i2t", "t2i"))
        row = {"status": "complete" if r["n"] == r["n_planned"] else "partial", "n": r["n"], "n_planned": r["n_planned"]}
        vs = r["vs_reference"]
        rows.append([
            r["label"], seeds_cell(row), r["flow"], r["losses"], r["scoring"], recalls("i2t"), recalls("t2i"), medr,
            _mean_std(m["rsum"], 1.0, 1),
            "reference" if name == ref else _delta(vs.get("rsum"), 1.0),
            DASH if name == ref else _verdict(vs.get("rsum"), ref_label),
            _mean_std(r["acc"], 100.0, 2),
            "reference" if name == ref else _delta(vs.get("acc"), 100.0),
            DASH if name == ref else _verdict(vs.get("acc"), ref_label),
            DASH if r["params"] is None else f"{int(r['params']):,}", constant(r["flops_per_sample"], False),
        ])  # fmt: skip
    sizes = sorted({n for r in d["cells"].values() for n in r["candidates"]})
    notes = [
        "Zero-shot retrieval of the pretraining model before fine-tuning (the `retrieval` stage: "
        f"`retrieval/eval_*`), on {', '.join(str(n) for n in sizes) or '?'} candidate images with their captions. "
        f"The reference `{ref}` is {d['cells'][ref]['label']}. Recalls are percentages (image→text: an image's best-ranked own caption; text→image: the caption's image); "
        "ties rank pessimistically (docs/decoupling.md). rsum is the six recalls summed (0-600).",
        f"Each cell is compared with {ref_label} over seeds (paired t-test over common seeds, 95% t-interval), "
        "Holm-corrected within each column's family (rsum; VQA accuracy). Params and FLOPs are the fine-tuning "
        "model's (`model/params`, `model/flops_per_sample`, models/flops.py), which differ between flows.",
    ]
    return _table("decoupling", "Attention flow and pretraining losses: zero-shot retrieval and VQA accuracy",
                  header, rows, ["l", "r", "l", "l", "l"] + ["r"] * (len(header) - 5), notes)


__all__ = ["REFERENCE", "compute", "table"]
