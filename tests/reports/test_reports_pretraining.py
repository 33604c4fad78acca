"""Table 3 (pretraining task weighting) from what MLflow holds, for a weighting-grid sweep written
through the sweep's own tracker and for every available real source (the smoke sweep)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest


def _latest_by_cell(uri: str, sweep: str, experiment: str) -> dict[str, list]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    parent = client.search_runs([exp.experiment_id], f"tags.`sweep.id` = '{sweep}' and tags.`sweep.role` = 'parent'")[0]
    planned = set(json.loads(parent.data.tags["sweep.trials"]))
    runs = client.search_runs([exp.experiment_id], f"tags.`sweep.id` = '{sweep}' and tags.`sweep.role` = 'trial'")
    out: dict[str, list] = {}
    for run in runs:
        if run.info.status == "FINISHED" and run.data.tags["trial.key"] in planned:
            out.setdefault(run.data.tags["trial.cell"], []).append(run)
    return out


@pytest.fixture(scope="module")
def weighting_report(tmp_path_factory, empty_store_template) -> dict:
    from reports_synthetic import WEIGHTING_LIKE, SweepSpec, fill_sweep

    import reports

    runs = tmp_path_factory.mktemp("weighting") / "runs"
    runs.mkdir(parents=True)
    shutil.copyfile(empty_store_template, runs / "mlflow.db")
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    fill_sweep(uri, runs, sweep_id="smoke-weighting",
               spec=SweepSpec(cells=dict(WEIGHTING_LIKE), failed=(), missing=("gradnorm-s1",)))  # fmt: skip
    out = runs / "report"
    reports.build(uri, "smoke-weighting", out_dir=out, log_to_mlflow=False)
    return {"uri": uri, "sweep": "smoke-weighting", "tables": json.loads((out / "tables.json").read_text()),
            "md": (out / "report.md").read_text(), "tex": (out / "tables.tex").read_text(),
            "html": (out / "report.html").read_text()}


def check_table3(tables: dict, uri: str, sweep: str, experiment: str = "adaptive-ablation") -> list[str]:
    """Every Table-3 cell's per-task weights and held-out losses equal MLflow's last pretraining epoch."""
    by_cell = _latest_by_cell(uri, sweep, experiment)
    checked = []
    for name in tables["tables"]["table3"]:
        row = tables["cells"][name]
        runs = sorted(by_cell.get(name, []), key=lambda r: int(r.data.tags["trial.seed"]))
        pretrained = [r for r in runs if r.data.params.get("pretrain.enabled") == "True"]
        if not pretrained:
            assert row["pretrain"] is None, name
            continue
        pre = row["pretrain"]
        assert pre["weighting"] == pretrained[0].data.params["pretrain.weighting"]
        for task in pre["tasks"]:
            for kind in ("weight", "eval_loss"):
                values = [r.data.metrics[f"pretrain/{kind}_{task}"] for r in pretrained]
                assert pre[kind][task]["mean"] == pytest.approx(float(np.mean(values))), (name, kind, task)
                assert pre[kind][task]["n"] == len(values)
        assert "mor_feat" not in pre["tasks"]  # components are not tasks
        checked.append(name)
    return checked


def test_table3_holds_the_final_per_task_losses_and_weights(weighting_report):
    t = weighting_report["tables"]
    assert t["tables"]["table3"] == ["softmax", "equal", "grad_std", "uncertainty", "gradnorm"]
    assert t["tables"]["other"] == [] and t["reference_table3"] == "equal"
    assert check_table3(t, weighting_report["uri"], weighting_report["sweep"]) == [
        "equal", "grad_std", "uncertainty", "gradnorm"]
    cells = t["cells"]
    assert cells["softmax"]["pretrain"] is None and cells["equal"]["vs_equal"] is None
    assert cells["equal"]["pretrain"]["tasks"] == ["mlm", "mor", "match", "qa"]
    assert cells["equal"]["pretrain"]["weight"]["mlm"]["mean"] == 1.0
    # every other cell is compared with equal weights, paired by seed, in the comparisons too
    for name in ("softmax", "grad_std", "uncertainty", "gradnorm"):
        comp = cells[name]["vs_equal"]
        assert comp["reference"] == "equal" and comp["bootstrap"] is not None
        assert comp["family"] == "vs equal"
        assert (comp["seed_test"]["p_holm"] is None) == (comp["seed_test"]["p_value"] is None)
    assert cells["gradnorm"]["vs_equal"]["seed_test"]["verdict"] == "not tested"  # one seed
    assert cells["gradnorm"]["vs_equal"]["seeds"] == [0]  # its seed 1 never ran
    assert cells["grad_std"]["vs_equal"]["bootstrap"]["mean"] > 0  # the synthetic grad_std is better
    kinds = {(c["variant"], c["kind"]) for c in t["comparisons"]}
    assert ("grad_std", "vs equal task weights") in kinds and ("grad_std", "vs reference") in kinds


def test_table3_renders_in_every_format(weighting_report):
    md, tex, html = weighting_report["md"], weighting_report["tex"], weighting_report["html"]
    assert "### Table 3: pretraining task weighting" in md
    header = next(line for line in md.splitlines() if line.startswith("| Variant | Seeds | Pretraining"))
    for col in ("MLM loss (held-out)", "Image QA weight", "Δ vs Equal weights (LXMERT) over seeds (pp)", "Pretraining time"):
        assert col in header, col
    row = next(line for line in md.splitlines() if line.startswith("| No pretraining"))
    assert "| none |" in row
    assert "grad_std, 2 epochs" in md and "1/2 ‡" in md  # gradnorm's missing seed is flagged
    assert "The paper has no numbers for these cells" in md
    assert r"\label{tab:table3}" in tex and 'id="table3"' in html


@pytest.mark.parametrize("report_source", ["smoke"], indirect=True)
def test_table3_from_a_real_sweep(built_report):
    """The smoke sweep runs the paper grid's pretraining cells: they fill Table 3 from what was logged."""
    t = built_report["tables"]
    assert t["tables"].get("table3"), "the smoke sweep's report has no Table 3"
    checked = check_table3(t, built_report["uri"], built_report["sweep"], built_report["experiment"])
    assert checked and all(len(t["cells"][c]["pretrain"]["tasks"]) == 4 for c in checked)


def test_sweeps_without_pretraining_have_no_table3(synthetic_report):
    t = synthetic_report["tables"]
    assert t["tables"]["table3"] == [] and t["reference_table3"] is None
    assert "Table 3" not in synthetic_report["md"]
    assert all(row["pretrain"] is None for row in t["cells"].values())
