"""The pretraining task adapter (``pretrain``): LXMERT's multi-task pretraining with a task weighting.

Model: :func:`models.lxmert_pretraining` with the heads of ``pretrain.tasks``. Data: the corpus of
:mod:`tasks.pretrain` (offline synthetic, or LXMERT's files). Per step::

    active = tasks the schedule switches on at this epoch / learning rate   (none: the batch is skipped)
    out = model(batch, heads=active)                   # one forward, every active head
    losses = {t: objective_t(out, batch)}               # means over each task's terms
    strategy.update(step, losses, shared, counts)       # grad_std / gradnorm: per-task gradients
    loss = strategy.combine(losses)                     # the loop adds aux, steps, clips, ...

After every epoch the held-out split is scored with fixed masks (seeded by the trial seed, so cells
with the same seed see identical evaluation batches). Metrics (bare; the loop puts them under
``pretrain/``): ``loss``, ``loss_<task>``, ``acc_<task>``, ``weight_<task>``, the strategy's signals,
``weighting_s`` / ``weighting_frac``; evaluation ``loss_<task>`` / ``acc_<task>`` (logged as
``pretrain/eval_*``). Artifact every epoch: ``weights.csv`` (the weights over steps).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from tasks.base import MODEL_INPUTS, EvalResult, OptimSpec, StepContext, StepLoss, TaskAdapter

#: Seed offset of the evaluation batches' masks (never equal to a training epoch).
EVAL_EPOCH = 1_000_000


class HeadOutputs(nn.Module):
    """What trains: the pretraining model's head outputs alone (a dict of tensors).

    DDP finds the parameters a step did not use by walking back from the forward's outputs. With
    ``lang`` / ``visn`` / ``pooled`` among them, parameters that only feed a head that did not run
    (the last cross layer's vision branch without ``mor``, the pooler without ``match`` / ``qa``)
    would look used but get no gradient, and DDP would fail.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> dict[str, Any]:
        from models import PRETRAIN_HEADS

        out = self.model(**inputs)
        return {k: getattr(out, k) for k in PRETRAIN_HEADS if getattr(out, k) is not None}


def shared_parameters(model: nn.Module, which: str) -> list[torch.Tensor]:
    """The parameters every task trains, whose per-task gradients grad_std / gradnorm read.

    Args:
        model: An :class:`models.LxmertForPretraining`.
        which: ``encoder``: every encoder parameter but the word embeddings (they double as the MLM
            decoder, so under MLM their gradient is mostly an output layer's); ``last_layer``: the
            last cross-modality layer (GradNorm's "last shared layer"; the extra backward passes
            then stop there).
    """
    lxmert = model.lxmert
    if which == "encoder":
        return [p for n, p in lxmert.named_parameters() if n != "embeddings.word.weight" and p.requires_grad]
    if which == "last_layer":
        layers = lxmert.encoder.cross_layers
        if not len(layers):
            raise ValueError("pretrain.shared=last_layer needs model.x_layers >= 1")
        return [p for p in layers[-1].parameters() if p.requires_grad]
    raise ValueError(f"pretrain.shared={which!r}: expected encoder or last_layer")


def pretraining_model(cfg, corpus) -> nn.Module:
    """The pretraining model of ``cfg`` (encoder + the heads of ``pretrain.tasks``, sized by the
    corpus ``corpus``): what the ``pretrain`` stage trains and what a stage that takes over its
    whole model (``retrieval``) rebuilds before the hand-over."""
    import models

    p = cfg.pretrain
    return models.lxmert_pretraining(
        cfg.model, tuple(p.task_list), num_object_labels=corpus.num_object_labels,
        num_attr_labels=corpus.num_attr_labels, num_qa_answers=len(corpus.answers), contrastive_dim=p.contrastive_dim,
        contrastive_temperature=p.contrastive_temperature, contrastive_learn_temperature=p.contrastive_learn_temperature,
    )  # fmt: skip


class PretrainAdapter(TaskAdapter):
    """LXMERT's pretraining objectives (``pretrain.tasks``) under a task weighting (``pretrain.weighting``)."""

    name = "pretrain"
    data_names = ()  # never a trial's last stage by data.name: it runs when pretrain.enabled
    primary_metric = None
    fresh_on_init = ("heads.*",)  # pretraining continues from given weights; heads they lack start fresh
    fresh_on_transfer = ("heads.*",)

    def __init__(self, cfg, rank: int = 0, world_size: int = 1, device: torch.device | None = None, log=print):
        import tasks.pretrain as tp
        from tasks.pretrain import objectives
        from tasks.pretrain import weighting as wt

        super().__init__(cfg, rank, world_size, device, log)
        self.pcfg = pcfg = cfg.pretrain
        self.data = tp.load(pcfg, cfg.data)
        self.tasks = pcfg.task_list
        self.rules = pcfg.rules
        if self.data.visual_feat_dim != cfg.model.visual_feat_dim:
            raise ValueError(f"model.visual_feat_dim={cfg.model.visual_feat_dim} but the pretraining corpus has "
                             f"{self.data.visual_feat_dim}-d region features")  # fmt: skip
        if int(self.data.meta["vocab_size"]) > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the corpus tokenizer's "
                             f"{self.data.meta['vocab_size']} words")  # fmt: skip
        sizes = {"vocab_size": cfg.model.vocab_size, "num_object_labels": self.data.num_object_labels,
                 "num_attr_labels": self.data.num_attr_labels, "visual_feat_dim": self.data.visual_feat_dim,
                 "num_qa_answers": len(self.data.answers)}  # fmt: skip
        self.scales = objectives.chance_scales(self.tasks, sizes)
        self.objectives = {t: objectives.get(t) for t in self.tasks}
        self.weighting = wt.build(pcfg.weighting, self.tasks, self.scales, pcfg).to(self.device)
        self.masking = tp.Masking(tuple(self.tasks), pcfg.mlm_prob, pcfg.mor_prob,
                                  pcfg.mismatch_prob if "match" in self.tasks else 0.0)  # fmt: skip
        self.weight_rows: list[dict[str, Any]] = []
        self.shared: list[torch.Tensor] = []
        self._itm_k_min = pcfg.itm_negatives
        #: Extra contrastive negatives from earlier batches (``pretrain.contrastive_negatives``).
        self.queue = None
        if "contrastive" in self.tasks and pcfg.contrastive_negatives > 0:
            from tasks.pretrain.contrastive import NegativeQueue

            self.queue = NegativeQueue(pcfg.contrastive_negatives, pcfg.contrastive_dim).to(self.device)

    @classmethod
    def prepare(cls, cfg) -> tuple[dict[str, Any], str]:
        import tasks.pretrain

        t0 = time.time()
        corpus = tasks.pretrain.load(cfg.pretrain, cfg.data)
        return {}, (f"pretraining corpus {cfg.pretrain.corpus}: {len(corpus.train)} sentences "
                    f"({len(corpus.eval) if corpus.eval is not None else 0} held out), "
                    f"{len(corpus.answers)} QA answers ({time.time() - t0:.1f} s)")  # fmt: skip

    @classmethod
    def cache_key(cls, cfg) -> str:
        from models.configkit import flatten

        return f"{cls.name}:{flatten(cfg.data)!r}{flatten(cfg.pretrain)!r}"

    # -- the stage -------------------------------------------------------------------------------

    def optim(self) -> OptimSpec:
        p = self.pcfg
        return OptimSpec(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, optimizer="adamw",
                         weight_decay=p.weight_decay, schedule="linear", warmup_ratio=p.warmup_ratio,
                         grad_clip=p.grad_clip)  # fmt: skip

    def build_model(self) -> nn.Module:
        model = pretraining_model(self.cfg, self.data)
        self.shared = shared_parameters(model, self.pcfg.shared)
        return model

    def trainable(self, model: nn.Module) -> nn.Module:
        return HeadOutputs(model)

    def optimized(self, model: nn.Module) -> nn.Module:
        # The strategy's learned parameters (uncertainty's log-variances) train with the model.
        return nn.ModuleDict({"model": model, "weighting": self.weighting})

    def train_length(self) -> int:
        return len(self.data.train)

    def train_batches(self, epoch: int):
        return self.data.train.batches(self.pcfg.batch_size, self.masking, shuffle=True, seed=self.cfg.train.seed,
                                       epoch=epoch, rank=self.rank, world_size=self.world_size)  # fmt: skip

    def sequence_shape(self) -> tuple[int, int]:
        return int(self.data.meta.get("max_seq_len", 0)), int(self.data.meta.get("num_regions", 0))

    def tags(self) -> dict[str, str]:
        return {"pretrain.weighting": self.pcfg.weighting, "pretrain.tasks": ",".join(self.tasks),
                "pretrain.corpus": self.pcfg.corpus}  # fmt: skip

    # -- training --------------------------------------------------------------------------------

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor], active: list[str], ctx: StepContext):
        kwargs: dict[str, Any] = {"heads": tuple(active)}
        if "mlm" in active:
            kwargs["mlm_mask"] = batch["mlm_labels"] >= 0
        if "mor" in active:
            kwargs["region_mask"] = batch["region_mask"]
        with ctx.autocast():
            # The objectives read the heads as attributes (out.mlm, out.mor["feat"], ...).
            return SimpleNamespace(**model(**{k: batch[k] for k in MODEL_INPUTS}, **kwargs))

    def _forward_scored(self, model: nn.Module, batch: dict[str, torch.Tensor], active: list[str], ctx: StepContext,
                        seed: int) -> tuple[SimpleNamespace, Any]:  # fmt: skip
        """The forward of ``batch`` and, with ``pretrain.itm_negatives`` = K and ``match`` active, the
        contrastive matching loss (Hendricks et al. 2021) from the same forward.

        The batch's true pairs (``match_labels == 1``) are laid out with K texts of other images each
        (:func:`tasks.pretrain.contrastive.negative_pairs`, drawn with ``seed``) and appended to the
        batch: one forward (so DDP sees one), every head on the batch's own rows as before (MLM / MRM
        read masked positions, which the appended rows have none of), the matching head's log-odds of
        the appended rows under InfoNCE over 1 + K. Returns (the outputs of the batch's own rows, the
        matching :class:`tasks.pretrain.objectives.TaskLoss` or None).
        """
        k = self.pcfg.itm_negatives
        if not k or "match" not in active:
            return self._forward(model, batch, active, ctx), None
        from tasks.pretrain.contrastive import batch_groups, itm_info_nce, negative_pairs
        from tasks.pretrain.objectives import TaskLoss

        b = batch["input_ids"].shape[0]
        true = batch["match_labels"] == 1
        groups = batch_groups(batch, b, batch["input_ids"].device)[true]
        other = (groups[:, None] != groups[None, :]).sum(1)
        k = min(k, int(other.min())) if len(groups) else 0  # a small batch: as many as every row has
        self._itm_k_min = min(self._itm_k_min, k)
        if k == 0:
            out = self._forward(model, batch, active, ctx)
            return out, TaskLoss(out.match.float().sum() * 0.0, 0, correct=0.0)
        pairs = negative_pairs({key: batch[key][true] for key in MODEL_INPUTS}, k, groups,
                               torch.Generator().manual_seed(seed))  # fmt: skip
        n = pairs["input_ids"].shape[0]
        joint = {key: torch.cat([batch[key], pairs[key]]) for key in MODEL_INPUTS}
        kwargs: dict[str, Any] = {"heads": tuple(active)}
        if "mlm" in active:  # the appended rows have no masked token and no masked region
            mlm = batch["mlm_labels"] >= 0
            kwargs["mlm_mask"] = torch.cat([mlm, mlm.new_zeros(n, mlm.shape[1])])
        if "mor" in active:
            regions = batch["region_mask"]
            kwargs["region_mask"] = torch.cat([regions, regions.new_zeros(n, regions.shape[1])])
        with ctx.autocast():
            raw = model(**joint, **kwargs)
        itm = itm_info_nce(raw["match"][b:], 1 + k)
        out = {name: (value[:b] if name in ("match", "qa") else value) for name, value in raw.items()}
        if "contrastive" in out:
            c = out["contrastive"]
            out["contrastive"] = {**c, "text": c["text"][:b], "image": c["image"][:b]}
        return SimpleNamespace(**out), TaskLoss(itm.loss, itm.n, {}, correct=itm.correct)

    def start_epoch(self, epoch: int) -> None:
        self._sums = {t: {"loss": 0.0, "n": 0, "correct": 0.0, "weight": 0.0} for t in self.tasks}
        self._parts: dict[str, list[float]] = {}
        self._total, self._steps, self._weighting_s, self._t0 = 0.0, 0, 0.0, time.perf_counter()
        self._itm_k_min = self.pcfg.itm_negatives  # the fewest contrastive-matching negatives a batch had

    def train_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepLoss | None:
        from tasks.pretrain import active_tasks

        active = active_tasks(self.tasks, self.rules, ctx.epoch + 1, ctx.lr)
        if not active:
            return None  # the schedule has every task off at this point: nothing to train
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        out, itm = self._forward_scored(model, batch, active, ctx, seed=self.cfg.train.seed * 1_000_003 + ctx.step)
        push = None
        if self.queue is not None and "contrastive" in active:
            # The queue's entries join this batch's candidates (the objective reads them from the
            # head's output); this batch's own true pairs are pushed after the step (after_step).
            c = out.contrastive
            push = _true_pairs(c, batch)
            out.contrastive = {**c, **self.queue.negatives()}
        results = {t: itm if t == "match" and itm is not None else self.objectives[t].loss(out, batch) for t in active}
        losses = {t: r.loss for t, r in results.items()}
        weights = self.weighting.update(ctx.step, losses, self.shared, {t: r.n for t, r in results.items()})
        return StepLoss(self.weighting.combine(losses), batch["input_ids"].shape[0], (results, weights, active, push))

    def after_backward(self) -> None:
        """The strategy's parameters live outside DDP: average their gradients by hand."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        for p in self.weighting.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def after_step(self, ctx: StepContext, out: StepLoss, finite: bool, total: float, aux: float) -> None:
        results, weights, active, push = out.extra
        if push is not None and finite:
            self.queue.push(*push)
        if ctx.step % self.pcfg.weight_every == 0:
            signals = self.weighting.signals()
            for t in self.tasks:
                self.weight_rows.append({"step": ctx.step, "epoch": ctx.epoch + 1, "task": t,
                                         "weight": weights.get(t, 0.0), "active": int(t in active),
                                         "signal": _signal_of(signals, t)})  # fmt: skip
        self._weighting_s += self.weighting.last_update_s
        if not finite:
            return  # a skipped step: its losses would make the epoch's means NaN
        self._steps += 1
        self._total += total
        for t, r in results.items():
            s = self._sums[t]
            s["loss"] += float(r.loss.detach()) * r.n
            s["n"] += r.n
            s["correct"] += r.correct or 0.0
            for k, v in r.parts.items():
                self._parts.setdefault(k, [0.0, 0.0])
                self._parts[k][0] += v * r.n
                self._parts[k][1] += r.n
        for t in self.tasks:
            self._sums[t]["weight"] += weights.get(t, 0.0)

    def train_metrics(self) -> dict[str, float]:
        seconds = time.perf_counter() - self._t0
        metrics = {"loss": self._total / max(1, self._steps), "weighting_s": self._weighting_s,
                   "weighting_frac": self._weighting_s / max(seconds, 1e-9)}  # fmt: skip
        for t, s in self._sums.items():
            if s["n"]:
                metrics[f"loss_{t}"] = s["loss"] / s["n"]
                metrics[f"acc_{t}"] = s["correct"] / s["n"]
            # The weight the task had, averaged over the epoch's steps (0 while the schedule had it off).
            metrics[f"weight_{t}"] = s["weight"] / max(1, self._steps)
        for k, (v, n) in self._parts.items():
            if n:
                metrics[f"loss_{k}"] = v / n
        metrics.update(self.weighting.signals())
        if self.pcfg.itm_negatives and "match" in self.tasks:
            metrics["itm_negatives_min"] = float(self._itm_k_min)
        if self.queue is not None:
            metrics["contrastive_queue"] = float(self.queue.filled)  # extra negatives at the epoch's end
        return metrics

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: StepContext) -> EvalResult:
        """Every task's loss and accuracy on the held-out split, with fixed masks (this rank's shard)."""
        if self.data.eval is None:
            return EvalResult({})
        model.eval()
        sums = {t: [0.0, 0, 0.0] for t in self.tasks}
        self._itm_k_min = self.pcfg.itm_negatives
        batches = self.data.eval.batches(self.pcfg.eval_batch_size, self.masking, shuffle=False,
                                         seed=self.cfg.train.seed, epoch=EVAL_EPOCH, rank=self.rank,
                                         world_size=self.world_size)  # fmt: skip
        for index, batch in enumerate(batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            out, itm = self._forward_scored(model, batch, self.tasks, ctx, seed=self.cfg.train.seed + EVAL_EPOCH + index)
            for t in self.tasks:
                r = itm if t == "match" and itm is not None else self.objectives[t].loss(out, batch)
                sums[t][0] += float(r.loss) * r.n
                sums[t][1] += r.n
                sums[t][2] += r.correct or 0.0
        if self.world_size > 1:
            import torch.distributed as dist

            buf = torch.tensor([v for t in self.tasks for v in sums[t]], dtype=torch.float64,
                               device=self.device if self.device.type == "cuda" else None)  # fmt: skip
            dist.all_reduce(buf)
            values = buf.cpu().tolist()
            sums = {t: values[3 * i : 3 * i + 3] for i, t in enumerate(self.tasks)}
        out = {}
        for t, (loss, n, correct) in sums.items():
            if n:
                out[f"loss_{t}"] = loss / n
                out[f"acc_{t}"] = correct / n
        return EvalResult(out)

    def epoch_artifacts(self) -> dict[str, Any]:
        from sweeps.tracking import csv_text  # only ever called where the loop logs to MLflow

        return {"weights.csv": csv_text(self.weight_rows)}

    def progress(self, metrics: dict[str, float]) -> str:
        losses = " ".join(f"{t} {metrics[f'loss_{t}']:.3f}" for t in self.tasks if f"loss_{t}" in metrics)
        weights = " ".join(f"{t} {metrics[f'weight_{t}']:.2f}" for t in self.tasks)
        return f"({self.pcfg.weighting}) losses {losses}; weights {weights}"

    # -- checkpoint ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {"weighting": self.weighting.state_dict(), "weight_rows": self.weight_rows}
        if self.queue is not None:  # rank 0's queue (under DDP every rank resumes with it)
            state["contrastive_queue"] = self.queue.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weighting.load_state_dict(state["weighting"])
        self.weight_rows = list(state["weight_rows"])
        if self.queue is not None and "contrastive_queue" in state:
            self.queue.load_state_dict(state["contrastive_queue"])


def _true_pairs(c: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
    """(text (P, D), image (P, D), groups (P,)) of the batch's true pairs (``match_labels == 1``, every
    row without matching labels): what the contrastive objective's queries are, and what the queue keeps."""
    from tasks.pretrain.contrastive import batch_groups

    text, image = c["text"].detach(), c["image"].detach()
    labels = batch.get("match_labels")
    valid = labels == 1 if labels is not None else torch.ones(text.shape[0], dtype=torch.bool, device=text.device)
    return text[valid], image[valid], batch_groups(batch, text.shape[0], text.device)[valid]


def _signal_of(signals: dict[str, float], task: str) -> float:
    """The statistic behind a task's weight (s_t, GradNorm's gradient norm, the log-variance)."""
    for prefix in ("s_", "grad_norm_", "log_var_"):
        if f"{prefix}{task}" in signals:
            return signals[f"{prefix}{task}"]
    return float("nan")
