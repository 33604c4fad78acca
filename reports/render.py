"""Format a report: one document model, rendered to Markdown, self-contained HTML and LaTeX.

:func:`document` turns the numbers of :mod:`reports.tables` and the figure list of
:mod:`reports.figures` into a list of blocks; :func:`to_markdown`, :func:`to_html` and
:func:`to_latex` render those blocks. Because the three come from the same blocks, the Markdown
page, the HTML page and the LaTeX tables can never disagree about a number.

Every table is a :class:`pandas.DataFrame` of formatted cells (columns: the header), so
:func:`frames` hands a sweep's tables to a notebook as they appear in the report.

Inline markup inside text is a small subset of Markdown: ``**bold**`` and ```code```.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from reports.tables import DEFINITIONS, PRETRAIN_TASK_LABELS, TYPE_LABELS, stat_display

NA = "n/a"
DASH = "—"
PAPER_MARK = "†"
PARTIAL_MARK = "‡"


@dataclass
class Table:
    """A rendered table: a frame of cell strings (its columns are the header), notes printed under it.

    Attributes:
        key: The table's id (``table1``; HTML ``id`` and LaTeX label).
        title: Its caption.
        frame: (rows, columns) of formatted strings; column names are the header.
        align: ``"l"`` / ``"r"`` per column.
        notes: Paragraphs printed under the table.
    """

    key: str
    title: str
    frame: pd.DataFrame
    align: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def header(self) -> list[str]:
        return [str(c) for c in self.frame.columns]

    @property
    def rows(self) -> list[list[str]]:
        return [[str(v) for v in row] for row in self.frame.itertuples(index=False, name=None)]


def _table(key: str, title: str, header: list[str], rows: list[list[str]], align: list[str],
           notes: list[str] | None = None) -> Table:
    """A :class:`Table` whose frame holds ``rows`` under ``header`` (all cells as strings)."""
    frame = pd.DataFrame(rows, columns=pd.Index(header, dtype=object), dtype=object)
    return Table(key, title, frame, align, list(notes or []))


Block = tuple  # ("h", level, text) | ("p", text) | ("ul", [text]) | ("table", Table) | ("fig", file, caption)


# --------------------------------------------------------------------------------------------
# number formatting
# --------------------------------------------------------------------------------------------


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction as percent (``0.7242`` -> ``72.42``)."""
    return DASH if x is None else f"{100.0 * x:.{digits}f}"


def mean_std(s: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std`` of a summary; ``± n/a`` with one seed (never ``± 0``)."""
    if not s or s["n"] == 0:
        return DASH
    mean = f"{scale * s['mean']:.{digits}f}"
    std = NA if s["std"] is None else f"{scale * s['std']:.{digits}f}"
    return f"{mean} ± {std}"


def interval(s: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    """``[low, high]`` of a summary's 95% interval, ``n/a`` for fewer than two seeds."""
    if not s or s["n"] == 0:
        return DASH
    if s["ci95"] is None:
        return NA
    lo, hi = s["ci95"]
    return f"[{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def si(x: float | None, unit: str = "") -> str:
    """``213900000`` -> ``213.9 M``."""
    if x is None or not math.isfinite(x):
        return DASH
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.1f} {prefix}{unit}".rstrip()
    return f"{x:.0f} {unit}".rstrip()


def duration(s: dict[str, Any]) -> str:
    """Mean wall time of a summary, in s / min / h."""
    if not s or s["n"] == 0:
        return DASH
    x = s["mean"]
    if x < 120:
        return f"{x:.1f} s"
    if x < 7200:
        return f"{x / 60:.1f} min"
    return f"{x / 3600:.2f} h"


def p_text(p: float | None) -> str:
    """``p=0.43`` / ``p<0.001``."""
    if p is None:
        return DASH
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def verdict(comp: dict[str, Any] | None, ref_label: str) -> str:
    """The seed-level verdict in plain words, with its Holm-adjusted p and any caveat."""
    if comp is None:
        return DASH
    t = comp["seed_test"]
    if t["p_value"] is None:
        return f"not tested: {t['reason']}"
    p = t["p_holm"] if t["p_holm"] is not None else t["p_value"]
    word = t["verdict"]
    text = f"{word} than {ref_label}" if word in ("better", "worse") else word
    text += f" (Holm {p_text(p)})"
    if comp.get("caveats"):
        text += "; caution: " + "; ".join(comp["caveats"])
    return text


def delta(comp: dict[str, Any] | None) -> str:
    """The seed-level effect, ``-0.81 [-1.20, -0.40]`` in percentage points."""
    if comp is None or comp["seed_test"]["effect"] is None:
        return DASH
    t = comp["seed_test"]
    if t["ci_low"] is None:
        return f"{100 * t['effect']:+.2f} [n/a]"
    return f"{100 * t['effect']:+.2f} [{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}]"


def bootstrap_delta(comp: dict[str, Any] | None) -> str:
    """The question bootstrap's effect and interval (secondary), ``+1.80 [+1.23, +2.37] p=0.001``."""
    if comp is None or comp.get("bootstrap") is None:
        return DASH if comp is None else f"n/a ({comp.get('reason') or 'no predictions'})"
    b = comp["bootstrap"]
    lo, hi = b["ci95"]
    return f"{100 * b['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] {p_text(b['p_value'])}"


def pp(x: float | None, signed: bool = False) -> str:
    """A fraction as percentage points."""
    if x is None:
        return DASH
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def seeds_cell(row: dict[str, Any]) -> str:
    """``3/3``; ``2/3 ‡`` when planned seeds are missing; ``not run`` for pending cells."""
    if row["status"] == "not run":
        return "not run"
    text = f"{row['n']}/{row['n_planned']}"
    return text + f" {PARTIAL_MARK}" if row["n"] < row["n_planned"] else text


def paper_cell(row: dict[str, Any]) -> str:
    paper = row["paper"]
    if not paper:
        return DASH
    dev, std = paper.get("test_dev"), paper.get("test_std")
    return " / ".join(DASH if v is None else f"{v:.2f}" for v in (dev, std))


def constant(x: float | None, vary: bool, unit: str = "") -> str:
    text = si(x, unit)
    return text + " (varies)" if vary and x is not None else text


def best_epochs(row: dict[str, Any]) -> str:
    return ", ".join(str(e) for e in row["best_epoch"]) if row["best_epoch"] else DASH


# --------------------------------------------------------------------------------------------
# the document
# --------------------------------------------------------------------------------------------


def _label(tables: dict[str, Any], cell: str | None) -> str:
    if cell is None:
        return DASH
    row = tables["cells"].get(cell)
    return row["label"] if row else cell


def metric_label(tables: dict[str, Any]) -> tuple[str, str, str]:
    """(column label, per-type column suffix, phrase for titles) of what the accuracy columns
    measure (``tables["metric"]``; reports built before it existed: LXMERT's soft score; another
    task's sweep: its own, ``tables["task"]``, :mod:`reports.task_tables`)."""
    task = tables.get("task")
    if task:
        return task["acc_label"], "acc.", task["phrase"]
    return {
        "vqa_official": ("VQA acc.", "acc.", "VQA accuracy"),
        "mixed": ("VQA acc. or soft score (mixed)", "acc. or soft score", "VQA accuracy or soft score (mixed metrics)"),
    }.get(tables.get("metric", "soft_score"), ("Soft score", "soft score", "soft score"))


#: The per-trial time accounts shown in the tables' time column (of :data:`reports.tables.TIME_ACCOUNTS`).
SHOWN_ACCOUNTS = ("startup_s", "train_s", "eval_s")


def _has_time_account(tables: dict[str, Any]) -> bool:
    """Whether any cell's trials logged the time account (older sweeps did not: no empty column)."""
    return any(a in r.get("time", {}) for r in tables["cells"].values() for a in SHOWN_ACCOUNTS)


def time_account(row: dict[str, Any]) -> str:
    """``12.0 s / 3.1 min / 40.0 s``: mean start-up / train / eval time of a cell's trials."""
    acc = row.get("time", {})
    if not any(a in acc for a in SHOWN_ACCOUNTS):
        return DASH
    return " / ".join(duration(acc[a]) if a in acc else DASH for a in SHOWN_ACCOUNTS)


def _common_columns(row: dict[str, Any], tables: dict[str, Any]) -> list[str]:
    out = [
        paper_cell(row),
        constant(row["params"], row["params_vary"]),
        constant(row["flops_per_sample"], row["flops_vary"]),
        DASH if row["samples_per_s"]["n"] == 0 else f"{row['samples_per_s']['mean']:.0f}",
        duration(row["wall_s"]),
    ]
    if _has_time_account(tables):
        out.append(time_account(row))
    return out + [best_epochs(row)]


def _common_header(tables: dict[str, Any]) -> list[str]:
    header = [f"Paper test-dev / test-std {PAPER_MARK}", "Params", "FLOPs / sample", "Train samples/s",
              "Train + eval time / trial"]
    if _has_time_account(tables):
        header.append("Start-up / train / eval per trial")
    return header + ["Best epoch (per seed)"]


def table1(tables: dict[str, Any]) -> Table:
    """Table 1: one row per main variant."""
    cells = [tables["cells"][c] for c in tables["tables"]["table1"]]
    types = tables["answer_types"]
    show_last = any(r["last_differs"] for r in cells)
    acc, per_type, what = metric_label(tables)
    header = ["Variant", "Seeds", f"{acc} (best epoch) mean ± std", "95% CI over seeds"]
    header += [f"{TYPE_LABELS.get(t, t.replace('_', ' '))} {per_type}" for t in types]
    if show_last:
        header.append(f"{acc} (last epoch)")
    header += _common_header(tables)
    rows = []
    for r in cells:
        line = [r["label"], seeds_cell(r), mean_std(r["acc"]), interval(r["acc"])]
        line += [mean_std(r["acc_by_type"].get(t, {})) for t in types]
        if show_last:
            line.append(mean_std(r["acc_last"]))
        rows.append(line + _common_columns(r, tables))
    notes = _table_notes(cells)
    if not show_last and cells:
        notes.append("Last-epoch accuracy equals best-epoch accuracy for every trial (the best epoch was the last).")
    return _table("table1", f"Table 1: {what} on the evaluation split (percent)", header, rows,
                  ["l", "r"] + ["r"] * (len(header) - 2), notes)


def table2(tables: dict[str, Any], key: str = "table2", title: str | None = None) -> Table:
    """Table 2: the ablations, with the difference from the reference cell."""
    cells = [tables["cells"][c] for c in tables["tables"][key]]
    ref_label = _label(tables, tables["reference"])
    show_last = any(r["last_differs"] for r in cells)
    acc, _, _ = metric_label(tables)
    header = ["Variant", "Seeds", f"{acc} (best epoch) mean ± std", "95% CI over seeds"]
    if show_last:
        header.append(f"{acc} (last epoch)")
    header += [f"Δ vs {ref_label} over seeds (pp) [95% CI]", "Verdict (seeds as the unit)"] + _common_header(tables)
    rows = []
    for r in cells:
        line = [r["label"], seeds_cell(r), mean_std(r["acc"]), interval(r["acc"])]
        if show_last:
            line.append(mean_std(r["acc_last"]))
        line += [delta(r["vs_reference"]), verdict(r["vs_reference"], ref_label)]
        rows.append(line + _common_columns(r, tables))
    title = title or "Table 2: ablations (percent)"
    return _table(key, title, header, rows, ["l", "r"] + ["r"] * (len(header) - 2), _table_notes(cells))


def _pretrain_tasks(cells: list[dict[str, Any]]) -> list[str]:
    from reports.tables import pretrain_task_order

    return pretrain_task_order({t for r in cells if r["pretrain"] for t in r["pretrain"]["tasks"]})


def _stat(s: dict[str, Any] | None, digits: int) -> str:
    """``mean ± std`` of a raw (unscaled) summary; ``± n/a`` with one seed."""
    return mean_std(s or {}, scale=1.0, digits=digits) if s else DASH


def table3(tables: dict[str, Any]) -> Table:
    """Table 3: pretraining task weightings: downstream VQA accuracy, final per-task losses and weights."""
    cells = [tables["cells"][c] for c in tables["tables"]["table3"]]
    ref = tables.get("reference_table3")
    ref_label = _label(tables, ref) if ref else "equal weights"
    tasks = _pretrain_tasks(cells)
    acc, _, what = metric_label(tables)
    header = ["Variant", "Seeds", "Pretraining", f"{acc} (best epoch) mean ± std", "95% CI over seeds",
              f"Δ vs {ref_label} over seeds (pp) [95% CI]", "Verdict (seeds as the unit)"]  # fmt: skip
    header += [f"{PRETRAIN_TASK_LABELS.get(t, t)} loss (held-out)" for t in tasks]
    header += [f"{PRETRAIN_TASK_LABELS.get(t, t)} weight" for t in tasks]
    header += ["Pretraining time / trial", "Train + eval time / trial"]
    rows = []
    for r in cells:
        pre = r["pretrain"]
        if pre is None:
            what = "none"
        else:
            epochs = "/".join(str(e) for e in pre["epochs"])
            what = f"{pre['weighting']}, {epochs} epoch{'s' if pre['epochs'] != [1] else ''}"
        comp = r.get("vs_equal")
        line = [r["label"], seeds_cell(r), what, mean_std(r["acc"]), interval(r["acc"]),
                delta(comp) if comp else (DASH if r["cell"] != ref else "reference"),
                verdict(comp, ref_label) if comp else DASH]  # fmt: skip
        losses = (pre or {}).get("eval_loss") or {}
        if pre and not any(s and s["n"] for s in losses.values()):
            losses = pre["loss"]  # a corpus without a held-out split: training losses
        line += [_stat(losses.get(t), 3) if pre else DASH for t in tasks]
        line += [_stat(pre["weight"].get(t), 2) if pre else DASH for t in tasks]
        line += [duration(pre["time_s"]) if pre else DASH, duration(r["wall_s"])]
        rows.append(line)
    notes = [DEFINITIONS["pretraining"]]
    if ref is None and cells:
        notes.append("No equal-weights pretraining cell in this sweep: no paired comparison was made.")
    if any(r["pretrain"] and r["pretrain"]["weighting_frac"]["n"] for r in cells):
        fracs = ", ".join(f"{r['label']}: {100 * r['pretrain']['weighting_frac']['mean']:.1f}%" for r in cells
                          if r["pretrain"] and r["pretrain"]["weighting_frac"]["n"])  # fmt: skip
        notes.append("Share of the last pretraining epoch spent computing task weights (`pretrain/weighting_frac`): "
                     + fracs + ".")
    notes += [n for n in _table_notes(cells)[1:]]  # partial / not-run notes; no paper numbers to mark
    task = (tables.get("task") or {}).get("name", "VQA")  # GQA / NLVR2 sweeps: reports/task_tables.py
    return _table("table3", f"Table 3: pretraining task weighting, then {task} fine-tuning ({what} in percent)",
                 header, rows, ["l", "r", "l"] + ["r"] * (len(header) - 3), notes)


def _table_notes(cells: list[dict[str, Any]]) -> list[str]:
    notes = [f"{PAPER_MARK} The paper's numbers (Bhargava 2020): VQA v2 test-dev / test-std with LXMERT-base on "
             "the paper's data. They are not comparable with ours unless this sweep ran the paper preset "
             "on VQA v2; they are printed for orientation only."]
    partial = [r for r in cells if r["status"] in ("partial", "no finished trial")]
    if partial:
        notes.append(f"{PARTIAL_MARK} Seeds missing or failed: "
                     + "; ".join(f"{r['label']} ({r['n']}/{r['n_planned']})" for r in partial)
                     + ". Means are over the finished seeds only; see 'Incomplete'.")
    pending = [r for r in cells if r["status"] == "not run"]
    if pending:
        notes.append("Not run: " + "; ".join(f"{r['label']}: {r['pending']}" for r in pending))
    return notes


def comparisons_table(tables: dict[str, Any]) -> Table:
    """Every comparison (each cell vs the reference; LayerDrop vs its baseline), seeds as the unit."""
    header = ["Variant", "Compared with", "Seeds", "Δ over seeds (pp) [95% CI]", "p", "Holm p",
              "P(improve)", "MDE (pp)", "Seeds for paper Δ", "Verdict",
              "Same runs, question resampling only: Δ (pp) [95% CI] p"]
    rows = []
    for comp in tables["comparisons"]:
        t = comp["seed_test"]
        ref_label = _label(tables, comp["reference"])
        seeds = ", ".join(str(s) for s in t["seeds"]) or DASH
        if t["p_value"] is not None and not t["paired"]:
            seeds += " (unpaired)"
        need = DASH
        if t["paper_effect"] is not None:
            need = (f"{t['seeds_for_paper_effect']} for {100 * t['paper_effect']:+.2f}"
                    if t["seeds_for_paper_effect"] else f"n/a for {100 * t['paper_effect']:+.2f}")
        rows.append([
            _label(tables, comp["variant"]), ref_label, seeds, delta(comp), p_text(t["p_value"]),
            p_text(t["p_holm"]),
            DASH if t["prob_improvement"] is None else f"{t['prob_improvement']:.2f}",
            pp(t["mde"]), need, verdict(comp, ref_label), bootstrap_delta(comp),
        ])
    notes = [DEFINITIONS["seed_test"], DEFINITIONS["bootstrap"]]
    return _table("comparisons", "Comparisons, seeds as the unit of replication", header, rows,
                 ["l", "l", "r", "r", "r", "r", "r", "r", "r", "l", "r"], notes)


def flags_table(tables: dict[str, Any]) -> Table | None:
    """Cells whose mechanism never engaged, cells still learning at their last epoch, trials whose
    best model answers some question types no better than the blind prior."""
    rows = []
    for r in tables["cells"].values():
        for d in r["degenerate"]:
            rows.append([r["label"], str(d["seed"]), "mechanism never engaged", _one_line(d["evidence"], 400)])
        if r["still_learning"]:
            gain = r["last_gain"]
            rows.append([r["label"], ", ".join(str(s) for s in r["still_learning"]), "still learning",
                         f"accuracy rose by {100 * gain['mean']:.2f} pp (mean over seeds) in the last epoch"
                         if gain and gain["n"] else ""])
        for d in r.get("at_prior", []):
            rows.append([r["label"], str(d["seed"]), f"at the blind prior on {100 * d['share']:.1f}% of questions",
                         _one_line(d["types"], 400)])
    if not rows:
        return None
    return _table("flags", "Cells whose numbers do not measure what their name says", ["Variant", "Seed(s)",
                 "Flag", "Evidence"], rows, ["l", "r", "l", "l"],
                 [DEFINITIONS["degenerate"], DEFINITIONS["learning"], DEFINITIONS["prior"]])


def attention_table(tables: dict[str, Any]) -> Table:
    """Every learned per-head statistic (whatever the trials logged) per cell and stack, first vs last epoch."""
    header = ["Variant", "Statistic", "Stack", "Mean (first epoch)", "Mean (last epoch)", "Min - max (last epoch)"]
    rows = []
    for a in tables["attention"]:
        show = stat_display(a["stat"])
        digits = show["digits"]
        rows.append([
            _label(tables, a["cell"]), show["label"], a["stack"],
            f"{a['mean_first']:.{digits}f} (epoch {a['first_epoch']})",
            f"{a['mean_last']:.{digits}f} (epoch {a['last_epoch']})",
            f"{a['min_last']:.{digits}f} - {a['max_last']:.{digits}f}",
        ])
    notes = ["Over every head (every layer and attention of the stack) and every finished seed."]
    for stat in dict.fromkeys(a["stat"] for a in tables["attention"]):
        if stat_display(stat).get("note"):
            notes[0] += " " + stat_display(stat)["note"]
    if any(not a["per_head"] for a in tables["attention"]):
        notes.append("Some runs logged no `stats/attention_heads.csv`; their rows use per-layer means "
                     "(min - max is then over layers).")
    return _table("attention", "Learned attention parameters", header, rows, ["l", "l", "l", "r", "r", "r"], notes)


def incomplete_table(tables: dict[str, Any]) -> Table:
    """Trials that were planned (or found) but are not averaged, and why."""
    header = ["Trial", "Cell", "Seed", "Status", "Reason"]
    rows = [[t["key"], t["cell"], DASH if t["seed"] is None else str(t["seed"]), t["status"],
             _one_line(t["reason"])] for t in tables["incomplete"]["trials"]]
    return _table("incomplete", "Trials not averaged", header, rows, ["l", "l", "r", "l", "l"])


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def document(tables: dict[str, Any], figures: dict[str, Any]) -> list[Block]:
    """The report as blocks, in reading order."""
    sw = tables["sweep"]
    blocks: list[Block] = [("h", 1, f"Ablation report: sweep `{sw['id']}`")]
    blocks.append(("ul", [
        f"Experiment `{sw['experiment']}`, parent run `{sw['parent_run_id']}`",
        f"Grid `{sw['grid'] or '?'}`, preset `{sw['preset'] or '?'}`, sweep status **{sw['status'] or '?'}**",
        f"Code: git `{sw['git_commit'] or '?'}`" + (" (dirty)" if sw["git_dirty"] == "true" else "")
        + f", source hash `{sw['source_hash'] or '?'}`",
        f"Trials: {sw['usable_trials']} of {sw['planned_trials']} planned are finished and averaged",
    ] + ([f"Sweep wall time {duration({'n': 1, 'mean': sw['wall_s']})}"
          + (f", {sw['concurrency']:.0f} trial(s) at once" if sw["concurrency"] else "")
          + (f", overhead ratio {sw['overhead_ratio']:.2f} (wall time of the trials phase / ideal)"
             if sw["overhead_ratio"] else "")] if sw["wall_s"] is not None else [])
       + _sweep_time_lines(sw)))
    inc = tables["incomplete"]
    if inc["trials"]:
        blocks.append(("p", f"**This sweep is incomplete:** {len(inc['trials'])} planned trial(s) are missing, "
                            "failed or unfinished and are not averaged. See 'Incomplete' below."))
    if inc["pending"]:
        blocks.append(("p", f"**Cells not run:** {len(inc['pending'])} cell(s) of the grid are declared but "
                            "not runnable yet. See 'Incomplete' below."))
    definitions = tables.get("definitions", DEFINITIONS)  # the accuracy text names the sweep's metric
    blocks.append(("p", "**Accuracy.** " + definitions["accuracy"] + " " + DEFINITIONS["answer_types"]))
    blocks.append(("p", "**Over seeds.** " + DEFINITIONS["over_seeds"]))
    if tables["tables"]["table1"]:
        blocks.append(("table", table1(tables)))
    if tables["tables"]["table2"]:
        blocks.append(("table", table2(tables)))
    if tables["tables"].get("table3"):
        blocks.append(("table", table3(tables)))
    if tables.get("finetuning"):
        from reports import finetuning

        blocks.append(("table", finetuning.table(tables)))
    if tables["tables"]["other"]:
        blocks.append(("table", table2(tables, "other", "Other cells (percent)")))
    if tables.get("task"):  # a sweep on GQA / NLVR2: the task's own table (reports/task_tables.py)
        from reports import task_tables

        blocks.append(("table", task_tables.table(tables)))
    if tables.get("decoupling"):
        from reports.decoupling import table as decoupling_table

        blocks.append(("table", decoupling_table(tables)))
    blocks.append(("h", 2, "Differences from " + (_label(tables, tables["reference"]) if tables["reference"]
                                                  else "softmax")))
    if tables["reference"] is None:
        blocks.append(("p", "No `softmax` cell in this sweep: no paired comparison was made."))
    elif tables["comparisons"]:
        blocks.append(("table", comparisons_table(tables)))
    else:
        blocks.append(("p", "No other cell has finished trials to compare."))
    flags = flags_table(tables)
    if flags is not None:
        blocks.append(("table", flags))
    if tables["attention"]:
        blocks.append(("table", attention_table(tables)))
    blocks.append(("h", 2, "Figures"))
    by_number: dict[int, list[dict[str, Any]]] = {}
    for f in figures["files"]:
        by_number.setdefault(f["figure"], []).append(f)
    for number in sorted({1, 2, 3, 4} | set(by_number) | {int(n) for n in figures["missing"]}):
        for f in by_number.get(number, []):
            blocks.append(("fig", f["file"], f["caption"]))
        if str(number) in figures["missing"]:
            blocks.append(("p", f"**Fig. {number}: no figure.** {figures['missing'][str(number)]}."))
    blocks.append(("h", 2, "Incomplete"))
    if not inc["trials"] and not inc["pending"]:
        blocks.append(("p", "Nothing: every planned trial finished and every declared cell ran."))
    if inc["pending"]:
        blocks.append(("ul", [f"**{p['label']}** (`{p['cell']}`) not run: {_one_line(p['reason'])}"
                              for p in inc["pending"]]))
    if inc["trials"]:
        blocks.append(("table", incomplete_table(tables)))
    if tables["notes"]:
        blocks.append(("h", 2, "Notes"))
        blocks.append(("ul", list(tables["notes"])))
    time_text = DEFINITIONS["throughput"] + " " + DEFINITIONS["wall_time"]
    if _has_time_account(tables):
        time_text += " " + DEFINITIONS["time_account"]
    blocks.append(("p", "**Throughput and time.** " + time_text))
    return blocks


def _sweep_time_lines(sw: dict[str, Any]) -> list[str]:
    """The header's lines on where the trials' time went (sweeps that log the time account only)."""
    lines = []
    acc = sw.get("time") or {}
    if acc:
        names = {"startup_s": "start-up", "train_s": "train", "eval_s": "eval", "checkpoint_s": "checkpoint",
                 "other_s": "other"}
        lines.append("Trials' time, summed over trials: " + ", ".join(
            f"{names.get(a, a)} {duration({'n': 1, 'mean': v})}" for a, v in acc.items()))
    parts = []
    if sw.get("goodput") is not None:
        parts.append(f"goodput {sw['goodput']:.2f} (share of the trials' time in training and evaluation steps, "
                     "`sweep/goodput`)")
    if sw.get("wall_over_ideal") is not None:
        parts.append(f"wall time over ideal {sw['wall_over_ideal']:.2f} (trials phase / time if every slot only "
                     "ran steps; 1 is perfect, `sweep/wall_over_ideal`)")
    if parts:
        lines.append("Sweep efficiency: " + "; ".join(parts))
    return lines


def frames(tables: dict[str, Any], figures: dict[str, Any] | None = None) -> dict[str, pd.DataFrame]:
    """Every table of the report as a DataFrame of formatted cells, keyed by table id.

    Args:
        tables: From :func:`reports.tables.compute` (or a loaded ``tables.json``).
        figures: The figure list (only captions use it; default none).
    """
    blocks = document(tables, figures or {"files": [], "missing": {}})
    return {b[1].key: b[1].frame for b in blocks if b[0] == "table"}


# --------------------------------------------------------------------------------------------
# renderers
# --------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    """Markdown (GitHub flavour); figures are relative links into ``figures/``."""
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "fig":
            out.append(f"![{block[2]}]({block[1]})\n\n*{block[2]}*")
        elif kind == "table":
            t: Table = block[1]
            lines = [f"### {t.title}", "", "| " + " | ".join(_md_cell(h) for h in t.header) + " |",
                     "|" + "|".join("---:" if a == "r" else "---" for a in t.align) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
            if not t.rows:
                lines.append("| " + " | ".join(["(none)"] + [""] * (len(t.header) - 1)) + " |")
            if t.notes:
                lines.append("")
                lines += [f"{n}  " for n in t.notes[:-1]] + [t.notes[-1]]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 1.6em; border-bottom: 1px solid #eee; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; font-size: .92em; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: .86em; margin: .4em 0; }
th, td { border: 1px solid #d0d0d0; padding: .3em .55em; white-space: nowrap; }
th { background: #f0f3f7; text-align: center; white-space: normal; min-width: 4em; max-width: 11em; }
td.r { text-align: right; font-variant-numeric: tabular-nums; }
td.l { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
p.note { font-size: .82em; color: #555; margin: .2em 0; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .88em; color: #444; }
"""


def to_html(blocks: list[Block], base: Path, title: str) -> str:
    """A self-contained HTML page: inline CSS, figures embedded as base64 data URIs.

    Args:
        blocks: From :func:`document`.
        base: Folder the figure paths are relative to.
        title: The page title.
    """
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{_inline_html(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "fig":
            data = base64.b64encode((base / block[1]).read_bytes()).decode("ascii")
            alt = html.escape(block[2])
            out.append(f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_inline_html(block[2])}</figcaption></figure>")
        elif kind == "table":
            t: Table = block[1]
            rows = ["<tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in t.header) + "</tr>"]
            for row in t.rows:
                rows.append("<tr>" + "".join(f'<td class="{a}">{_inline_html(c)}</td>'
                                             for c, a in zip(row, t.align)) + "</tr>")
            if not t.rows:
                rows.append(f'<tr><td class="l" colspan="{len(t.header)}">(none)</td></tr>')
            notes = "".join(f'<p class="note">{_inline_html(n)}</p>' for n in t.notes)
            out.append(f'<h3>{_inline_html(t.title)}</h3><div class="table-wrap"><table id="{t.key}">'
                       + "".join(rows) + f"</table></div>{notes}")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


_TEX_REPLACE = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "Δ": r"$\Delta$", "—": "--", "†": r"$^\dagger$", "‡": r"$^\ddagger$",
    "<": r"$<$", ">": r"$>$", "…": "...",
}


def tex_escape(text: str) -> str:
    """LaTeX-escape plain text (inline ``**`` / backticks are dropped)."""
    text = text.replace("**", "").replace("`", "")
    return "".join(_TEX_REPLACE.get(ch, ch) for ch in text)


def to_latex(blocks: list[Block], sweep_id: str) -> str:
    """Every table of the report as a LaTeX ``table`` (needs ``booktabs``; wide ones ``graphicx``)."""
    out = [f"% Tables of sweep {tex_escape(sweep_id)}, generated by `python -m reports`.",
           "% Needs \\usepackage{booktabs} and \\usepackage{graphicx} in the preamble.", ""]
    for block in blocks:
        if block[0] != "table":
            continue
        t: Table = block[1]
        spec = "".join(t.align)
        out += [r"\begin{table}[t]", r"\centering", r"\small",
                rf"\caption{{{tex_escape(t.title)}}}", rf"\label{{tab:{t.key}}}",
                r"\resizebox{\textwidth}{!}{%", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                " & ".join(tex_escape(h) for h in t.header) + r" \\", r"\midrule"]
        out += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in t.rows]
        if not t.rows:
            out.append(rf"\multicolumn{{{len(t.header)}}}{{l}}{{(none)}} \\")
        out += [r"\bottomrule", r"\end{tabular}}"]
        for note in t.notes:
            out.append(r"\par\smallskip\footnotesize " + tex_escape(note))
        out += [r"\end{table}", ""]
    return "\n".join(out)
