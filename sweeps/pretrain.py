"""The pretraining stage of a trial: LXMERT's multi-task pretraining with a task weighting.

:class:`PretrainStage` knows nothing about Ray or MLflow (like :class:`sweeps.train.TrialLoop`,
which runs it before fine-tuning when ``pretrain.enabled``): it builds the pretraining model
(:func:`models.lxmert_pretraining`), the corpus (:mod:`tasks.pretrain`), the weighting strategy
(:mod:`tasks.pretrain.weighting`) and an AdamW optimizer with linear warm-up and decay, and runs
one pretraining epoch per :meth:`PretrainStage.run_epoch`. Per step::

    active = tasks the schedule switches on at this epoch / learning rate
    out = model(batch, heads=active)                   # one forward, every active head
    losses = {t: objective_t(out, batch)}               # means over each task's terms
    strategy.update(step, losses, shared, counts)       # grad_std / gradnorm: per-task gradients
    (strategy.combine(losses) + aux).backward(); clip; optimizer.step(); schedule.step(); post_step

After every epoch the held-out split is scored with fixed masks (seeded by the trial seed, so
cells with the same seed see identical evaluation batches), and the epoch's metrics (per-task
losses, accuracies and weights, ``pretrain/*``) and the whole state (model, optimizer, schedule,
strategy, history) are returned for the caller's checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from sweeps.failures import FiniteGuard, grad_norm
from sweeps.optim import build_optimizer, build_schedule, total_steps

PRETRAIN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos")
#: Seed offset of the evaluation batches' masks (never equal to a training epoch).
EVAL_EPOCH = 1_000_000


class HeadOutputs(nn.Module):
    """What trains: the pretraining model's head outputs alone (a dict of tensors).

    DDP finds the parameters a step did not use by walking back from the forward's outputs. With
    ``lang`` / ``visn`` / ``pooled`` among them, parameters that only feed a head that did not run
    (the last cross layer's vision branch without ``mor``, the pooler without ``match`` / ``qa``)
    would look used but get no gradient, and DDP would fail (as :class:`sweeps.train.VQALogits`
    explains for fine-tuning).
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


class PretrainStage:
    """Pretraining of one trial.

    Args:
        cfg: The trial's ``ExperimentConfig`` (``pretrain``, ``model``, ``data``, ``train.seed``).
        rank, world_size: This worker's place in the group (each rank trains on its shard).
        device: Where the model runs.
        wrap_model: Turns the plain model into what trains (DDP); identity by default.
        autocast: A context factory (bf16 autocast on CUDA, else a no-op).
        log: Progress messages.
    """

    def __init__(self, cfg, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 wrap_model: Callable[[nn.Module], nn.Module] | None = None,
                 autocast: Callable[[], Any] = nullcontext, log: Callable[[str], None] = print):  # fmt: skip
        import models
        import tasks.pretrain as tp
        from tasks.pretrain import objectives
        from tasks.pretrain import weighting as wt

        self.cfg = cfg
        self.pcfg = pcfg = cfg.pretrain
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        self.autocast = autocast
        self.log = log
        self.data = tp.load(pcfg, cfg.data)
        self.tasks = pcfg.task_list
        self.rules = pcfg.rules
        if self.data.visual_feat_dim != cfg.model.visual_feat_dim:
            raise ValueError(f"model.visual_feat_dim={cfg.model.visual_feat_dim} but the pretraining corpus has "
                             f"{self.data.visual_feat_dim}-d region features")  # fmt: skip
        if int(self.data.meta["vocab_size"]) > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the corpus tokenizer's "
                             f"{self.data.meta['vocab_size']} words")  # fmt: skip
        model = models.lxmert_pretraining(
            cfg.model, tuple(self.tasks), num_object_labels=self.data.num_object_labels,
            num_attr_labels=self.data.num_attr_labels, num_qa_answers=len(self.data.answers),
        )  # fmt: skip
        if cfg.train.init_checkpoint:
            from models.checkpoint import load_pretrained

            # Pretraining continues from the given weights; heads the checkpoint lacks start fresh.
            report = load_pretrained(model, cfg.train.init_checkpoint, strict=not cfg.train.init_allow_partial,
                                     allow=["heads.*"], verbose=False)  # fmt: skip
            self.log(f"pretraining starts from {cfg.train.init_checkpoint}: {report}")
        model.to(self.device)
        self.core = model
        self.model = wrap_model(HeadOutputs(model)) if wrap_model else HeadOutputs(model)
        sizes = {"vocab_size": cfg.model.vocab_size, "num_object_labels": self.data.num_object_labels,
                 "num_attr_labels": self.data.num_attr_labels, "visual_feat_dim": self.data.visual_feat_dim,
                 "num_qa_answers": len(self.data.answers)}  # fmt: skip
        self.scales = objectives.chance_scales(self.tasks, sizes)
        self.objectives = {t: objectives.get(t) for t in self.tasks}
        self.weighting = wt.build(pcfg.weighting, self.tasks, self.scales, pcfg).to(self.device)
        # The strategy's learned parameters (uncertainty's log-variances) train with the model.
        self.optimizer = build_optimizer(nn.ModuleDict({"model": model, "weighting": self.weighting}), "adamw",
                                         pcfg.lr, pcfg.weight_decay)  # fmt: skip
        self.steps_total = total_steps(len(self.data.train), pcfg.batch_size, world_size, pcfg.epochs)
        self.schedule = build_schedule(self.optimizer, "linear", self.steps_total, pcfg.warmup_ratio)
        self.shared = shared_parameters(model, pcfg.shared)
        self.masking = tp.Masking(tuple(self.tasks), pcfg.mlm_prob, pcfg.mor_prob,
                                  pcfg.mismatch_prob if "match" in self.tasks else 0.0)  # fmt: skip
        self.epoch = 0
        self.step = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self.weight_rows: list[dict[str, Any]] = []
        self.elapsed_s = 0.0
        # Steps skipped for a non-finite loss (train.max_nonfinite_steps applies to this stage too).
        self.guard = FiniteGuard("pretrain", cfg.train.max_nonfinite_steps, world_size, self.device)
        #: The trial's last checkpoint (set by the trial loop), named if this stage diverges.
        self.last_checkpoint = ""

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "weighting": self.weighting.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "weight_rows": self.weight_rows,
            "elapsed_s": self.elapsed_s,
            "nonfinite_steps": self.guard.count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from models.layerdrop import set_step

        self.core.load_state_dict(state["model"])
        self.weighting.load_state_dict(state["weighting"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.history = [(int(e), dict(m)) for e, m in state["history"]]
        self.weight_rows = list(state["weight_rows"])
        self.elapsed_s = float(state["elapsed_s"])
        self.guard.count = int(state.get("nonfinite_steps", 0))
        set_step(self.core, self.step)

    @property
    def done(self) -> bool:
        return self.epoch >= self.pcfg.epochs

    # -- one epoch ------------------------------------------------------------------------------

    def _forward(self, batch: dict[str, torch.Tensor], active: list[str]):
        inputs = {k: batch[k] for k in PRETRAIN_INPUTS}
        kwargs = {"heads": tuple(active)}
        if "mlm" in active:
            kwargs["mlm_mask"] = batch["mlm_labels"] >= 0
        if "mor" in active:
            kwargs["region_mask"] = batch["region_mask"]
        with self.autocast():
            # The objectives read the heads as attributes (out.mlm, out.mor["feat"], ...).
            return SimpleNamespace(**self.model(**inputs, **kwargs))

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_epoch(self) -> dict[str, float]:
        """One pass over this rank's shard of the corpus; returns the epoch's ``pretrain/*`` metrics."""
        from tasks.pretrain import active_tasks

        pcfg, cfg = self.pcfg, self.cfg
        self.model.train()
        sums = {t: {"loss": 0.0, "n": 0, "correct": 0.0, "weight": 0.0} for t in self.tasks}
        parts: dict[str, list[float]] = {}
        total_loss, steps, samples, weighting_s = 0.0, 0, 0, 0.0
        start = time.perf_counter()
        for batch in self.data.train.batches(pcfg.batch_size, self.masking, shuffle=True, seed=cfg.train.seed,
                                             epoch=self.epoch, rank=self.rank, world_size=self.world_size):  # fmt: skip
            active = active_tasks(self.tasks, self.rules, self.epoch + 1, self._lr())
            if not active:
                continue  # the schedule has every task off at this point: nothing to train
            results, weights, total = self.train_step(batch, active)
            weighting_s += self.weighting.last_update_s
            if not math.isfinite(total):
                continue  # a skipped step (FiniteGuard): its losses would make the epoch's means NaN
            steps += 1
            samples += batch["input_ids"].shape[0]
            total_loss += total
            for t, r in results.items():
                s = sums[t]
                s["loss"] += float(r.loss.detach()) * r.n
                s["n"] += r.n
                s["correct"] += r.correct or 0.0
                for k, v in r.parts.items():
                    parts.setdefault(k, [0.0, 0.0])
                    parts[k][0] += v * r.n
                    parts[k][1] += r.n
            for t in self.tasks:
                sums[t]["weight"] += weights.get(t, 0.0)
        seconds = time.perf_counter() - start
        metrics = {
            "pretrain/loss": total_loss / max(1, steps),
            "pretrain/lr": self._lr(),
            "pretrain/epoch_s": seconds,
            "pretrain/samples_per_s": samples * self.world_size / max(seconds, 1e-9),
            "pretrain/steps": float(self.step),
            "pretrain/weighting_s": weighting_s,
            "pretrain/weighting_frac": weighting_s / max(seconds, 1e-9),
            "pretrain/nonfinite_steps": float(self.guard.count),
        }
        for t, s in sums.items():
            if s["n"]:
                metrics[f"pretrain/loss_{t}"] = s["loss"] / s["n"]
                metrics[f"pretrain/acc_{t}"] = s["correct"] / s["n"]
            # The weight the task had, averaged over the epoch's steps (0 while the schedule had it off).
            metrics[f"pretrain/weight_{t}"] = s["weight"] / max(1, steps)
        for k, (v, n) in parts.items():
            if n:
                metrics[f"pretrain/loss_{k}"] = v / n
        for k, v in self.weighting.signals().items():
            metrics[f"pretrain/{k}"] = v
        return metrics

    def train_step(self, batch: dict[str, torch.Tensor], active: list[str]) -> tuple[dict, dict[str, float], float]:
        """One optimisation step on ``batch`` with the ``active`` tasks.

        Returns:
            (``{task: TaskLoss}``, the weights applied, the weighted total loss).
        """
        import models.hooks as hooks

        pcfg = self.pcfg
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        out = self._forward(batch, active)
        results = {t: self.objectives[t].loss(out, batch) for t in active}
        losses = {t: r.loss for t, r in results.items()}
        counts = {t: r.n for t, r in results.items()}
        weights = self.weighting.update(self.step, losses, self.shared, counts)
        aux = hooks.aux_loss(self.core)
        total = self.weighting.combine(losses)
        total = total + aux if torch.is_tensor(aux) else total
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self._sync_strategy_grads()
        norm = grad_norm(self.core.parameters(), pcfg.grad_clip)
        total_value = float(total.detach())
        if self.guard.finite(total_value, norm):
            self.optimizer.step()
        else:  # skipped (its NaN gradient would poison every weight), or the trial stops here
            self.guard.skip(self.epoch + 1, self.step + 1, total_value, norm, self.last_checkpoint)
            self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        hooks.post_step(self.core)
        if self.step % pcfg.weight_every == 0:
            signals = self.weighting.signals()
            for t in self.tasks:
                self.weight_rows.append({"step": self.step, "epoch": self.epoch + 1, "task": t,
                                         "weight": weights.get(t, 0.0), "active": int(t in active),
                                         "signal": _signal_of(signals, t)})  # fmt: skip
        self.step += 1
        return results, weights, float(total.detach())

    def _sync_strategy_grads(self) -> None:
        """The strategy's parameters live outside DDP: average their gradients by hand."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        for p in self.weighting.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every task's loss and accuracy on the held-out split, with fixed masks (this rank's shard)."""
        if self.data.eval is None:
            return {}
        self.model.eval()
        sums = {t: [0.0, 0, 0.0] for t in self.tasks}
        for batch in self.data.eval.batches(self.pcfg.eval_batch_size, self.masking, shuffle=False,
                                            seed=self.cfg.train.seed, epoch=EVAL_EPOCH, rank=self.rank,
                                            world_size=self.world_size):  # fmt: skip
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            out = self._forward(batch, self.tasks)
            for t in self.tasks:
                r = self.objectives[t].loss(out, batch)
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
                out[f"pretrain/eval_loss_{t}"] = loss / n
                out[f"pretrain/eval_acc_{t}"] = correct / n
        return out

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch, evaluate, record it in ``history``; returns its metrics (rank 0's view)."""
        t0 = time.perf_counter()
        metrics = self.train_epoch()
        metrics.update(self.evaluate())
        self.epoch += 1
        self.elapsed_s += time.perf_counter() - t0
        metrics["pretrain/time_s"] = self.elapsed_s
        metrics["pretrain/epoch"] = float(self.epoch)
        self.history.append((self.epoch, dict(metrics)))
        return metrics


def _signal_of(signals: dict[str, float], task: str) -> float:
    """The statistic behind a task's weight (s_t, GradNorm's gradient norm, the log-variance)."""
    for prefix in ("s_", "grad_norm_", "log_var_"):
        if f"{prefix}{task}" in signals:
            return signals[f"{prefix}{task}"]
    return float("nan")
