"""The `decoupling` grid's smoke version end to end (issue 16): a real sweep on the session's Ray head
into a real MLflow store, two cells (Hendricks' base: merged attention, ITM + MLM + MRM, scored by the
ITM head; a contrastive loss set scored by embeddings) x one seed, each pretraining, then the zero-shot retrieval stage, then VQA
fine-tuning; the report built from the store carries the decoupling table with the runs' numbers."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from test_sweep_integration import ABLATION, sweep_runs

import schema

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CELLS = ("base", "contrastive_embedding")  # two trials: one round of the 2-CPU CI machine
SMOKE = ["model.x_layers=2", "retrieval.images=24", "pretrain.corpus_images=128", "pretrain.corpus_eval_images=32",
         "train.epochs=1", "data.train_limit=512", "data.eval_limit=128"]


def test_decoupling_smoke_grid_runs_and_its_table_is_in_the_report(ray_head, tmp_path):
    runs = tmp_path / "runs"
    args = [*ABLATION, "--preset", "smoke", "--grid", "decoupling", "--cells", ",".join(CELLS), "--name", "dec",
            "--runs-dir", str(runs), *SMOKE]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=tmp_path, env=ray_head.env(), capture_output=True, text=True, timeout=600)
    print(f"decoupling smoke grid: {len(CELLS)} trials, {time.perf_counter() - t0:.0f} s wall")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    for cell in CELLS:  # the driver's progress line of each trial's retrieval stage
        assert re.search(rf"{cell}-s0 +zero-shot retrieval: i2t_r1 [0-9.]+ t2i_r1 [0-9.]+ rsum", proc.stdout), cell
    client, _, children = sweep_runs(f"sqlite:///{runs / 'mlflow.db'}", "dec")
    by_cell = {r.data.tags["trial.cell"]: r for r in children}
    assert sorted(by_cell) == sorted(CELLS) and all(r.info.status == "FINISHED" for r in children)
    for cell, run in by_cell.items():
        m = run.data.metrics
        assert m[f"{schema.RETRIEVAL_PREFIX}n_images"] == 24 and m[f"{schema.RETRIEVAL_PREFIX}n_texts"] == 48
        assert 0 <= m[f"{schema.RETRIEVAL_PREFIX}rsum"] <= 600 and "best/acc" in m
        assert [h.step for h in client.get_metric_history(run.info.run_id, schema.RETRIEVAL_EPOCH)] == [0]
        assert run.data.tags["retrieval.scoring"] == ("embedding" if cell == "contrastive_embedding" else "itm")

    tables = json.loads((runs / "reports" / "dec" / "tables.json").read_text())
    d = tables["decoupling"]
    assert d["reference"] == "base" and d["order"] == list(CELLS)
    for cell, run in by_cell.items():
        row = d["cells"][cell]
        assert row["retrieval"]["rsum"]["values"] == [run.data.metrics[f"{schema.RETRIEVAL_PREFIX}rsum"]]
        assert row["acc"]["values"] == [run.data.metrics["best/acc"]]
    report = (runs / "reports" / "dec" / "report.md").read_text()
    assert "Attention flow and pretraining losses: zero-shot retrieval and VQA accuracy" in report
