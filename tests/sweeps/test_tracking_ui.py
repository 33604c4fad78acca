"""What the MLflow UI needs from a sweep's store, checked on a real local store: the experiment is
marked as model training, and every trial run carries its cell as a param beside its seed (Group by)."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _trial(uri: str, sweeper, key: str, cell: str, seed: int, params: dict | None = None) -> str:
    from sweeps.tracking import TrialTracker

    context = {"tracking_uri": uri, "experiment_id": sweeper.experiment_id, "parent_run_id": sweeper.parent_run_id,
               "sweep_id": sweeper.sweep_id, "tags": {}}
    tracker = TrialTracker(context, key)
    run_id = tracker.start({"trial.cell": cell, "trial.seed": str(seed)},
                           {"train.seed": seed, "model.attention.name": cell, **(params or {})})
    tracker.finish()
    return run_id


def test_experiment_kind_and_group_params(tmp_path):
    from mlflow import MlflowClient

    from sweeps.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, SweepTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    # An experiment created before the tag existed gets it; one a user marked keeps the user's choice.
    old = client.create_experiment("old-sweeps")
    client.create_experiment("marked", tags={EXPERIMENT_KIND_TAG: "genai_development"})

    sweeper = SweepTracker(uri, "fresh", "s1", tmp_path)
    sweeper.start({"sweep.status": "running"}, {"preset": "smoke"})
    runs = {(cell, seed): _trial(uri, sweeper, f"{cell}-s{seed}", cell, seed)
            for cell in ("softmax", "entmax") for seed in (0, 1)}
    # A resumed trial reopens its run: the params are not logged twice (MLflow refuses a changed param).
    assert _trial(uri, sweeper, "entmax-s1", "entmax", 1) == runs[("entmax", 1)]
    # A config that already has a param named `cell` keeps its value.
    kept = _trial(uri, sweeper, "softmax-s9", "softmax", 9, {"cell": "from-config"})

    assert client.get_experiment(sweeper.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    SweepTracker(uri, "old-sweeps", "s2", tmp_path)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    SweepTracker(uri, "marked", "s3", tmp_path)
    assert client.get_experiment_by_name("marked").tags[EXPERIMENT_KIND_TAG] == "genai_development"

    for (cell, seed), run_id in runs.items():
        params = client.get_run(run_id).data.params
        assert (params["cell"], params["train.seed"]) == (cell, str(seed))
        assert "seed" not in params  # the seed is the config's own param, not a copy
    assert client.get_run(kept).data.params["cell"] == "from-config"
    # What the runs table's Group by uses: a search on the param finds exactly the cell's seeds.
    found = client.search_runs([sweeper.experiment_id], "params.cell = 'entmax'")
    assert sorted(r.data.params["train.seed"] for r in found) == ["0", "1"]


def test_the_sweep_ends_with_the_link_that_opens_its_runs_table():
    from sweeps.ablation import browse_hint

    local = browse_hint("sqlite:////runs/mlflow.db", "7", "default-paper")
    assert local.startswith("browse: mlflow ui --backend-store-uri sqlite:////runs/mlflow.db, then open ")
    assert "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning" in local
    remote = browse_hint("http://mlflow.lab:5000/", "12", "s")
    assert "mlflow ui" not in remote and "http://mlflow.lab:5000/#/experiments/12?workflowType=machine_learning" in remote
