"""The `finetuning` grid end to end: a smoke sweep on a real Ray head into a real MLflow store, and the
report's fine-tuning table and usage heatmap built from that store (numbers checked against MLflow).

CI runs the four cells the reference code reported on VQA v2 (standard, frozen, SpotTune_Block,
SpotTune) x 2 seeds, to stay within its time budget; `last_k` and `spottune_res` run through the same
loop in tests/sweeps/test_finetune_loop.py. The data cache is the default one, which the session's
smoke sweep has filled (easy-VQA's features are extracted once).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
CELLS = ["standard", "frozen", "spottune_block", "spottune"]
#: The smoke preset shrunk to CI size: 2-1-1 layers, 256 questions, one epoch of each stage.
SHRINK = ["model.l_layers=2", "model.r_layers=1", "model.x_layers=1", "data.train_limit=256", "data.eval_limit=64",
          "train.epochs=1", "pretrain.corpus_images=48", "pretrain.corpus_eval_images=8"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_finetuning_smoke_sweep_fills_the_report_table_and_heatmap(ray_head, tmp_path):
    runs = tmp_path / "runs"
    args = [sys.executable, str(ROOT / "sweeps" / "ablation.py"), "--preset", "smoke", "--grid", "finetuning",
            "--cells", ",".join(CELLS), "--seeds", "0,1", "--runs-dir", str(runs), *SHRINK]
    proc = subprocess.run(args, cwd=tmp_path, env=ray_head.env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "sweep 'smoke-finetuning' complete: 8/8 trials finished" in output

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adaptive-ablation")
    children = client.search_runs([exp.experiment_id], "tags.`sweep.id` = 'smoke-finetuning' and "
                                                       "tags.`sweep.role` = 'trial'")
    by_cell: dict[str, list] = {}
    for run in children:
        assert run.info.status == "FINISHED"
        cell = run.data.tags["trial.cell"]
        assert run.data.params["model.finetune.name"] == cell and run.data.params["pretrain.enabled"] == "True"
        by_cell.setdefault(cell, []).append(run)
    assert sorted(by_cell) == sorted(CELLS) and all(len(r) == 2 for r in by_cell.values())
    tuned = by_cell["spottune_block"][0]
    usage_csv = Path(client.download_artifacts(tuned.info.run_id, "finetune/usage_epoch1.csv", str(tmp_path)))
    assert len(usage_csv.read_text().splitlines()) == 1 + 4  # one decision per layer: 2-1-1

    tables = json.loads((runs / "reports" / "smoke-finetuning" / "tables.json").read_text())
    ft = tables["finetuning"]
    assert ft["cells"] == CELLS and ft["reference"] == "standard"

    def mean(cell, metric):
        return float(np.mean([r.data.metrics[metric] for r in by_cell[cell]]))

    for cell in CELLS:
        row = ft["rows"][cell]
        assert row["seeds"] == [0, 1] and row["acc"]["mean"] == pytest.approx(mean(cell, "best/acc"))
        assert row["ratios"]["step_s"] == pytest.approx(mean(cell, "train/step_s") / mean("standard", "train/step_s"))
        assert row["ratios"]["resident_mb"] == pytest.approx(
            mean(cell, "train/resident_mb") / mean("standard", "train/resident_mb"))
        if cell.startswith("spottune"):
            assert row["usage"]["mean"] == pytest.approx(mean(cell, "finetune/usage"))
            assert row["policy_entropy"]["mean"] == pytest.approx(mean(cell, "finetune/policy_entropy"))
            assert set(row["usage_grid"]) == {"lang", "visn", "cross"}
            # SpotTune keeps two copies and a policy: more memory held than standard, twice the FLOPs or so.
            assert row["ratios"]["resident_mb"] > 1 and row["ratios"]["flops"] > 1.5
        else:
            assert row["usage"]["n"] == 0 and row["usage_grid"] == {}
    assert ft["rows"]["frozen"]["ratios"]["flops"] < 1 and ft["rows"]["frozen"]["ratios"]["resident_mb"] < 1
    # spottune: heads + 3 per single-stream layer, 3 x (heads + 1) + 4 per cross layer (2 heads)
    assert [r["decisions"] for r in ft["rows"].values()] == [0, 0, 4, 3 * (2 + 3) + 3 * (2 + 1) + 4]
    comps = {c["variant"]: c["seed_test"] for c in ft["comparisons"]}
    assert sorted(comps) == sorted(CELLS[1:]) and all(t["family"] == comps["frozen"]["family"] for t in comps.values())
    assert all(t["paired"] and t["seeds"] == [0, 1] and t["p_holm"] is not None for t in comps.values())

    md = (runs / "reports" / "smoke-finetuning" / "report.md").read_text()
    assert "Fine-tuning strategies: accuracy, SpotTune usage and cost" in md
    heat = [f for f in tables["figures"]["files"] if f["file"].endswith("_finetune_usage.png")]
    assert len(heat) == 1 and heat[0]["cells"] == ["spottune_block", "spottune"]
    assert (runs / "reports" / "smoke-finetuning" / heat[0]["file"]).is_file() and heat[0]["file"] in md
    # Usage is shown by its own section, not as a learned attention statistic (table or per-stat figure).
    assert not any(a["stat"] in ("usage", "eval_usage") for a in tables["attention"])
    assert not any(f.get("stat") in ("usage", "eval_usage") for f in tables["figures"]["files"])
