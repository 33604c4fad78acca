"""The NLVR2 task adapter (``nlvr2``, selected by ``data.name=nlvr2``): is a statement about two images true?

Model (:class:`PairModel`): LXMERT's encoder run once on the 2B (statement, image) pairs of a batch
and LXMERT's pair head on the two pooled outputs concatenated, ``img0`` first
(:func:`tasks.nlvr2.model.pair_forward`, :class:`models.heads.PairHead`). Loss: cross-entropy over
(False, True) (:func:`tasks.nlvr2.model.pair_loss`). Evaluation (:func:`tasks.nlvr2.metrics.evaluate`):
``acc`` (fraction of statements judged right, LXMERT's 74.95 on ``valid``) and ``consistency``
(fraction of sentences whose every image pair is right, NLVR2's official definition) where the
identifiers name their sentence; tag ``eval.metric=nlvr2_accuracy``. Artifacts at the best epoch:
``eval/predictions.csv`` (per statement: identifier, prediction, right) and
``eval/nlvr2_results.csv`` (``identifier,True|False`` as LXMERT's ``dump_result`` writes it).

Data loading, batches, the optimiser settings (``train.*``) and the epoch's loss bookkeeping are
VQA's (:class:`tasks.vqa.adapter.VQAAdapter`). The pair head is not initialised from pretraining
(LXMERT's "Load Answers: No"), so it may stay fresh when ``train.init_checkpoint`` is imported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

import schema
from tasks.base import MODEL_INPUTS, EvalResult, StepContext, StepLoss, gather_per_example
from tasks.vqa.adapter import VQAAdapter, _csv

_PER_EXAMPLE = ("question_id", "pred", "score")


class PairModel(nn.Module):
    """LXMERT's encoder and the pair head; ``forward(**batch)`` returns the pair logits (B, 2).

    The encoder is ``lxmert`` and the head ``head`` (the names LXMERT weights import into:
    ``models.checkpoint.load_pretrained`` loads the encoder and reports the head as fresh).
    """

    def __init__(self, cfg, lxmert: nn.Module, head: nn.Module):
        super().__init__()
        self.config = cfg
        self.lxmert = lxmert
        self.head = head

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """``input_ids`` / ``attention_mask`` / ``token_type_ids`` (B, T), ``visual_feats`` (B, 2, R, F),
        ``visual_pos`` (B, 2, R, 4) -> logits (B, 2) over (False, True)."""
        from tasks.nlvr2.model import pair_forward

        return pair_forward(self.lxmert, self.head, batch)["logits"]

    @property
    def layers_ran(self) -> dict[str, list[int]]:
        """Layer indices per stack that ran in the last forward (LayerDrop)."""
        return self.lxmert.encoder.layers_ran


class NLVR2Adapter(VQAAdapter):
    """NLVR2: a statement judged on a pair of images, the pair encoded image by image (LXMERT's)."""

    name = "nlvr2"
    data_names = ("nlvr2",)
    primary_metric = "acc"
    fresh_on_init = ("head.*",)  # LXMERT does not load the pair head from pretraining
    fresh_on_transfer = ("head.*",)

    @property
    def eval_metric(self) -> str:
        return schema.EVAL_METRIC_NLVR2

    def build_model(self) -> nn.Module:
        from models.builders import backbone, init_weights, pair_head

        model = PairModel(self.cfg.model, backbone(self.cfg.model), pair_head(self.cfg.model))
        init_weights(model, self.cfg.model.initializer_range)  # the encoder as models.build_model does
        return model

    def trainable(self, model: nn.Module) -> nn.Module:
        return model  # its forward returns the logits alone already

    def describe(self) -> dict[str, float]:
        """The data sizes, and the model's size and cost as built: the pair head instead of the VQA
        head, and two encoder passes per statement (``model/flops_per_sample`` counts both)."""
        from models.flops import count_params, flops_per_sample

        m = self.cfg.model
        width = 2 * m.hidden_size
        head_params = width * width + width + 2 * width + width * 2 + 2  # fc1, LayerNorm, fc2
        n_tokens, n_regions = self.sequence_shape()
        encoder = flops_per_sample(m, n_tokens, n_regions, head=False)
        return {"data/train_questions": float(len(self.data.train)), "data/eval_questions": float(len(self.data.eval)),
                "model/params": float(count_params(m, head=False) + head_params),
                "model/flops_per_sample": float(2 * encoder + 2 * (width * width + width * 2))}  # fmt: skip

    def _batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS}

    def train_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepLoss:
        from tasks.nlvr2.model import pair_loss

        targets = batch["targets"].to(self.device, non_blocking=True)
        with ctx.autocast():
            logits = model(**self._batch(batch))
        loss, _ = pair_loss({"logits": logits.float()}, {"targets": targets})
        return StepLoss(loss, targets.shape[0])

    @torch.no_grad()
    def predict(self, model: nn.Module, ctx: StepContext) -> dict[str, Any]:
        """Per statement on this rank's shard, gathered on rank 0: ``question_id``, ``pred`` (1 = True),
        ``score`` (1.0 when ``pred`` is the label), ``logits`` (N, 2); ``loss_sum`` / ``n`` over the labelled."""
        import torch.nn.functional as F

        model.eval()
        parts: dict[str, list] = {"question_id": [], "pred": [], "score": [], "logits": []}
        loss_sum, n = 0.0, 0
        for batch in self.data.eval.batches(self.cfg.train.eval_batch_size, shuffle=False, seed=0, epoch=0,
                                            rank=self.rank, world_size=self.world_size):
            targets = batch["targets"].to(self.device)
            with ctx.autocast():
                logits = model(**self._batch(batch)).float()
            labelled = targets.sum(1) > 0
            if bool(labelled.any()):
                loss_sum += float(F.cross_entropy(logits[labelled], targets[labelled].argmax(1), reduction="sum"))
                n += int(labelled.sum())
            pred = logits.argmax(1)
            parts["question_id"].append(batch["question_id"].cpu())
            parts["pred"].append(pred.cpu())
            parts["score"].append(targets.gather(1, pred[:, None])[:, 0].cpu())
            parts["logits"].append(logits.cpu())
        local = {k: torch.cat(v).numpy() if v else np.zeros((0, 2) if k == "logits" else 0) for k, v in parts.items()}
        local.update(loss_sum=loss_sum, n=n)
        return gather_per_example(local, (*_PER_EXAMPLE, "logits"), self.world_size)

    def question_scores(self, result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        score = np.asarray(result["score"], np.float64)
        return score, score

    def eval_metrics(self, result: dict[str, Any], at_prior: tuple | None = None) -> dict[str, float]:
        """Bare names: ``acc`` and ``consistency`` (fractions; :func:`tasks.nlvr2.metrics.evaluate`),
        ``loss``, ``n`` (statements scored), ``n_labelled``, ``sentences`` (consistency groups)."""
        from tasks.nlvr2.metrics import evaluate

        qids = result["question_id"]
        out = {"loss": result["loss_sum"] / max(1, result["n"]), "n": float(len(qids))}
        report = evaluate(self.data.eval, qids, result["pred"]) if len(qids) else None
        out["acc"] = report.accuracy / 100.0 if report is not None else 0.0
        out["n_labelled"] = float(report.n if report is not None else 0)
        if report is not None and report.consistency is not None:
            out["consistency"] = report.consistency / 100.0
            out["sentences"] = float(report.sentences)
        return out

    def progress(self, metrics: dict[str, float]) -> str:
        line = super().progress(metrics)
        return line + (f" consistency {metrics['eval_consistency']:.4f}" if "eval_consistency" in metrics else "")

    def artifacts(self, result: EvalResult) -> dict[str, Any]:
        from tasks.nlvr2.metrics import results_lines

        p = result.payload
        return {schema.PREDICTIONS_ARTIFACT: self.predictions_table(p),
                schema.NLVR2_RESULTS_ARTIFACT: "".join(f"{line}\n" for line in
                                                       results_lines(self.data.eval, p["question_id"], p["pred"]))}

    def predictions_table(self, result: dict[str, Any]) -> str:
        """``eval/predictions.csv``: per statement ``question_id`` (the batch's integer id),
        ``answer`` (True / False), ``score`` (1 right, 0 wrong or unlabelled), ``identifier``,
        ``answer_type`` (``nlvr2``: one type) and ``question_type`` (empty), so the report reads it as
        VQA's."""
        from tasks.nlvr2.data import ANSWERS

        idents = self.data.eval.source_id_of(result["question_id"])
        lines = ["question_id,answer,score,answer_type,question_type,identifier"]
        for qid, pred, score, ident in zip(result["question_id"], result["pred"], result["score"], idents):
            lines.append(f"{int(qid)},{ANSWERS[int(pred)]},{float(score):.4f},nlvr2,,{_csv(ident)}")
        return "\n".join(lines) + "\n"
