"""The VQA task adapter (``vqa``): VQA v2 from LXMERT's files and easy-VQA (``data.name``).

Model: the LXMERT encoder with LXMERT's answer head (:func:`models.build_model`). Loss: LXMERT's,
binary cross-entropy over the soft answer targets, summed over answers (the mean times A).
Evaluation: the official VQA accuracy of the top answer when the evaluation questions carry their
human answers (easy-VQA; VQA v2 with the official annotation file), else LXMERT's soft score (MLflow
tag ``eval.metric`` says which), per answer type too; artifacts: the per-question predictions CSV
and the top-5 answers of fixed example questions (the paper's Fig. 4).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import schema
from tasks.base import (
    MODEL_INPUTS,
    EvalResult,
    OptimSpec,
    StepContext,
    StepLoss,
    TaskAdapter,
    gather_per_example,
)

#: Values of the MLflow tag ``eval.metric``: what a trial's ``eval/acc`` (and ``best/acc``) is.
EVAL_OFFICIAL = "vqa_official"
EVAL_SOFT = "soft_score"
#: A question type is "at its prior" when the model's accuracy on it is at most this many points
#: above the blind prior's (:meth:`VQAAdapter.prior`: answers from the question text alone; types of fewer than
#: PRIOR_MIN_QUESTIONS evaluation questions, or whose prior already scores PRIOR_CEILING, carry no
#: evidence either way and are skipped).
PRIOR_MARGIN = 0.01
PRIOR_MIN_QUESTIONS = 20
PRIOR_CEILING = 0.99
_PER_QUESTION = ("question_id", "pred", "score", "top_ids", "top_probs")


class VQALogits(nn.Module):
    """What trains: the VQA model's ``logits`` alone.

    DDP finds the parameters a step did not use by walking back from the forward's outputs; if the
    outputs include ``lang`` / ``visn`` (computed by the last cross layer's vision branch, which
    the VQA loss never uses) those parameters look used but get no gradient, and DDP fails.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits


class VQAAdapter(TaskAdapter):
    """Visual question answering as answer classification (LXMERT's fine-tuning)."""

    name = "vqa"
    data_names = ("easyvqa", "vqa")
    primary_metric = "acc"
    fresh_on_init = ()
    fresh_on_transfer = ("head.*",)

    def __init__(self, cfg, rank: int = 0, world_size: int = 1, device: torch.device | None = None, log=print):
        import tasks

        super().__init__(cfg, rank, world_size, device, log)
        self.data = tasks.load(cfg.data)
        for key, have in (("num_answers", self.data.num_answers), ("visual_feat_dim", self.data.visual_feat_dim)):
            want = getattr(cfg.model, key)
            if want != have:
                raise ValueError(f"model.{key}={want} but the data ({cfg.data.name}) has {have}")

    @classmethod
    def prepare(cls, cfg) -> tuple[dict[str, Any], str]:
        import time

        import tasks

        t0 = time.time()
        tasks.prepare(cfg.data)
        data = tasks.load(cfg.data)
        line = (f"data {cfg.data.name}: {len(data.train)} train / {len(data.eval)} eval questions, "
                f"{data.num_answers} answers, {data.num_regions} regions x {data.visual_feat_dim} features "
                f"({time.time() - t0:.1f} s)")  # fmt: skip
        return {"num_answers": data.num_answers, "visual_feat_dim": data.visual_feat_dim}, line

    # -- the stage -------------------------------------------------------------------------------

    def optim(self) -> OptimSpec:
        t = self.cfg.train
        return OptimSpec(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer,
                         weight_decay=t.weight_decay, lookahead_k=t.lookahead_k, lookahead_alpha=t.lookahead_alpha,
                         mechanism_lr_scale=t.mechanism_lr_scale, schedule=t.schedule, warmup_ratio=t.warmup_ratio,
                         lr_min=t.lr_min, cycle_steps=t.cycle_steps, grad_clip=t.grad_clip)  # fmt: skip

    def build_model(self) -> nn.Module:
        import models

        return models.build_model(self.cfg.model)

    def trainable(self, model: nn.Module) -> nn.Module:
        return VQALogits(model)

    def train_length(self) -> int:
        return self.data.train.epoch_length

    def train_batches(self, epoch: int):
        return self.data.train.batches(self.cfg.train.batch_size, shuffle=True, seed=self.cfg.train.seed,
                                       epoch=epoch, rank=self.rank, world_size=self.world_size)  # fmt: skip

    def sequence_shape(self) -> tuple[int, int]:
        return self.data.max_seq_len, self.data.num_regions

    def describe(self) -> dict[str, float]:
        return {"data/train_questions": float(len(self.data.train)), "data/eval_questions": float(len(self.data.eval))}

    def tags(self) -> dict[str, str]:
        return {schema.EVAL_METRIC_TAG: self.eval_metric}

    # -- training --------------------------------------------------------------------------------

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS}

    def start_epoch(self, epoch: int) -> None:
        self._sums = [0.0, 0.0, 0]  # loss x samples, aux x samples, samples

    def train_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepLoss:
        inputs = self._inputs(batch)
        targets = batch["targets"].to(self.device, non_blocking=True)
        with ctx.autocast():
            logits = model(**inputs)
            # LXMERT's VQA loss: BCE over the soft targets, summed over answers (mean * A).
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets) * targets.shape[1]
        return StepLoss(loss, targets.shape[0])

    def sample_groups(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """The question type of each question in a training batch."""
        return self.data.train.question_type_of(batch["question_id"].numpy())

    def after_step(self, ctx: StepContext, out: StepLoss, finite: bool, total: float, aux: float) -> None:
        if finite:  # a skipped step's loss would make the epoch's mean NaN
            self._sums[0] += out.loss.item() * out.n
            self._sums[1] += aux * out.n
            self._sums[2] += out.n

    def train_metrics(self) -> dict[str, float]:
        loss, aux, n = self._sums
        return {"loss": loss / max(1, n), "aux_loss": aux / max(1, n)}

    # -- evaluation ------------------------------------------------------------------------------

    @property
    def eval_metric(self) -> str:
        """What ``eval/acc`` is (MLflow tag ``eval.metric``): ``vqa_official`` when the evaluation
        questions carry their human answers (easy-VQA; VQA v2 with the official annotation file),
        else ``soft_score`` (LXMERT's soft score of the top answer)."""
        return EVAL_OFFICIAL if self.data.eval.human_answers is not None else EVAL_SOFT

    @torch.no_grad()
    def predict(self, model: nn.Module, ctx: StepContext) -> dict[str, Any]:
        """Predictions on this rank's shard of the evaluation split, gathered on rank 0."""
        model.eval()
        qids, preds, scores, top_ids, top_probs = [], [], [], [], []
        loss_sum, n = 0.0, 0
        for batch in self.data.eval.batches(self.cfg.train.eval_batch_size, shuffle=False, seed=0, epoch=0,
                                            rank=self.rank, world_size=self.world_size):
            inputs = self._inputs(batch)
            targets = batch["targets"].to(self.device)
            with ctx.autocast():
                logits = model(**inputs).float()
            loss_sum += float(F.binary_cross_entropy_with_logits(logits, targets, reduction="sum"))
            n += targets.shape[0]
            pred = logits.argmax(dim=1)
            qids.append(batch["question_id"].cpu())
            preds.append(pred.cpu())
            scores.append(targets.gather(1, pred[:, None])[:, 0].cpu())
            probs = torch.sigmoid(logits)
            p, i = probs.topk(min(5, probs.shape[1]), dim=1)
            top_ids.append(i.cpu())
            top_probs.append(p.cpu())
        empty = {"question_id": np.zeros(0, np.int64), "pred": np.zeros(0, np.int64),
                 "score": np.zeros(0, np.float32), "top_ids": np.zeros((0, 5), np.int64),
                 "top_probs": np.zeros((0, 5), np.float32)}  # fmt: skip
        parts = dict(zip(_PER_QUESTION, (qids, preds, scores, top_ids, top_probs)))
        local = {k: torch.cat(v).numpy() if v else empty[k] for k, v in parts.items()}
        local.update(loss_sum=loss_sum, n=n)
        return gather_per_example(local, _PER_QUESTION, self.world_size)

    def question_scores(self, result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Per-question ``(acc, soft_score)`` of a :meth:`predict` result (rank 0), each (N,) in [0, 1].

        ``acc`` is the official VQA accuracy of the predicted answer string against the question's
        human answers when they exist (:attr:`eval_metric`), else the soft score. Computed once per
        result and kept in it under ``"acc"``.
        """
        soft = np.asarray(result["score"], np.float64)
        if "acc" not in result:
            humans = self.data.eval.human_answers
            if humans is None:
                result["acc"] = soft
            else:
                predicted = [self.data.answers[int(i)] for i in result["pred"]]
                result["acc"] = humans.scores(result["question_id"], predicted)
        return result["acc"], soft

    def eval_metrics(self, result: dict[str, Any], at_prior: tuple | None = None) -> dict[str, float]:
        """Bare names: ``acc``, ``soft_score``, ``loss``, ``n``, ``acc_<answer type>``, ``soft_score_<type>``,
        and against the question-type prior (:meth:`prior`): ``prior_acc`` and ``at_prior_share``
        (``at_prior``: :meth:`at_prior` of ``result`` when the caller has it already)."""
        acc, soft = self.question_scores(result)
        types = np.asarray(self.data.eval.answer_type_of(result["question_id"]))
        n = len(acc)
        out = {"acc": float(acc.mean()) if n else 0.0, "soft_score": float(soft.mean()) if n else 0.0,
               "loss": result["loss_sum"] / max(1, result["n"]), "n": float(n)}  # fmt: skip
        for group in sorted(set(types.tolist())):
            mask = types == group
            out[f"acc_{_slug(group)}"] = float(acc[mask].mean())
            out[f"soft_score_{_slug(group)}"] = float(soft[mask].mean())
        if n:
            at_prior, prior = at_prior or self.at_prior(result)
            out["prior_acc"] = prior
            out["at_prior_share"] = sum(k for _, _, _, k in at_prior) / n
        return out

    def prior(self) -> tuple[np.ndarray, dict[str, float], dict[str, int], float]:
        """The blind prior: what a model that reads only the question would answer, the training
        answer with the highest summed soft score among questions of the same text (lower-cased),
        or of the same question type for a text training never asked; scored on the evaluation
        split like the model (:meth:`question_scores`).

        Returns:
            (per evaluation question its prior score (N,), in dataset order; prior accuracy per
            question type; evaluation questions per type; overall prior accuracy). Computed once.
        """
        if getattr(self, "_prior", None) is None:
            import pandas as pd

            train, ev = self.data.train, self.data.eval
            idx = np.asarray(train.arrays["label_idx"])
            score = np.asarray(train.arrays["label_score"], np.float64)
            text_codes, texts = pd.factorize(pd.Series([t.lower().strip() for t in train.question_texts()]))
            type_codes = np.asarray(train.arrays["question_type"])

            def best_answer(codes: np.ndarray) -> dict[int, int]:
                """{code: answer index with the highest summed soft score} (ties: the lower index)."""
                table = pd.DataFrame({"code": np.repeat(codes, idx.shape[1]), "answer": idx.ravel(),
                                      "score": score.ravel()})  # fmt: skip
                sums = table[table.answer >= 0].groupby(["code", "answer"], sort=True).score.sum().reset_index()
                sums = sums.sort_values(["code", "score"], ascending=[True, False], kind="mergesort")
                first = sums.drop_duplicates("code")
                return dict(zip(first.code.tolist(), first.answer.tolist()))

            by_text, by_type = best_answer(text_codes), best_answer(type_codes)
            text_index = {t: i for i, t in enumerate(texts)}
            type_index = {t: i for i, t in enumerate(train.question_type_names)}
            qtypes = ev.question_type_of(ev.question_ids)
            guess = np.array([
                by_text.get(text_index.get(text.lower().strip(), -1), by_type.get(type_index.get(qt, -1), -1))
                for text, qt in zip(ev.question_texts(), qtypes)
            ], np.int64)  # fmt: skip
            li, ls = np.asarray(ev.arrays["label_idx"]), np.asarray(ev.arrays["label_score"])
            soft = np.where(li == guess[:, None], ls, 0.0).sum(1)
            scores, _ = self.question_scores({"question_id": ev.question_ids, "pred": np.maximum(guess, 0),
                                              "score": soft})  # fmt: skip
            scores = np.where(guess >= 0, scores, 0.0)  # no training question of its text or type: no answer
            qtypes_arr = np.asarray(qtypes)
            per_type = {t: float(scores[qtypes_arr == t].mean()) for t in sorted(set(qtypes))}
            counts = {t: int((qtypes_arr == t).sum()) for t in per_type}
            self._prior = (scores, per_type, counts, float(scores.mean()) if len(scores) else 0.0)
        return self._prior

    def at_prior(self, result: dict[str, Any]) -> tuple[list[tuple[str, float, float, int]], float]:
        """The question types on which the model is no better than the prior (:data:`PRIOR_MARGIN`):
        ``[(type, model accuracy, prior accuracy, questions)]``, and the overall prior accuracy."""
        _, per_type, counts, overall = self.prior()
        acc, _ = self.question_scores(result)
        qtypes = np.asarray(self.data.eval.question_type_of(result["question_id"]))
        out = []
        for t, p in per_type.items():
            mask = qtypes == t
            if counts[t] < PRIOR_MIN_QUESTIONS or p >= PRIOR_CEILING or not mask.any():
                continue
            a = float(acc[mask].mean())
            if a <= p + PRIOR_MARGIN:
                out.append((t, a, p, int(mask.sum())))
        return out, overall

    def evaluate(self, model: nn.Module, ctx: StepContext) -> EvalResult:
        result = self.predict(model, ctx)
        if self.rank != 0:
            return EvalResult({}, result)
        found = self.at_prior(result)  # once: the metric and the tag both read it
        words = "; ".join(f"{t}: {100 * a:.1f}% vs prior {100 * p:.1f}% ({k} questions)" for t, a, p, k in found[0])
        return EvalResult(self.eval_metrics(result, found), result, {schema.EVAL_AT_PRIOR: words or "none"})

    def artifacts(self, result: EvalResult) -> dict[str, Any]:
        return {schema.PREDICTIONS_ARTIFACT: self.predictions_table(result.payload),
                schema.EXAMPLES_ARTIFACT: self.examples(result.payload, self.cfg.train.n_examples)}

    def predictions_table(self, result: dict[str, Any]) -> str:
        """``eval/predictions.csv``: per question, ``score`` = what ``eval/acc`` averages and
        ``soft_score`` = LXMERT's soft score."""
        acc, soft = self.question_scores(result)
        answers = self.data.answers
        types = self.data.eval.answer_type_of(result["question_id"])
        qtypes = self.data.eval.question_type_of(result["question_id"])
        lines = ["question_id,answer,score,answer_type,question_type,soft_score"]
        for qid, pred, score, atype, qtype, ss in zip(result["question_id"], result["pred"], acc, types, qtypes, soft):
            lines.append(f"{int(qid)},{_csv(answers[int(pred)])},{float(score):.4f},{_csv(atype)},{_csv(qtype)},"
                         f"{float(ss):.4f}")
        return "\n".join(lines) + "\n"

    def examples(self, result: dict[str, Any], n: int) -> list[dict[str, Any]]:
        """Top-5 answers with probabilities for the first ``n`` evaluation questions (Fig. 4)."""
        if n <= 0 or not len(result["question_id"]):
            return []
        ids = self.data.eval.question_ids[:n]
        index = {int(q): i for i, q in enumerate(result["question_id"])}
        out = []
        for qid in ids:
            i = index.get(int(qid))
            if i is None:
                continue
            out.append({
                "question_id": int(qid),
                "question": self.data.eval.question_text(int(qid)),
                "gold": self.data.eval.labels(int(qid)),
                "top5": [{"answer": self.data.answers[int(a)], "prob": float(p)}
                         for a, p in zip(result["top_ids"][i], result["top_probs"][i])],
            })
        return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def _csv(text: str) -> str:
    text = str(text)
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text
