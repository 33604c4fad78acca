"""The paper's figures, redrawn from a sweep (PNG, matplotlib).

* Fig. 1: span per layer vs epoch, one panel per stack, one figure per cell with spans.
* Fig. 2: evaluation accuracy vs epoch of each LayerDrop cell beside its baselines (mean over
  seeds, band +- one standard deviation).
* Fig. 3: alpha per head vs epoch, one panel per stack, one figure per cell with learned alpha.
* Fig. 4: top-5 answer confidences for the same evaluation questions under every variant.
* Fig. 5 on: any other learned statistic of ``stats/attention_heads.csv`` (a new normaliser's), drawn
  like Fig. 1; which statistics exist is read from the data, their display settings from
  :data:`reports.tables.STAT_DISPLAY`.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through
``pyplot``: no global backend switch or figure registry is touched in the process that builds
the report (the sweep driver), and sizes, margins, DPI, style and PNG metadata are fixed so a
rebuild produces the same bytes on the same matplotlib.
"""

from __future__ import annotations

import re
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

import schema
from reports.store import Sweep
from reports.tables import STAT_DISPLAY, stat_display, stat_order

DPI = 100
STACKS = ("lang", "visn", "cross")
#: The paper's figures; figures of other statistics are numbered after them.
PAPER_FIGURES = (1, 2, 3, 4)
STACK_TITLES = {"lang": "language layers", "visn": "vision layers", "cross": "cross-modality layers"}
ATTENTION_STYLES = {"self": "-", "cross": "-", "lang_self": "--", "visn_self": ":"}
#: Example questions shown in Fig. 4.
N_EXAMPLES = 3
_RC = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 6,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "savefig.dpi": DPI,
    "path.simplify": False,
}


def _figure(width: float, height: float, margins: tuple[float, float, float, float] = (0.6, 0.5, 0.15, 0.55),
            wspace: float = 0.3, hspace: float = 0.3):
    """A figure with fixed margins (inches: left, bottom, right, top).

    Fixed margins instead of matplotlib's constrained layout: the layout solver costs more than
    the drawing (seconds with 20-odd panels), and fixed sizes keep every rebuild identical.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    left, bottom, right, top = margins
    fig.subplots_adjust(left=left / width, bottom=bottom / height, right=1 - right / width,
                        top=1 - top / height, wspace=wspace, hspace=hspace)
    return fig


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" (matplotlib version) or date chunk: the file depends on the data only.
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


def _epochs_mean(series: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over seeds at each epoch that every series has; also how many series."""
    if not series:
        return np.array([]), np.array([]), np.array([]), np.array([])
    epochs = sorted(set().union(*[set(s) for s in series]))
    mean, std, count = [], [], []
    for e in epochs:
        vals = [s[e] for s in series if e in s]
        mean.append(float(np.mean(vals)))
        std.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
        count.append(len(vals))
    return np.array(epochs), np.array(mean), np.array(std), np.array(count)


def _epoch_axis(ax) -> None:
    """Label the x axis with whole epochs only."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax, keys: list[tuple], n_layers: int) -> None:
    """One entry per layer (colour) and, when a stack has several attentions, one per attention
    (line style), instead of one per line: a cross-modality stack has 3 lines per layer."""
    from matplotlib.lines import Line2D

    layers = sorted({k[1] for k in keys})
    attentions = sorted({k[2] for k in keys})
    handles = [Line2D([], [], color=_layer_colour(layer, n_layers), label=f"layer {layer}") for layer in layers]
    if len(attentions) > 1:
        handles += [Line2D([], [], color="black", linestyle=ATTENTION_STYLES.get(a, "-"), label=a)
                    for a in attentions]
    ax.legend(handles=handles, ncol=2 if len(handles) > 8 else 1, loc="best")


def _layer_colour(layer: int, n_layers: int):
    from matplotlib import colormaps

    return colormaps["viridis"](layer / max(1, n_layers - 1) * 0.9)


# --------------------------------------------------------------------------------------------
# Fig. 1 and Fig. 3: per-layer / per-head statistics
# --------------------------------------------------------------------------------------------


def _stat_rows(sweep: Sweep, cell: str, stat: str) -> dict[int | None, list[dict[str, Any]]]:
    """``{seed: rows}`` of one statistic for a cell's usable trials."""
    out: dict[int | None, list[dict[str, Any]]] = {}
    for t in sweep.usable(cell):
        rows = [r for r in (t.heads or []) if r["stat"] == stat]
        if rows:
            out[t.seed] = rows
    return out


def fig_layer_means(sweep: Sweep, cell: str, label: str, path: Path, stat: str = "span",
                    number: int = 1) -> dict[str, Any] | None:
    """Fig. 1 (``stat`` span) for one cell: a statistic's mean over heads per layer vs epoch, mean
    over seeds; also the figure of any statistic without a per-head figure."""
    show = stat_display(stat)
    by_seed = _stat_rows(sweep, cell, stat)
    if not by_seed:
        return None
    # (stack, layer, attention) -> per seed {epoch: mean over heads}
    series: dict[tuple[str, int, str], list[dict[int, float]]] = defaultdict(list)
    for rows in by_seed.values():
        acc: dict[tuple[str, int, str, int], list[float]] = defaultdict(list)
        for r in rows:
            acc[(r["stack"], r["layer"], r["attention"], r["epoch"])].append(r["value"])
        per: dict[tuple[str, int, str], dict[int, float]] = defaultdict(dict)
        for (stack, layer, att, epoch), vals in acc.items():
            per[(stack, layer, att)][epoch] = float(np.mean(vals))
        for k, v in per.items():
            series[k].append(v)
    stacks = [s for s in STACKS if any(k[0] == s for k in series)]
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
        fig = _figure(4.0 * len(stacks), 3.4, wspace=0.32)
        axes = fig.subplots(1, len(stacks), squeeze=False)[0]
        for ax, stack in zip(axes, stacks):
            keys = sorted(k for k in series if k[0] == stack)
            n_layers = max(k[1] for k in keys) + 1
            for key in keys:
                epochs, mean, _, _ = _epochs_mean(series[key])
                ax.plot(epochs, mean, ATTENTION_STYLES.get(key[2], "-"), marker="o", markersize=2.5,
                        color=_layer_colour(key[1], n_layers))
            ax.set_title(STACK_TITLES[stack])
            _epoch_axis(ax)
            ax.set_ylabel(f"{show.get('axis', show['label'])}, mean over heads")
            _legend(ax, keys, n_layers)
        fig.suptitle(f"Fig. {number}: {show['what']} per layer, {label} (mean over {len(by_seed)} seed(s))")
        _save(fig, path)
    return {"seeds": sorted(s for s in by_seed if s is not None)}


def fig_per_head(sweep: Sweep, cell: str, label: str, path: Path, stat: str = "alpha",
                 number: int = 3) -> dict[str, Any] | None:
    """Fig. 3 (``stat`` alpha) for one cell: every head's value of a statistic vs epoch, for the
    lowest seed.

    One seed, not a mean: a head's index is not guaranteed to mean the same head in another seed
    (heads trained from scratch), so averaging per index could draw trajectories no head had.
    """
    show = stat_display(stat)
    by_seed = _stat_rows(sweep, cell, stat)
    if not by_seed:
        return None
    seed = sorted(by_seed, key=lambda s: (s is None, s or 0))[0]
    rows = by_seed[seed]
    per: dict[tuple[str, int, str, int], dict[int, float]] = defaultdict(dict)
    for r in rows:
        per[(r["stack"], r["layer"], r["attention"], r["head"])][r["epoch"]] = r["value"]
    stacks = [s for s in STACKS if any(k[0] == s for k in per)]
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
        fig = _figure(4.0 * len(stacks), 3.4, wspace=0.32)
        axes = fig.subplots(1, len(stacks), squeeze=False)[0]
        for ax, stack in zip(axes, stacks):
            keys = sorted(k for k in per if k[0] == stack)
            n_layers = max(k[1] for k in keys) + 1
            for key in keys:
                epochs = sorted(per[key])
                ax.plot(epochs, [per[key][e] for e in epochs], ATTENTION_STYLES.get(key[2], "-"),
                        linewidth=0.8, alpha=0.8, color=_layer_colour(key[1], n_layers))
            if "ylim" in show:
                ax.set_ylim(*show["ylim"])
            if "hline" in show:
                ax.axhline(show["hline"], color="grey", linewidth=0.6, linestyle=":")
            ax.set_title(STACK_TITLES[stack])
            _epoch_axis(ax)
            ax.set_ylabel(show.get("axis", show["label"]))
            _legend(ax, keys, n_layers)
        fig.suptitle(f"Fig. {number}: {show['what']} per head, {label} (seed {seed})")
        _save(fig, path)
    return {"seeds": [seed]}


# --------------------------------------------------------------------------------------------
# Fig. 2: LayerDrop validation curves
# --------------------------------------------------------------------------------------------


def _acc_curves(sweep: Sweep, cell: str) -> list[dict[int, float]]:
    return [t.history[schema.EVAL_ACC] for t in sweep.usable(cell) if t.history.get(schema.EVAL_ACC)]


def fig_layerdrop(sweep: Sweep, tables: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """Fig. 2: each LayerDrop cell's evaluation accuracy vs epoch beside its baselines."""
    rows = tables["cells"]
    reference = tables["reference"]
    panels = []
    for name, row in rows.items():
        if not row["layerdrop"] or not _acc_curves(sweep, name):
            continue
        group = [name] + [b for b in (row["baseline"], reference) if b and b != name]
        group = [c for i, c in enumerate(group) if c not in group[:i] and _acc_curves(sweep, c)]
        panels.append(group)
    if not panels:
        return None
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
        fig = _figure(4.6 * len(panels), 3.6, wspace=0.25)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        colours = matplotlib.colormaps["tab10"]
        order = list(rows)
        for ax, group in zip(axes, panels):
            for cell in group:
                curves = _acc_curves(sweep, cell)
                epochs, mean, std, count = _epochs_mean(curves)
                colour = colours(order.index(cell) % 10)
                ax.plot(epochs, 100 * mean, marker="o", markersize=3, color=colour,
                        label=f"{rows[cell]['label']} (n={len(curves)})")
                if len(curves) > 1:
                    ax.fill_between(epochs, 100 * (mean - std), 100 * (mean + std), color=colour, alpha=0.2,
                                    linewidth=0)
            ax.set_title(rows[group[0]]["label"])
            _epoch_axis(ax)
            ax.set_ylabel("evaluation accuracy (%)")
            ax.legend(loc="lower right")
        fig.suptitle("Fig. 2: LayerDrop validation curves (mean over seeds, band ± 1 std)")
        _save(fig, path)
    return {"panels": panels}


# --------------------------------------------------------------------------------------------
# Fig. 4: top-5 answers for the same questions
# --------------------------------------------------------------------------------------------


def _gold(gold: Any) -> tuple[set[str], str]:
    """(answers counted as correct, text) from the examples' ``gold`` field in any of its forms."""
    if isinstance(gold, dict):
        items = sorted(gold.items(), key=lambda kv: (-float(kv[1]), kv[0]))
        return {a for a, s in items if float(s) > 0}, ", ".join(f"{a} ({float(s):g})" for a, s in items)
    if isinstance(gold, (list, tuple)):
        answers = [str(a) for a in gold]
        return set(answers), ", ".join(dict.fromkeys(answers))
    if gold is None:
        return set(), "?"
    return {str(gold)}, str(gold)


def fig_examples(sweep: Sweep, tables: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """Fig. 4: top-5 answer probabilities for the first example questions every variant has.

    Each variant shows its lowest seed that every variant ran (else its own lowest seed).
    """
    rows = tables["cells"]
    chosen: dict[str, tuple[int | None, list[dict[str, Any]]]] = {}
    seeds_with = {c: {t.seed for t in sweep.usable(c) if t.examples} for c in rows}
    common = set.intersection(*[s for s in seeds_with.values() if s]) if any(seeds_with.values()) else set()
    for cell in rows:
        trials = {t.seed: t for t in sweep.usable(cell) if t.examples}
        if not trials:
            continue
        pick = min(common, key=lambda s: (s is None, s or 0)) if common else \
            min(trials, key=lambda s: (s is None, s or 0))
        chosen[cell] = (pick, trials[pick].examples or [])
    if not chosen:
        return None
    order = list(chosen)
    first = chosen[tables["reference"]] if tables["reference"] in chosen else chosen[order[0]]
    shared = set.intersection(*[{int(e["question_id"]) for e in ex} for _, ex in chosen.values()])
    questions = [e for e in first[1] if int(e["question_id"]) in shared][:N_EXAMPLES]
    if not questions:
        return None
    lookup = {c: {int(e["question_id"]): e for e in ex} for c, (_, ex) in chosen.items()}
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
        width, height = 2.4 * len(order) + 1.8, 1.6 * len(questions) + 1.1
        fig = _figure(width, height, margins=(1.8, 0.55, 0.15, 0.85), wspace=0.55, hspace=0.25)
        axes = fig.subplots(len(questions), len(order), squeeze=False)
        for i, q in enumerate(questions):
            qid = int(q["question_id"])
            gold_set, gold_text = _gold(q.get("gold"))
            for j, cell in enumerate(order):
                ax = axes[i][j]
                top = lookup[cell][qid].get("top5", [])[:5]
                answers = [str(a.get("answer", "")) for a in top]
                probs = [float(a.get("prob", 0.0)) for a in top]
                ypos = np.arange(len(answers))[::-1]
                colours = ["tab:green" if a in gold_set else "tab:grey" for a in answers]
                ax.barh(ypos, probs, color=colours)
                ax.set_yticks(ypos, answers)
                ax.set_xlim(0, 1)
                ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
                ax.grid(False)
                if i == 0:
                    seed = chosen[cell][0]
                    ax.set_title("\n".join(textwrap.wrap(rows[cell]["label"], 24)) + f"\n(seed {seed})")
                if j == 0:
                    text = textwrap.fill(f"Q{qid}: {q.get('question', '')}", 28)
                    ax.set_ylabel(text + "\n" + textwrap.fill(f"gold: {gold_text}", 28), fontsize=7)
                if i == len(questions) - 1:
                    ax.set_xlabel("probability")
        fig.suptitle("Fig. 4: top-5 answer confidences (green: a gold answer)")
        _save(fig, path)
    return {"questions": [int(q["question_id"]) for q in questions],
            "seeds": {c: chosen[c][0] for c in order}}


# --------------------------------------------------------------------------------------------
# all of them
# --------------------------------------------------------------------------------------------


def make_figures(sweep: Sweep, tables: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Draw every figure the sweep has data for.

    Returns:
        ``{"files": [{"figure", "cell", "file" (relative to out_dir), "caption", ...}],
        "missing": {figure number: why there is no such figure}}``.
    """
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    # Figures of cells that left the sweep must not linger (or be logged) from an earlier build.
    for stale in fig_dir.glob("fig[0-9]*_*.png"):
        stale.unlink()
    rows = tables["cells"]
    files: list[dict[str, Any]] = []
    missing: dict[str, str] = {}

    # One figure per learned statistic: the paper's (span: Fig. 1, alpha: Fig. 3) always, reported
    # missing when absent; any other statistic the trials logged gets the next free number.
    logged = {r["stat"] for c in rows for t in sweep.usable(c) for r in (t.heads or [])}
    stats = stat_order(logged | {s for s, show in STAT_DISPLAY.items() if show.get("figure")})
    next_number = max(PAPER_FIGURES) + 1
    for stat in stats:
        show = stat_display(stat)
        number = show["figure"]
        if number is None:
            number, next_number = next_number, next_number + 1
        draw = fig_per_head if show["per_head"] else fig_layer_means
        made = 0
        for cell, row in rows.items():
            name = f"fig{number}_{_slug(stat)}_{_slug(cell)}.png"
            info = draw(sweep, cell, row["label"], fig_dir / name, stat=stat, number=number)
            if info is not None:
                made += 1
                caption = (f"Fig. {number}: {show['label']} per {'head' if show['per_head'] else 'layer'} vs "
                           f"epoch, per stack: {row['label']}")
                files.append({"figure": number, "cell": cell, "stat": stat, "file": f"figures/{name}",
                              "caption": caption, **info})
        if not made:
            missing[str(number)] = (f"no finished trial in this sweep logged {show['what']} statistics "
                                    f"(`stats/attention_heads.csv` rows with stat={stat})")

    info = fig_layerdrop(sweep, tables, fig_dir / "fig2_layerdrop.png")
    if info is not None:
        files.append({"figure": 2, "cell": None, "file": "figures/fig2_layerdrop.png",
                      "caption": "Fig. 2: evaluation accuracy vs epoch, LayerDrop cells beside their baselines",
                      **info})
    else:
        missing["2"] = "no finished LayerDrop trial with an `eval/acc` history in this sweep"

    info = fig_examples(sweep, tables, fig_dir / "fig4_examples.png")
    if info is not None:
        files.append({"figure": 4, "cell": None, "file": "figures/fig4_examples.png",
                      "caption": "Fig. 4: top-5 answer confidences for the same questions under each variant",
                      **info})
    else:
        missing["4"] = "no finished trial logged `eval/examples_top5.json` with questions common to all variants"
    files.sort(key=lambda f: (f["figure"], f["file"]))
    return {"files": files, "missing": missing}
