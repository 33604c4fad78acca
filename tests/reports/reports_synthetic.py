"""A realistic sweep written to a real MLflow store with the sweep's own writer.

Until the smoke sweep can run inside the tests, the report is tested on stores filled here through
``sweeps.tracking.SweepTracker`` / ``TrialTracker`` exactly as ``docs/tracking.md`` describes a
sweep: a parent run with ``sweep.*`` tags, one child run per trial with its tags, params, per-epoch
metrics and the three artifacts, a failed trial, a trial that never started and a pending cell.

The numbers are generated from per-question outcomes, so that ``eval/acc`` equals the mean score
of ``eval/predictions.csv`` at the best epoch, as in a real trial.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import schema
from sweeps.tracking import SweepTracker, TrialTracker, csv_text

HEADS = 2
ANSWERS = ["yes", "no", "2", "3", "red", "blue", "circle", "square"]


@dataclass
class CellSpec:
    """One grid cell of the synthetic sweep."""

    label: str
    table: int
    skill: list[float]  # evaluation accuracy per epoch (before per-question noise)
    paper: dict[str, float] = field(default_factory=dict)
    layers: tuple[int, int, int] = (3, 2, 2)  # l, x, r
    attention: str = "softmax"
    layerdrop: str = "none"
    pending: str = ""
    pretrain: str = ""  # a task weighting: the trial pretrains first (two pretraining epochs logged)
    seed_shift: dict[int, float] = field(default_factory=dict)  # extra skill per seed
    redraw: float = 0.1  # share of questions whose difficulty this cell draws on its own
    engaged: bool | None = None  # the mechanism.engaged tag the trial writes (None: no tag)
    extra_stats: tuple[str, ...] = ()  # per-head statistics of a normaliser the report has never heard of
    at_prior: float = 0.0  # share of evaluation questions in types answered no better than the blind prior


#: Mirrors sweeps/grids/paper.yaml at a tiny size. entmax is softmax plus a hair (no
#: significant difference); the LayerDrop cells are clearly worse; softmax peaks before its last
#: epoch (best != last).
PAPER_LIKE: dict[str, CellSpec] = {
    "softmax": CellSpec("LXMERT softmax", 1, [0.60, 0.74, 0.72], {"test_dev": 72.42, "test_std": 72.54}),
    "span": CellSpec("Adaptive span", 1, [0.58, 0.70, 0.73], {"test_dev": 71.62, "test_std": 71.72},
                     attention="span"),
    "entmax": CellSpec("Adaptive sparse (learned-alpha entmax)", 1, [0.60, 0.74, 0.722],
                       {"test_dev": 71.73, "test_std": 71.97}, attention="entmax"),
    "layerdrop_1066": CellSpec("LayerDrop 10-6-6, p=1", 1, [0.40, 0.50, 0.55], {"test_dev": 66.4, "test_std": 66.72},
                               layers=(4, 3, 3), layerdrop="fixed"),
    "span_entmax": CellSpec("Adaptive span + entmax", 2, [0.50, 0.60, 0.62], {"test_dev": 63.07, "test_std": 63.33},
                            attention="span_entmax"),
    "base_1066": CellSpec("10-6-6 without LayerDrop", 2, [0.62, 0.73, 0.75], {"test_dev": 66.35, "test_std": 66.57},
                          layers=(4, 3, 3)),
    "layerdrop_955": CellSpec("LayerDrop 9-5-5, p=1", 2, [0.42, 0.52, 0.56], {"test_dev": 66.51, "test_std": 66.81},
                              layerdrop="fixed"),
    "grad_std": CellSpec("Gradient-std task weighting", 2, [], pending="needs the multi-task pretraining stage"),
}

#: Mirrors sweeps/grids/weighting.yaml: a from-scratch reference and the four weightings (Table 3).
WEIGHTING_LIKE: dict[str, CellSpec] = {
    "softmax": CellSpec("No pretraining (fine-tuning from scratch)", 3, [0.50, 0.60, 0.62]),
    "equal": CellSpec("Equal weights (LXMERT)", 3, [0.60, 0.70, 0.72], pretrain="equal"),
    "grad_std": CellSpec("Gradient-std weights", 3, [0.62, 0.72, 0.80], pretrain="grad_std"),
    "uncertainty": CellSpec("Uncertainty weights (Kendall et al. 2018)", 3, [0.60, 0.70, 0.721],
                            pretrain="uncertainty"),
    "gradnorm": CellSpec("GradNorm (Chen et al. 2018)", 3, [0.55, 0.62, 0.64], pretrain="gradnorm"),
}
PRETRAIN_TASKS = ("mlm", "mor", "match", "qa")


def pretrain_metrics(cell: str, weighting: str, seed: int, epoch: int) -> dict[str, float]:
    """One pretraining epoch's metrics as ``sweeps.pretrain`` logs them (deterministic numbers)."""
    rng = np.random.default_rng([seed, epoch, sum(map(ord, cell))])
    base = {"mlm": 4.0, "mor": 3.0, "match": 0.69, "qa": 2.0}
    raw = rng.uniform(0.5, 1.5, 4) if weighting != "equal" else np.ones(4)
    weights = raw * 4 / raw.sum() if weighting in ("grad_std", "gradnorm") else raw
    out = {"pretrain/loss": float(sum(base.values())) / epoch, "pretrain/epoch_s": 30.0,
           "pretrain/time_s": 31.0 * epoch, "pretrain/weighting_frac": 0.0 if weighting == "equal" else 0.15,
           "pretrain/samples_per_s": 300.0}
    for (t, b), w in zip(base.items(), weights):
        out[f"pretrain/loss_{t}"] = b / epoch + 0.01 * seed
        out[f"pretrain/eval_loss_{t}"] = b / epoch + 0.02 * seed + 0.05
        out[f"pretrain/weight_{t}"] = float(w)
    out["pretrain/loss_mor_feat"] = 0.3 / epoch  # a component: not a task of its own
    return out


@dataclass
class SweepSpec:
    """What to write: cells, seeds, epochs, and which trials fail or never start."""

    cells: dict[str, CellSpec] = field(default_factory=lambda: dict(PAPER_LIKE))
    seeds: tuple[int, ...] = (0, 1)
    epochs: int = 3
    n_questions: int = 400
    failed: tuple[str, ...] = ("layerdrop_955-s1",)  # run FAILED after one epoch
    missing: tuple[str, ...] = ("base_1066-s1",)  # never got a run
    running: tuple[str, ...] = ()  # run left RUNNING after one epoch (driver died, or still going)
    finish_sweep: bool = True  # False: the parent stays RUNNING with sweep.status=running
    n_examples: int = 4
    time_account: bool = False  # log issue 12's time/* accounts per trial and sweep/* on the parent
    legacy_aliases: bool = False  # tag trials as runs before the schema did: `variant` / `seed` only


def _answer_types(n: int) -> list[str]:
    rng = np.random.default_rng(7)
    return list(rng.choice(["yes/no", "number", "other"], size=n, p=[0.4, 0.15, 0.45]))


def _scores(skill: float, seed: int, epoch: int, n: int, cell: str, redraw_share: float = 0.1) -> np.ndarray:
    """Per-question soft scores: a question is right when its (seed, epoch) difficulty is below
    the skill. Shared difficulties make cells of similar skill agree on most questions (as real
    variants do); 10% of the questions are redrawn per cell, so they also disagree both ways."""
    rng = np.random.default_rng([seed, epoch])
    difficulty = rng.random(n)
    soft = rng.choice([1.0, 0.9, 0.6, 0.3], size=n, p=[0.85, 0.05, 0.05, 0.05])
    own = np.random.default_rng([seed, epoch, sum(map(ord, cell))])
    redraw = own.random(n) < redraw_share
    difficulty[redraw] = own.random(int(redraw.sum()))
    return np.where(difficulty < skill, 1.0, 0.0) * soft


def _arch_stats(layers: tuple[int, int, int], attention: str, epoch: int, seed: int,
                extra: tuple[str, ...] = ()) -> dict[str, list[float]]:
    """``{"<stack>/<layer>/<attention>/<stat>": per-head values}`` as ``collect_stats`` returns."""
    out: dict[str, list[float]] = {}
    l_layers, x_layers, r_layers = layers
    sites = [("lang", i, "self") for i in range(l_layers)] + [("visn", i, "self") for i in range(r_layers)]
    sites += [("cross", i, a) for i in range(x_layers) for a in ("cross", "lang_self", "visn_self")]
    rng = np.random.default_rng([seed, epoch, 99])
    for stack, layer, att in sites:
        if "span" in attention:
            start = 20.0 if stack == "lang" else 36.0
            # single-modality spans shrink, cross-modal ones grow (the paper's observation)
            trend = -3.0 if stack != "cross" else 2.0
            out[f"{stack}/{layer}/{att}/span"] = [
                float(max(1.0, start + trend * epoch + rng.normal(0, 0.5))) for _ in range(HEADS)]
        if "entmax" in attention:
            target = 1.8 if stack == "lang" else 1.3
            out[f"{stack}/{layer}/{att}/alpha"] = [
                float(np.clip(1.5 + (target - 1.5) * epoch / 3 + rng.normal(0, 0.02), 1.01, 2.0)) for _ in range(HEADS)]
        for stat in extra:
            out[f"{stack}/{layer}/{att}/{stat}"] = [float(0.5 + 0.1 * epoch + rng.normal(0, 0.05)) for _ in range(HEADS)]
    return out


def _flat_config(spec: CellSpec, seed: int, epochs: int) -> dict[str, Any]:
    l_layers, x_layers, r_layers = spec.layers
    return {
        "pretrain.enabled": bool(spec.pretrain), "pretrain.weighting": spec.pretrain or "equal",
        "model.l_layers": l_layers, "model.x_layers": x_layers, "model.r_layers": r_layers,
        "model.hidden_size": 32, "model.num_heads": HEADS,
        "model.attention.name": spec.attention, "model.attention.stacks": "lang,visn,cross",
        "model.layerdrop.mode": spec.layerdrop, "model.layerdrop.n_drop": 1,
        "data.name": "synthetic", "train.seed": seed, "train.epochs": epochs, "train.n_examples": 4,
        "resources.num_workers": 1,
    }


def fill_sweep(uri: str, runs_dir: Path, sweep_id: str = "smoke-paper", experiment: str = "adaptive-ablation",
               spec: SweepSpec | None = None) -> dict[str, Any]:
    """Write one sweep; returns ``{"parent_run_id", "trials", "run_ids": {key: run id}}``."""
    spec = spec or SweepSpec()
    runnable = [c for c, s in spec.cells.items() if not s.pending]
    trials = [f"{c}-s{seed}" for c in runnable for seed in spec.seeds]
    cells_tag = {c: {"label": s.label, "table": s.table, "paper": s.paper, "pending": s.pending}
                 for c, s in spec.cells.items()}
    pending = {c: s.pending for c, s in spec.cells.items() if s.pending}
    sweeper = SweepTracker(uri, experiment, sweep_id, runs_dir)
    parent = sweeper.start({
        "sweep.grid": "paper", "sweep.preset": "smoke", "sweep.fingerprint": "f00d",
        "sweep.trials": json.dumps(trials), "sweep.cells": json.dumps(cells_tag),
        "sweep.pending": json.dumps(pending), "sweep.status": "running",
        "git.commit": "0123456789abcdef", "git.dirty": "false", "source.hash": "cafe",
    }, {"preset": "smoke", "grid": "paper", "n_trials": len(trials)})
    context = {"tracking_uri": uri, "experiment_id": sweeper.experiment_id, "parent_run_id": parent,
               "sweep_id": sweep_id, "tags": {"sweep.grid": "paper", "sweep.preset": "smoke", "grid": "paper",
                                              "git.commit": "0123456789abcdef", "source.hash": "cafe"}}
    types = _answer_types(spec.n_questions)
    qids = np.arange(1000, 1000 + spec.n_questions)
    failed: dict[str, str] = {}
    run_ids: dict[str, str] = {}
    accounts: dict[str, dict[str, float]] = {}
    for key in trials:
        cell, seed = key.rsplit("-s", 1)
        seed_i = int(seed)
        cs = spec.cells[cell]
        if key in spec.missing:
            failed[key] = "RayActorError: the worker died before the trial started"
            continue
        tracker = TrialTracker(context, key)
        who = ({schema.LEGACY_ALIASES[schema.TRIAL_CELL]: cell, schema.LEGACY_ALIASES[schema.TRIAL_SEED]: seed}
               if spec.legacy_aliases else {schema.TRIAL_CELL: cell, schema.TRIAL_SEED: seed})
        tags = {**who, schema.TRIAL_AXES: json.dumps({"cell": cell, "train.seed": seed_i}),
                schema.CELL_LABEL: cs.label, schema.CELL_TABLE: str(cs.table),
                **{f"paper.{k}": str(v) for k, v in cs.paper.items()}}
        run_ids[key] = tracker.start(tags, _flat_config(cs, seed_i, spec.epochs))
        n_params = 1e6 * sum(cs.layers)
        tracker.log_metrics({"model/params": n_params, "model/flops_per_sample": 2.5 * n_params,
                             "data/train_questions": 4000.0, "data/eval_questions": float(spec.n_questions)})
        tracker.set_tags({"trial.precision": "fp32", "trial.device": "cpu", "trial.world_size": "1"})
        if cs.engaged is not None:
            tracker.set_tags({"mechanism.engaged": str(cs.engaged).lower(),
                              "mechanism.evidence": "synthetic: " + ("spans fell below 5 tokens" if cs.engaged
                                                                     else "span never below 12 tokens")})
        if cs.pretrain:
            for epoch in (1, 2):
                tracker.log_stage_epoch("pretrain/epoch", epoch, pretrain_metrics(cell, cs.pretrain, seed_i, epoch))
        best = {"acc": -1.0, "epoch": 0}
        head_rows: list[dict[str, Any]] = []
        elapsed = 0.0
        epochs = 1 if key in spec.failed or key in spec.running else spec.epochs
        for epoch in range(1, epochs + 1):
            skill = cs.skill[epoch - 1] + 0.01 * seed_i + cs.seed_shift.get(seed_i, 0.0)
            scores = _scores(skill, seed_i, epoch, spec.n_questions, cell, cs.redraw)
            acc = float(scores.mean())
            metrics = {"train/loss": 3.0 / epoch, "train/aux_loss": 0.01 if "span" in cs.attention else 0.0,
                       "train/lr": 1e-4, "train/epoch_s": 10.0 + seed_i, "train/steps": 100.0 * epoch,
                       "train/samples_per_s": 400.0 - 10 * epoch + 5 * seed_i - 30 * sum(cs.layers),
                       "eval/acc": acc, "eval/loss": 1.0 / epoch, "eval/n": float(spec.n_questions)}
            for t in ("yes/no", "number", "other"):
                mask = np.array([x == t for x in types])
                metrics[f"eval/acc_{t.replace('/', '_')}"] = float(scores[mask].mean())
            stats = _arch_stats(cs.layers, cs.attention, epoch, seed_i, cs.extra_stats)
            for k, values in stats.items():
                stack, layer, att, stat = k.split("/")
                metrics[f"{stat}/{stack}/{layer}/{att}"] = float(np.mean(values))
                metrics[f"{stat}/{stack}/{layer}/{att}_max"] = float(np.max(values))
                head_rows += [dict(epoch=epoch, stack=stack, layer=int(layer), attention=att, stat=stat,
                                   head=h, value=v) for h, v in enumerate(values)]
            if cs.layerdrop != "none":
                for stack, n in zip(("lang", "cross", "visn"), cs.layers):
                    metrics[f"layers/{stack}_ran"] = float(n - 1)
            improved = acc > best["acc"]
            if improved:
                best = {"acc": acc, "epoch": epoch}
            elapsed += 12.0 + seed_i
            metrics.update({"best/acc": best["acc"], "best/epoch": float(best["epoch"]), "time/elapsed_s": elapsed})
            if cs.at_prior:
                metrics[schema.EVAL_AT_PRIOR_SHARE] = cs.at_prior
                if improved:
                    tracker.set_tags({schema.EVAL_AT_PRIOR: "has color: 88.2% vs prior 88.2% (3246 questions)"})
            tracker.log_epoch(epoch, metrics)
            if head_rows:
                tracker.log_text(csv_text(head_rows), "stats/attention_heads.csv")
            if improved:
                lines = ["question_id,answer,score,answer_type,question_type"]
                lines += [f"{q},yes,{s:.4f},{t},what" for q, s, t in zip(qids, scores, types)]
                tracker.log_text("\n".join(lines) + "\n", "eval/predictions.csv")
                tracker.log_dict(_examples(qids, cs, seed_i, epoch, spec.n_examples), "eval/examples_top5.json")
        if key in spec.failed:
            failed[key] = "RuntimeError: CUDA out of memory (synthetic failure)"
            tracker.finish("FAILED")
            continue
        if key in spec.running:
            continue
        tracker.log_metrics({"time/trial_s": elapsed, "best/acc": best["acc"], "best/epoch": float(best["epoch"])},
                            step=spec.epochs)
        if spec.time_account:
            account = time_account(cell, seed_i)
            accounts[key] = account
            tracker.log_metrics({f"time/{k}": v for k, v in account.items()}, step=spec.epochs)
        tracker.finish("FINISHED")
    if not spec.finish_sweep:
        return {"parent_run_id": parent, "trials": trials, "run_ids": run_ids, "failed": failed}
    status = "complete" if not failed else "incomplete"
    sweep_metrics = {"sweep/wall_s": 100.0, "sweep/trials_wall_s": 90.0, "sweep/ideal_s": 80.0,
                     "sweep/overhead_ratio": 1.125, "sweep/concurrency": 2.0}
    if spec.time_account:
        # What sweeps/ablation.py logs: the accounts summed over trials, goodput and wall over ideal.
        sums = {k: float(sum(a[k] for a in accounts.values())) for k in TIME_ACCOUNTS}
        total = sum(sums.values())
        sweep_metrics.update({f"sweep/{k}": v for k, v in sums.items()})
        ideal = (sums["train_s"] + sums["eval_s"]) / 2.0
        sweep_metrics.update({"sweep/trials_sum_s": total, "sweep/goodput": (sums["train_s"] + sums["eval_s"]) / total,
                              "sweep/step_ideal_s": ideal, "sweep/wall_over_ideal": 90.0 / ideal})
    sweeper.finish("FINISHED" if not failed else "FAILED", sweep_metrics,
                   {"sweep.status": status, "sweep.failed": json.dumps(failed)})
    return {"parent_run_id": parent, "trials": trials, "run_ids": run_ids, "failed": failed,
            "accounts": accounts, "sweep_metrics": sweep_metrics}


TIME_ACCOUNTS = ("startup_s", "train_s", "eval_s", "checkpoint_s", "other_s")


def time_account(cell: str, seed: int) -> dict[str, float]:
    """One trial's ``time/*`` account (seconds; deterministic, different per cell and seed)."""
    rng = np.random.default_rng([seed, sum(map(ord, cell))])
    return {"startup_s": float(rng.uniform(5, 15)), "train_s": float(rng.uniform(60, 200)),
            "eval_s": float(rng.uniform(10, 30)), "checkpoint_s": float(rng.uniform(1, 3)),
            "other_s": float(rng.uniform(1, 5))}


def _examples(qids: np.ndarray, cs: CellSpec, seed: int, epoch: int, n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, epoch, len(cs.label)])
    out = []
    for q in qids[:n]:
        probs = np.sort(rng.random(5))[::-1]
        picks = rng.choice(len(ANSWERS), size=5, replace=False)
        out.append({"question_id": int(q), "question": f"What is shown in image {int(q) % 7}?",
                    "gold": {ANSWERS[int(q) % len(ANSWERS)]: 1.0, ANSWERS[(int(q) + 1) % len(ANSWERS)]: 0.3},
                    "top5": [{"answer": ANSWERS[int(a)], "prob": float(p)} for a, p in zip(picks, probs)]})
    return out
