"""Fine-tuning strategies (issue 15; ``sweeps/grids/finetuning.yaml``): a table and a usage heatmap.

The table has one row per cell of the sweep whose trials set ``model.finetune.name``, when at least one
cell uses a strategy other than ``standard``: accuracy over seeds and its seed-level comparison with the
``standard`` cell (:func:`reports.inference.compare_seeds`, Holm-corrected within the table's family),
SpotTune's usage of the fine-tuned branch and policy entropy at the last epoch, and each cell's cost
against ``standard``: the analytic FLOPs per training sample (``model/finetune_train_flops``), the step
time (``train/step_s``) and the memory held across steps (``train/resident_mb``; on CUDA the peak,
``train/peak_mem_mb``). The step times come from the sweep's own trials, which ran in different
processes and possibly side by side with other trials, so their ratios are indicative only; the
side-by-side measurement is ``python -m benchmarks.finetune`` (docs/finetuning.md).

The heatmap shows, per SpotTune cell, the share of training samples that took the fine-tuned branch
per stack (rows) and layer (columns) at the last epoch (``finetune/usage/<stack>/<layer>``), mean over
seeds. Reads MLflow only (through :class:`reports.store.Sweep`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import schema
from reports import inference
from reports.store import Sweep
from reports.tables import _summary

#: The cell every other is compared with.
REFERENCE = "standard"
#: Strategies that have a policy (usage statistics, heatmap).
ADAPTIVE = ("spottune_block", "spottune", "spottune_res")
STACKS = ("lang", "visn", "cross")
STACK_NAMES = {"lang": "language", "visn": "vision", "cross": "cross"}
FAMILY = "fine-tuning strategies vs standard"


def _strategy(sweep: Sweep, cell: str) -> str | None:
    """The cell's ``model.finetune.name`` (None when its usable trials disagree or lack it)."""
    names = {t.params.get(schema.PARAM_FINETUNE) for t in sweep.usable(cell)}
    return names.pop() if len(names) == 1 else None


def _values(sweep: Sweep, cell: str, metric: str) -> dict[int, float]:
    """``{seed: last logged value}`` of ``metric`` over the cell's usable trials that logged it."""
    return {t.seed: float(t.metrics[metric]) for t in sweep.usable(cell)
            if t.seed is not None and metric in t.metrics and np.isfinite(t.metrics[metric])}  # fmt: skip


def _ratio(values: dict[int, float], reference: dict[int, float]) -> float | None:
    """Mean of the cell's values over the mean of the reference's (None when either is missing)."""
    if not values or not reference:
        return None
    ref = float(np.mean(list(reference.values())))
    return float(np.mean(list(values.values()))) / ref if ref > 0 else None


def usage_grid(sweep: Sweep, cell: str) -> dict[str, dict[int, float]]:
    """``{stack: {layer: usage}}`` at the last epoch, mean over the cell's seeds."""
    found: dict[tuple[str, int], list[float]] = {}
    for trial in sweep.usable(cell):
        for name, value in trial.metrics.items():
            if not name.startswith(schema.FINETUNE_USAGE_PREFIX) or not np.isfinite(value):
                continue
            parts = name[len(schema.FINETUNE_USAGE_PREFIX):].split("/")
            if len(parts) == 2 and parts[0] in STACKS and parts[1].isdigit():
                found.setdefault((parts[0], int(parts[1])), []).append(float(value))
    out: dict[str, dict[int, float]] = {}
    for (stack, layer), values in sorted(found.items()):
        out.setdefault(stack, {})[layer] = float(np.mean(values))
    return out


def compute(sweep: Sweep) -> dict[str, Any] | None:
    """The table's numbers (JSON-ready), or None when the sweep compares no fine-tuning strategies."""
    strategies = {name: _strategy(sweep, name) for name in sweep.cells}
    strategies = {name: s for name, s in strategies.items() if s is not None}
    if not any(s != REFERENCE for s in strategies.values()):
        return None
    reference = next((n for n, s in strategies.items() if s == REFERENCE), None)
    per_seed = {name: {t.seed: float(t.metrics[schema.BEST_ACC]) for t in sweep.usable(name) if t.seed is not None}
                for name in strategies}  # fmt: skip
    ref_cost = {key: _values(sweep, reference, metric) if reference else {}
                for key, metric in (("step_s", schema.TRAIN_STEP_S), ("resident_mb", schema.TRAIN_RESIDENT_MB),
                                    ("peak_mem_mb", schema.TRAIN_PEAK_MEM_MB),
                                    ("flops", schema.FINETUNE_TRAIN_FLOPS))}  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    for name, strategy in strategies.items():
        cost = {key: _values(sweep, name, metric)
                for key, metric in (("step_s", schema.TRAIN_STEP_S), ("resident_mb", schema.TRAIN_RESIDENT_MB),
                                    ("peak_mem_mb", schema.TRAIN_PEAK_MEM_MB),
                                    ("flops", schema.FINETUNE_TRAIN_FLOPS))}  # fmt: skip
        decisions = sorted(set(_values(sweep, name, schema.FINETUNE_DECISIONS).values()))
        rows[name] = {
            "cell": name,
            "label": sweep.cells[name].label,
            "strategy": strategy,
            "seeds": sorted(per_seed[name]),
            "acc": _summary(list(per_seed[name].values())),
            "decisions": int(decisions[0]) if len(decisions) == 1 else None,
            "usage": _summary(list(_values(sweep, name, schema.FINETUNE_USAGE).values())),
            "eval_usage": _summary(list(_values(sweep, name, schema.FINETUNE_EVAL_USAGE).values())),
            "policy_entropy": _summary(list(_values(sweep, name, schema.FINETUNE_POLICY_ENTROPY).values())),
            "step_s": _summary(list(cost["step_s"].values())),
            "resident_mb": _summary(list(cost["resident_mb"].values())),
            "ratios": {key: _ratio(cost[key], ref_cost[key]) for key in cost},
            "usage_grid": usage_grid(sweep, name) if strategy in ADAPTIVE else {},
            "vs_standard": None,
        }
    comparisons = []
    if reference is not None:
        tests = [inference.compare_seeds(name, reference, per_seed[name], per_seed[reference], family=FAMILY)
                 for name in rows if name != reference]  # fmt: skip
        inference.holm(tests)
        for test in tests:
            comp = {"variant": test.variant, "reference": reference, "seed_test": test.as_dict(), "caveats": []}
            rows[test.variant]["vs_standard"] = comp
            comparisons.append(comp)
    return {"reference": reference, "cells": list(rows), "rows": rows, "comparisons": comparisons}


def table(tables: dict[str, Any]):
    """The rendered table (:class:`reports.render.Table`)."""
    from reports.render import DASH, _table, delta, mean_std, verdict

    ft = tables["finetuning"]
    ref = ft["reference"]
    ref_label = ft["rows"][ref]["label"] if ref else REFERENCE

    def ratio(x: float | None) -> str:
        return DASH if x is None else f"{x:.2f}x"

    header = ["Cell", "Strategy", "Decisions", "Seeds", "Accuracy (mean ± sd)", f"Δ vs {ref_label} (pp) [95% CI]",
              "Verdict", "Usage train / eval (%)", "Policy entropy (nats)", "FLOPs / sample vs standard",
              "Step time vs standard", "Memory vs standard"]
    rows = []
    gpu = any(r["ratios"]["peak_mem_mb"] is not None for r in ft["rows"].values())
    for name in ft["cells"]:
        r = ft["rows"][name]
        usage = DASH if not r["usage"]["n"] else f"{mean_std(r['usage'], digits=1)} / {mean_std(r['eval_usage'], digits=1)}"
        entropy = DASH if not r["policy_entropy"]["n"] else mean_std(r["policy_entropy"], scale=1.0, digits=3)
        memory = r["ratios"]["peak_mem_mb"] if gpu else r["ratios"]["resident_mb"]
        rows.append([r["label"], f"`{r['strategy']}`", DASH if r["decisions"] in (None, 0) else str(r["decisions"]),
                     str(len(r["seeds"])), mean_std(r["acc"]),
                     DASH if name == ref else delta(r["vs_standard"]),
                     DASH if name == ref else verdict(r["vs_standard"], ref_label),
                     usage, entropy, ratio(r["ratios"]["flops"]), ratio(r["ratios"]["step_s"]), ratio(memory)])
    notes = [
        "Accuracy: best evaluation accuracy per seed, mean ± sd over seeds; Δ and verdict: the seed-level test "
        f"against {ref_label} (paired by seed when both ran at least two common seeds), Holm-corrected over "
        "this table's comparisons.",
        "Usage: share of SpotTune's decisions that took the fine-tuned branch in the last epoch's training "
        "forwards (Gumbel-Softmax samples) / evaluation forwards (model.finetune.eval_mode); policy entropy: mean "
        "entropy of the policy's per-decision distribution over the last epoch's training samples (ln 2 = 0.693 "
        "undecided).",
        "FLOPs: analytic forward + backward per training sample (models.flops.finetune_cost; SpotTune runs both "
        "copies and the policy). Step time: mean seconds per training step of the last epoch (train/step_s) over "
        "the standard cell's; these trials ran in separate processes, possibly beside other trials, so the ratio "
        "is indicative: docs/finetuning.md has the side-by-side benchmark. Memory: "
        + ("peak CUDA memory of the last epoch (train/peak_mem_mb)" if gpu else
           "parameters, buffers and optimiser state held across steps (train/resident_mb; no CUDA peak on CPU)")
        + " over the standard cell's.",
    ]
    if ref is None:
        notes.append("No cell with model.finetune.name=standard in this sweep: no comparison and no ratios.")
    align = ["l", "l", "r", "r", "r", "r", "l", "r", "r", "r", "r", "r"]
    return _table("finetuning", "Fine-tuning strategies: accuracy, SpotTune usage and cost against standard "
                                "fine-tuning (accuracy in percent)", header, rows, align, notes)


def heatmap(tables: dict[str, Any], path: Path, number: int) -> dict[str, Any] | None:
    """The usage heatmap (stacks x layers, one panel per SpotTune cell); None without usage data."""
    ft = tables.get("finetuning")
    if not ft:
        return None
    cells = [n for n in ft["cells"] if ft["rows"][n]["usage_grid"]]
    if not cells:
        return None
    import matplotlib
    import matplotlib.style

    from reports.figures import _RC, _figure, _save

    width = max(max((max(g) + 1 for g in ft["rows"][n]["usage_grid"].values()), default=1) for n in cells)
    with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
        fig = _figure(max(4.5, 0.45 * width + 2.2), 1.6 * len(cells) + 0.6, margins=(0.9, 0.45, 1.0, 0.55),
                      hspace=0.75)
        axes = fig.subplots(len(cells), 1, squeeze=False)[:, 0]
        image = None
        for ax, name in zip(axes, cells):
            grid = ft["rows"][name]["usage_grid"]
            stacks = [s for s in STACKS if s in grid]
            data = np.full((len(stacks), width), np.nan)
            for i, stack in enumerate(stacks):
                for layer, value in grid[stack].items():
                    data[i, int(layer)] = value
            ax.grid(False)
            image = ax.imshow(np.ma.masked_invalid(data), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            for i in range(data.shape[0]):
                for j in range(data.shape[1]):
                    if np.isfinite(data[i, j]):
                        ax.text(j, i, f"{100 * data[i, j]:.0f}", ha="center", va="center", fontsize=6,
                                color="white" if data[i, j] < 0.5 else "black")
            ax.set_yticks(range(len(stacks)), [STACK_NAMES[s] for s in stacks])
            ax.set_xticks(range(width), [str(j) for j in range(width)])
            ax.set_title(f"{ft['rows'][name]['label']} ({len(ft['rows'][name]['seeds'])} seed(s))", fontsize=8)
        axes[-1].set_xlabel("layer")
        if image is not None:
            bar = fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.02)
            bar.set_label("share fine-tuned")
        fig.suptitle(f"Fig. {number}: SpotTune usage of the fine-tuned branch per stack and layer (last epoch, "
                     "training)", fontsize=8)
        _save(fig, path)
    return {"cells": cells}


def add_figure(tables: dict[str, Any], figures: dict[str, Any], out_dir: Path) -> None:
    """Draw the heatmap into ``out_dir/figures`` and list it in ``figures`` under the next free number."""
    used = {f["figure"] for f in figures["files"]} | {int(n) for n in figures["missing"]} | {1, 2, 3, 4}
    number = max(used) + 1
    name = f"fig{number}_finetune_usage.png"
    info = heatmap(tables, out_dir / "figures" / name, number)
    if info is not None:
        figures["files"].append({"figure": number, "cell": None, "file": f"figures/{name}",
                                 "caption": f"Fig. {number}: SpotTune usage of the fine-tuned branch per stack and "
                                            "layer, last epoch, mean over seeds", **info})  # fmt: skip
