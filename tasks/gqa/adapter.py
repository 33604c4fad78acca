"""The GQA task adapter (``gqa``, selected by ``data.name=gqa``): VQA's answer classification on GQA.

Everything but the evaluation is VQA's (:class:`tasks.vqa.adapter.VQAAdapter`): LXMERT's encoder
with its answer head over GQA's 1,842 answers, BCE over the targets (one answer of score 1.0),
the same batches, schedule and checkpoints. Differences:

* ``eval/acc`` is LXMERT's GQA accuracy (:func:`tasks.gqa.metrics.accuracy`: the label score of the
  predicted answer over the labelled questions; ``submit`` questions have none), tagged
  ``eval.metric=gqa_accuracy``; ``eval/n_labelled`` is its denominator;
* artifacts at the best epoch: ``eval/predictions.csv`` and ``eval/examples_top5.json`` as VQA's,
  plus ``eval/gqa_submission.json`` in GQA's server format (``[{"questionId", "prediction"}]``);
* with ``train.init_checkpoint`` the head's last layer starts from LXMERT's 9,500-answer pretraining
  QA head where ``<data.root>/lxmert/all_ans.json`` is present (LXMERT's ``--loadLXMERTQA``;
  :mod:`tasks.answer_map`); the map's coverage is logged and tagged ``init.answer_map``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

import schema
from tasks.base import EvalResult, StepContext
from tasks.vqa.adapter import VQAAdapter


class GQAAdapter(VQAAdapter):
    """GQA (balanced) question answering as answer classification (LXMERT's GQA fine-tuning)."""

    name = "gqa"
    data_names = ("gqa",)
    primary_metric = "acc"
    fresh_on_init = ()
    fresh_on_transfer = ("head.*",)

    def __init__(self, cfg, rank: int = 0, world_size: int = 1, device: torch.device | None = None, log=print):
        super().__init__(cfg, rank, world_size, device, log)
        self._answer_map_line = ""

    @property
    def eval_metric(self) -> str:
        return schema.EVAL_METRIC_GQA

    def tags(self) -> dict[str, str]:
        out = {schema.EVAL_METRIC_TAG: self.eval_metric}
        if self._answer_map_line:
            out[schema.INIT_ANSWER_MAP] = self._answer_map_line
        return out

    def init_options(self) -> dict[str, Any]:
        """``answer_map`` from LXMERT's pretraining QA answers when ``<root>/lxmert/all_ans.json`` exists
        (LXMERT's GQA recipe loads the QA head, ``--loadLXMERTQA``); none otherwise (the head's last
        layer then has to match the checkpoint's or start fresh as any other import decides)."""
        from tasks.answer_map import QA_TABLE, describe, qa_answer_map, read_qa_table

        table_path = Path(self.cfg.data.root) / QA_TABLE
        if not table_path.is_file():
            self.log(f"gqa: no {table_path}, so the answer head is not initialised from the pretraining QA head")
            return {}
        amap = qa_answer_map(self.data.answers, read_qa_table(table_path))
        self._answer_map_line = describe(self.data.answers, amap)
        self.log(f"gqa: {self._answer_map_line}")
        return {"answer_map": amap}

    def question_scores(self, result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Per question ``(acc, soft_score)``: both the label score of the predicted answer (GQA has no
        human answers; an unlabelled question scores 0 and is left out of ``acc``'s mean)."""
        soft = np.asarray(result["score"], np.float64)
        result.setdefault("acc", soft)
        return result["acc"], soft

    def evaluate(self, model: torch.nn.Module, ctx: StepContext) -> EvalResult:
        result = self.predict(model, ctx)
        return EvalResult(self.eval_metrics(result) if self.rank == 0 else {}, result)

    def eval_metrics(self, result: dict[str, Any], at_prior: tuple | None = None) -> dict[str, float]:
        """Bare names: ``acc`` (fraction; LXMERT's GQA accuracy over the labelled questions),
        ``loss``, ``n`` (questions scored) and ``n_labelled``."""
        from tasks.gqa.metrics import accuracy

        qids = result["question_id"]
        n = len(qids)
        report = accuracy(self.data.eval, qids, result["pred"]) if n else None
        return {"acc": report.overall / 100.0 if report is not None and report.n else 0.0,
                "loss": result["loss_sum"] / max(1, result["n"]), "n": float(n),
                "n_labelled": float(report.n if report is not None else 0)}  # fmt: skip

    def artifacts(self, result: EvalResult) -> dict[str, Any]:
        from tasks.gqa.metrics import results

        payload = result.payload
        out = super().artifacts(result)
        out[schema.GQA_SUBMISSION_ARTIFACT] = results(self.data.eval, payload["question_id"], payload["pred"])
        return out
