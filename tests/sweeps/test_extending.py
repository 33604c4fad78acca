"""A new task and a new attention normaliser, defined in this file only, run through the platform.

Neither exists anywhere else in the tree: the task adapter and the normaliser are registered here
(one registry line each, as docs/extending.md says), each runs as a one-epoch trial of the real
training loop logging to a real MLflow store through the sweep's own trackers, and the report built
from that store shows both cells with the accuracy their runs logged.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import schema
from models.attention.registry import ATTENTION_REGISTRY
from sweeps.config import ExperimentConfig, apply_overrides, flatten
from sweeps.loop import TrialLoop, prepared_config
from tasks.base import TASKS, EvalResult, OptimSpec, StepLoss, TaskAdapter

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class ToyParity(TaskAdapter):
    """Is the first feature of the first region positive? A 2-way head on the pooled [CLS]."""

    name = "toy_parity"
    primary_metric = "acc"

    def __init__(self, cfg, rank=0, world_size=1, device=None, log=print):
        super().__init__(cfg, rank, world_size, device, log)
        rng = np.random.default_rng(1234)
        self.n_train, self.n_eval, self.regions, self.tokens = 256, 128, 4, 6
        n = self.n_train + self.n_eval
        feats = rng.normal(size=(n, self.regions, cfg.model.visual_feat_dim)).astype(np.float32)
        self.arrays = {
            "input_ids": torch.from_numpy(rng.integers(5, 50, size=(n, self.tokens))),
            "attention_mask": torch.ones(n, self.tokens, dtype=torch.long),
            "token_type_ids": torch.zeros(n, self.tokens, dtype=torch.long),
            "visual_feats": torch.from_numpy(feats),
            "visual_pos": torch.rand(n, self.regions, 4),
            "label": torch.from_numpy((feats[:, 0, 0] > 0).astype(np.int64)),
        }

    def optim(self) -> OptimSpec:
        return OptimSpec(epochs=self.cfg.train.epochs, batch_size=32, lr=1e-3)

    def build_model(self) -> nn.Module:
        from models.builders import backbone, init_weights

        model = nn.Module()
        model.lxmert = backbone(self.cfg.model)
        model.head = nn.Linear(self.cfg.model.hidden_size, 2)
        init_weights(model, self.cfg.model.initializer_range)
        return model

    def trainable(self, model: nn.Module) -> nn.Module:
        class Logits(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, **x: Tensor) -> Tensor:
                return self.inner.head(self.inner.lxmert(**x).pooled)

        return Logits(model)

    def _batches(self, lo: int, hi: int, order: np.ndarray | None = None):
        index = np.arange(lo, hi) if order is None else lo + order
        for i in range(0, len(index), 32):
            rows = torch.from_numpy(index[i : i + 32])
            yield {k: v[rows] for k, v in self.arrays.items()}

    def train_length(self) -> int:
        return self.n_train

    def train_batches(self, epoch: int):
        order = np.random.default_rng(self.cfg.train.seed * 1000 + epoch).permutation(self.n_train)
        return self._batches(0, self.n_train, order)

    def sequence_shape(self) -> tuple[int, int]:
        return self.tokens, self.regions

    def start_epoch(self, epoch: int) -> None:
        self.losses = []

    def train_loss(self, model, batch, ctx) -> StepLoss:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos")}
        loss = F.cross_entropy(model(**inputs), batch["label"])
        return StepLoss(loss, batch["label"].shape[0])

    def after_step(self, ctx, out, finite, total, aux) -> None:
        self.losses.append(float(out.loss.detach()))

    def train_metrics(self) -> dict[str, float]:
        return {"loss": float(np.mean(self.losses))}

    @torch.no_grad()
    def evaluate(self, model, ctx) -> EvalResult:
        model.eval()
        right = []
        for batch in self._batches(self.n_train, self.n_train + self.n_eval):
            inputs = {k: v for k, v in batch.items() if k != "label"}
            right.append(model(**inputs).argmax(1) == batch["label"])
        right = torch.cat(right).float()
        return EvalResult({"acc": float(right.mean()), "n": float(len(right))}, right)

    def artifacts(self, result: EvalResult) -> dict:
        return {"eval/right.json": result.payload.tolist()}


class Halfmax(nn.Module):
    """softmax(scores * g_h), g_h = sigmoid(learned) per head, a normaliser nothing else knows."""

    def __init__(self, num_heads: int, cfg, *, span_max: int = 0, dropout: float = 0.0):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(num_heads))

    def forward(self, q, k, v, mask=None, need_probs=False, **_):
        g = 2 * torch.sigmoid(self.gain).view(-1, 1, 1)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 * g
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores.float(), -1).to(v.dtype)
        return probs @ v, probs if need_probs else None

    def stats(self) -> dict[str, Tensor]:
        return {"gain": 2 * torch.sigmoid(self.gain.detach())}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(TASKS, ToyParity.name, ToyParity)
    monkeypatch.setitem(ATTENTION_REGISTRY, "halfmax", Halfmax)


CELLS = {
    "toy_task": ("Toy parity task (defined in the test)", {"train.task": "toy_parity"}),
    "toy_norm": ("Halfmax attention (defined in the test)", {"model.attention.name": "halfmax"}),
}


def test_a_task_and_a_normaliser_defined_here_run_through_a_trial_and_the_report(registered, tmp_path):
    from reports import build
    from sweeps.tracking import SweepTracker, TrialTracker

    torch.set_num_threads(1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = [f"{cell}-s0" for cell in CELLS]
    sweeper = SweepTracker(uri, "extending", "toy", tmp_path)
    parent = sweeper.start({
        schema.SWEEP_TRIALS: json.dumps(trials), schema.SWEEP_STATUS: "running", schema.SWEEP_GRID: "toy",
        schema.SWEEP_CELLS: json.dumps({c: {"label": label, "table": 1} for c, (label, _) in CELLS.items()}),
    }, {"grid": "toy"})  # fmt: skip
    context = {"tracking_uri": uri, "experiment_id": sweeper.experiment_id, "parent_run_id": parent,
               "sweep_id": "toy", "tags": {schema.SWEEP_GRID: "toy"}}
    logged = {}
    for cell, (label, overrides) in CELLS.items():
        cfg = apply_overrides(ExperimentConfig(), {
            "data.cache_dir": str(tmp_path / "cache"), "data.train_limit": "256", "data.eval_limit": "128",
            "model.hidden_size": "32", "model.num_heads": "2", "model.intermediate_size": "64",
            "model.l_layers": "1", "model.x_layers": "1", "model.r_layers": "1", "train.epochs": "1",
            "train.batch_size": "32", **overrides,
        }, source="test")  # fmt: skip
        cfg = prepared_config(cfg)
        cfg.validate()
        tracker = TrialTracker(context, f"{cell}-s0")
        tracker.start({schema.TRIAL_CELL: cell, schema.TRIAL_SEED: "0", schema.CELL_LABEL: label,
                       schema.CELL_TABLE: "1", schema.TRIAL_AXES: json.dumps({"cell": cell})}, flatten(cfg))
        loop = TrialLoop(cfg, log=lambda _m: None)
        final = loop.fit(lambda metrics, state: None, tracker)
        logged[cell] = final["eval/acc"]
        assert 0.0 <= final["eval/acc"] <= 1.0 and final["epoch"] == 1.0
    sweeper.finish("FINISHED", {}, {schema.SWEEP_STATUS: "complete"})

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = {r.data.tags[schema.TRIAL_CELL]: r for r in client.search_runs([sweeper.experiment_id])
            if schema.TRIAL_CELL in r.data.tags}  # fmt: skip
    # The toy task's metrics and its own artifact; the normaliser's per-head statistic.
    assert runs["toy_task"].data.metrics["best/acc"] == logged["toy_task"]
    assert "eval/right.json" in {a.path for a in client.list_artifacts(runs["toy_task"].info.run_id, "eval")}
    assert any(k.startswith("gain/") for k in runs["toy_norm"].data.metrics)

    html = build(uri, "toy", experiment="extending", out_dir=tmp_path / "report", log_to_mlflow=False)
    markdown = (html.parent / "report.md").read_text()
    for cell, (label, _) in CELLS.items():
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {label}"))
        assert f"{100 * logged[cell]:.2f}" in row, (cell, row)
