"""The loop that trains one trial: :class:`TrialLoop`.

The loop knows nothing about Ray: it takes a rank, a world size, a device, a way to wrap the model
(DDP or not), a checkpoint to resume from and a ``report`` callback. ``sweeps/executor.py`` binds
those to Ray, in the Tune trial's own process (one-worker CPU trials) or on every worker of a Ray
Train worker group (``train_fn_per_worker``, DDP), so the same loop runs in unit tests without a
cluster, in a Tune trial, and on GPU nodes under DDP. Its :class:`TimeAccount` says where the
trial's time went (start-up, training, evaluation, checkpoints, the rest).

With ``pretrain.enabled`` the trial first pretrains (:class:`sweeps.pretrain.PretrainStage`: one
checkpoint and one MLflow step per pretraining epoch, under ``pretrain/*`` with its own epoch
counter ``pretrain/epoch``), then imports the pretrained encoder into the VQA model (strict, the
load report logged) and fine-tunes as below. Without it nothing changes.

Per epoch: train over this rank's shard (bf16 autocast on CUDA), add every module's
``aux_loss()`` (the span penalty), call every ``post_step()`` (clamping z and alpha) after each
optimizer step, evaluate on the evaluation split, gather predictions on rank 0, checkpoint
(model, optimizer, schedule, metric history) through ``report``, then log to MLflow (rank 0 only;
idempotent per epoch, so a resumed trial never logs an epoch twice and catches up any it missed).
"""

from __future__ import annotations

import dataclasses
import io
import random
import time
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import models.hooks as hooks
import schema
from models.layerdrop import set_step as set_layerdrop_step
from sweeps.config import ExperimentConfig
from sweeps.failures import CheckpointRefused, FiniteGuard, classify, grad_norm, record_failure
from sweeps.optim import build_optimizer, build_schedule, total_steps

STATE_FILE = "state.pt"
#: The pretraining stage's epoch counter in MLflow (its metrics are logged at step = that epoch).
PRETRAIN_EPOCH = "pretrain/epoch"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos")
#: Values of the MLflow tag ``eval.metric``: what a trial's ``eval/acc`` (and ``best/acc``) is.
EVAL_OFFICIAL = "vqa_official"
EVAL_SOFT = "soft_score"


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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP / FSDP wrapper and :class:`VQALogits` (hooks, state dicts)."""
    model = getattr(model, "module", model)
    return model.model if isinstance(model, VQALogits) else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The three generators' states in types ``torch.load(weights_only=True)`` accepts.

    numpy's state is ``("MT19937", uint32 keys, pos, has_gauss, cached_gaussian)``: its key array
    becomes an int64 tensor (a numpy array would need numpy's unpickler); Python's is a tuple of
    ints already.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


#: Checkpoints written before the RNG state was stored as tensors hold numpy's uint32 key array.
#: Rebuilding a plain numpy array runs no code (an object array would need further globals,
#: which stay refused), so these are allowed on top of torch's own list.
_NUMPY_ARRAYS = [(getattr(np, "_core", None) or np.core).multiarray._reconstruct, np.ndarray, np.dtype,
                 type(np.dtype(np.uint32))]


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a trial checkpoint (``state.pt``) without executing anything it holds.

    ``torch.load(weights_only=True)`` rebuilds only tensors and plain containers: a file whose
    unpickling would call a function (``os.system``, any class) is refused before the call. The
    runs dir is shared storage on clusters, so nothing read from it is trusted.

    Raises:
        CheckpointRefused: naming the file and why (missing, empty, truncated, not a torch file,
            or holding objects other than tensors and plain containers).
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointRefused(f"trial checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointRefused(f"trial checkpoint {path} is empty (0 bytes): it was not written completely")
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAYS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
        raise CheckpointRefused(
            f"trial checkpoint {path} holds more than tensors and plain containers, so it is not loaded "
            f"(loading it could run code): {detail}. The platform never writes such files: it was replaced or "
            "written by other code; remove that checkpoint folder to resume from the one before."
        ) from None
    except Exception as err:  # truncated / not a torch file: EOFError, RuntimeError, IndexError, ...
        raise CheckpointRefused(
            f"trial checkpoint {path} ({size} bytes) cannot be read: {type(err).__name__}: {str(err)[:300]} "
            "(truncated or not a torch file); remove that checkpoint folder to resume from the one before"
        ) from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch"} <= set(state):
        raise CheckpointRefused(f"trial checkpoint {path} is not a trial state (no model / optimizer / epoch entries)")
    return state


def stats_rows(stats: dict[str, list[float]], epoch: int) -> list[dict[str, Any]]:
    """``{"lang/3/self/span": [per head]}`` -> rows for the per-head table artifact."""
    rows = []
    for key, values in stats.items():
        stack, layer, attention, stat = key.split("/")
        for head, value in enumerate(values):
            rows.append(dict(epoch=epoch, stack=stack, layer=int(layer), attention=attention,
                             stat=stat, head=head, value=float(value)))
    return rows


def stats_summary(stats: dict[str, list[float]]) -> dict[str, float]:
    """Per-layer summary metrics: ``span/lang/3/self`` = mean span over heads (also ``_max``)."""
    out: dict[str, float] = {}
    for key, values in stats.items():
        stack, layer, attention, stat = key.split("/")
        name = f"{stat}/{stack}/{layer}/{attention}"
        out[name] = float(np.mean(values))
        out[f"{name}_max"] = float(np.max(values))
    return out


#: The parts of a trial's wall-clock time (seconds), logged as ``time/<part>`` (docs/tracking.md).
TIME_PARTS = ("startup_s", "train_s", "eval_s", "checkpoint_s", "other_s")


class TimeAccount:
    """Where one trial's wall-clock time goes, summed over its attempts.

    An attempt starts when the process that runs it begins (``started``, a ``time.time()``: the
    Tune trainable's first line, or for a restarted Train worker group its worker's start); its
    ``startup_s`` ends at its first training step. ``train_s``, ``eval_s`` and ``checkpoint_s``
    are the time inside :meth:`TrialLoop.train_epoch`, :meth:`TrialLoop.evaluate` (pretraining:
    its training epochs and its held-out scoring) and the ``report`` callback; ``other_s`` is the
    rest of the trial's wall time (MLflow, statistics, building the model and data after start-up).
    The account travels in the checkpoint, so an attempt adds to what earlier ones spent up to
    their last checkpoint (as of when it was built, before it was persisted); what a killed
    attempt spent after that is lost with it.
    """

    def __init__(self, started: float | None = None):
        self.started = time.time() if started is None else float(started)
        self.before = {"wall_s": 0.0, **{k: 0.0 for k in TIME_PARTS if k != "other_s"}}
        self.now = {k: 0.0 for k in self.before if k != "wall_s"}
        self.first_step_at: float | None = None

    def first_step(self) -> None:
        """Called as training starts (every epoch); the first call of an attempt ends its start-up."""
        if self.first_step_at is None:
            self.first_step_at = time.time()
            self.now["startup_s"] = max(0.0, self.first_step_at - self.started)

    def add(self, part: str, seconds: float) -> None:
        self.now[part] += seconds

    def total(self, part: str) -> float:
        return self.before[part] + self.now[part]

    def wall_s(self) -> float:
        return self.before["wall_s"] + max(0.0, time.time() - self.started)

    def metrics(self) -> dict[str, float]:
        """``time/<part>`` for every part and ``time/wall_s``; the parts sum to the wall time."""
        wall = self.wall_s()
        out = {f"time/{k}": self.total(k) for k in self.now}
        out["time/other_s"] = max(0.0, wall - sum(out.values()))
        out["time/wall_s"] = wall
        return out

    def state_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall_s(), **{k: self.total(k) for k in self.now}}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.before = {k: float(state.get(k, 0.0)) for k in self.before}


class TrialLoop:
    """Train and evaluate one model for one trial.

    Args:
        cfg: the trial's full config (``model.num_answers`` and ``model.visual_feat_dim`` must
            match the data; the driver sets them).
        rank, world_size: this worker's place in the group.
        device: where the model runs.
        wrap_model: turns the plain model into what trains (e.g. DDP); identity by default.
        started: when this attempt of the trial began (``time.time()``; default: now), the
            start of its :class:`TimeAccount`.
    """

    def __init__(self, cfg: ExperimentConfig, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None,
                 wrap_model: Callable[[nn.Module], nn.Module] | None = None,
                 log: Callable[[str], None] = print, started: float | None = None):
        import models
        import tasks

        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        self.log = log if rank == 0 else (lambda _msg: None)
        self.times = TimeAccount(started)
        seed_everything(cfg.train.seed)
        self.data = tasks.load(cfg.data)
        for key, have in (("num_answers", self.data.num_answers), ("visual_feat_dim", self.data.visual_feat_dim)):
            want = getattr(cfg.model, key)
            if want != have:
                raise ValueError(f"model.{key}={want} but the data ({cfg.data.name}) has {have}")
        model = models.build_model(cfg.model)
        if cfg.train.init_checkpoint:
            from models.checkpoint import load_pretrained

            report = load_pretrained(model, cfg.train.init_checkpoint, strict=not cfg.train.init_allow_partial)
            self.log(str(report))
        model.to(self.device)
        self.model = wrap_model(VQALogits(model)) if wrap_model else VQALogits(model)
        self.optimizer = build_optimizer(unwrap(self.model), cfg.train.optimizer, cfg.train.lr,
                                         cfg.train.weight_decay, cfg.train.lookahead_k,
                                         cfg.train.lookahead_alpha, cfg.train.mechanism_lr_scale)
        self.steps_total = total_steps(self.data.train.epoch_length, cfg.train.batch_size, world_size,
                                       cfg.train.epochs)
        self.schedule = build_schedule(self.optimizer, cfg.train.schedule, self.steps_total,
                                       cfg.train.warmup_ratio, cfg.train.lr_min, cfg.train.cycle_steps)
        use_bf16 = self.device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        if cfg.train.precision == "bf16" and self.device.type != "cuda":
            use_bf16 = True  # explicitly asked for: CPU autocast supports bf16 too
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        )
        self.precision = "bf16" if use_bf16 else "fp32"
        # Progress of the trial; all of it goes into the checkpoint.
        self.epoch = 0  # epochs completed
        self.step = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self.head_rows: list[dict[str, Any]] = []
        self.best = {"acc": -1.0, "epoch": 0}
        self.elapsed_s = 0.0
        self.steps_dropping = 0  # training steps in which LayerDrop skipped at least one layer
        self.depths = {"lang": cfg.model.l_layers, "visn": cfg.model.r_layers, "cross": cfg.model.x_layers}
        # Steps skipped for a non-finite loss; past train.max_nonfinite_steps the trial stops.
        self.guard = FiniteGuard("finetune", cfg.train.max_nonfinite_steps, world_size, self.device)
        #: Where the last checkpoint went (what ``report`` returned, or the one resumed from).
        self.last_checkpoint = ""
        # The pretraining stage (built when it starts or resumes; dropped once transferred).
        self.wrap_model = wrap_model
        self.pretrain_stage = None
        self.pretrain_summary: dict[str, Any] | None = None

    @property
    def pretrain_pending(self) -> bool:
        """Pretraining is configured and its encoder has not been transferred yet."""
        return self.cfg.pretrain.enabled and self.pretrain_summary is None

    # -- checkpoint state ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "head_rows": self.head_rows,
            "best": self.best,
            "elapsed_s": self.elapsed_s,
            "times": self.times.state_dict(),
            "steps_dropping": self.steps_dropping,
            "mechanisms": hooks.mechanism_state(unwrap(self.model)),
            "nonfinite_steps": self.guard.count,
            "rng": rng_state(),
            **self._pretrain_state(),
        }

    def _pretrain_state(self) -> dict[str, Any]:
        if not self.cfg.pretrain.enabled:
            return {}  # trials without pretraining checkpoint exactly what they always did
        if self.pretrain_summary is not None:
            return {"pretrain": {"done": True, **self.pretrain_summary}}
        if self.pretrain_stage is None:
            return {}
        return {"pretrain": {"done": False, "stage": self.pretrain_stage.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.history = [(int(e), dict(m)) for e, m in state["history"]]
        self.head_rows = list(state["head_rows"])
        self.best = dict(state["best"])
        self.elapsed_s = float(state["elapsed_s"])
        self.times.load_state_dict(state.get("times", {}))  # absent in checkpoints older than the account
        self.steps_dropping = int(state.get("steps_dropping", 0))
        hooks.load_mechanism_state(unwrap(self.model), state.get("mechanisms", {}))
        self.guard.count = int(state.get("nonfinite_steps", 0))
        pretrain = state.get("pretrain")
        if pretrain is not None and pretrain["done"]:
            self.pretrain_summary = {k: v for k, v in pretrain.items() if k != "done"}
        elif pretrain is not None:
            # Before the RNG is restored: building the stage draws its initial weights.
            self._build_pretrain_stage().load_state_dict(pretrain["stage"])
        # LayerDrop draws decision k from (seed, k): continue the sequence, not restart it.
        set_layerdrop_step(unwrap(self.model), self.step)
        set_rng_state(state["rng"])

    # -- one epoch ------------------------------------------------------------------------------

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS}

    def train_epoch(self) -> dict[str, float]:
        model, core = self.model, unwrap(self.model)
        model.train()
        cfg = self.cfg.train
        losses, aux_losses, n_samples = 0.0, 0.0, 0
        layer_counts: dict[str, float] = {}
        drop_trace = 0  # checksum of the layers each step ran
        self.times.first_step()  # start-up ends where training time begins: no second counted twice
        start = time.perf_counter()
        batches = self.data.train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=self.epoch,
                                          rank=self.rank, world_size=self.world_size)
        n_batches = 0
        for batch in batches:
            inputs = self._inputs(batch)
            targets = batch["targets"].to(self.device, non_blocking=True)
            with self.autocast():
                logits = model(**inputs)
                # LXMERT's VQA loss: BCE over the soft targets, summed over answers (mean * A).
                loss = F.binary_cross_entropy_with_logits(logits.float(), targets) * targets.shape[1]
            aux = hooks.aux_loss(core)
            total = loss + aux if torch.is_tensor(aux) else loss
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            norm = grad_norm(core.parameters(), cfg.grad_clip)
            total_value = float(total.detach())
            finite = self.guard.finite(total_value, norm)
            if finite:
                self.optimizer.step()
            else:  # its NaN gradient would poison every weight: skip it, or stop the trial
                self.guard.skip(self.epoch + 1, self.step + 1, total_value, norm, self.last_checkpoint)
                self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
            hooks.post_step(core)
            self.step += 1
            n_batches += 1
            if finite:  # a skipped step's loss would make the epoch's mean NaN
                bs = targets.shape[0]
                n_samples += bs
                losses += loss.item() * bs
                aux_losses += float(aux.detach()) * bs if torch.is_tensor(aux) else 0.0
            ran = core.layers_ran  # {stack: [layer indices]} of this forward (LayerDrop's choice)
            for stack, layers in ran.items():
                layer_counts[stack] = layer_counts.get(stack, 0.0) + len(layers)
            self.steps_dropping += any(len(ran[s]) < self.depths[s] for s in ran)
            drop_trace = zlib.crc32(repr(sorted(ran.items())).encode(), drop_trace)
        seconds = time.perf_counter() - start
        self.times.add("train_s", seconds)
        self._check_same_layers_on_every_rank(drop_trace)
        metrics = {
            "train/loss": losses / max(1, n_samples),
            "train/aux_loss": aux_losses / max(1, n_samples),
            "train/lr": float(self.optimizer.param_groups[0]["lr"]),
            "train/epoch_s": seconds,
            # samples/s of the whole group: every rank trains the same number of samples.
            "train/samples_per_s": n_samples * self.world_size / max(seconds, 1e-9),
            "train/steps": float(self.step),
            "train/nonfinite_steps": float(self.guard.count),
        }
        for stack, total_layers in layer_counts.items():
            metrics[f"layers/{stack}_ran"] = total_layers / max(1, n_batches)
        return metrics

    def _check_same_layers_on_every_rank(self, drop_trace: int) -> None:
        """Under DDP every rank must run the same layers in a step (else gradients of different
        subnetworks are averaged): compare the epoch's checksums of LayerDrop's choices."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        traces: list[Any] = [None] * self.world_size
        dist.all_gather_object(traces, drop_trace)
        if len(set(traces)) > 1:
            raise RuntimeError(
                f"LayerDrop ran different layers on different ranks in epoch {self.epoch + 1} "
                f"(checksums {traces}); decisions must depend only on (layerdrop.seed, step)"
            )

    @torch.no_grad()
    def evaluate(self, n_examples: int = 0) -> dict[str, Any]:
        """Predictions on this rank's shard of the evaluation split, gathered on rank 0."""
        model = self.model
        model.eval()
        qids, preds, scores, top_ids, top_probs = [], [], [], [], []
        loss_sum, n = 0.0, 0
        for batch in self.data.eval.batches(self.cfg.train.eval_batch_size, shuffle=False, seed=0, epoch=0,
                                            rank=self.rank, world_size=self.world_size):
            inputs = self._inputs(batch)
            targets = batch["targets"].to(self.device)
            with self.autocast():
                logits = model(**inputs).float()
            loss_sum += float(F.binary_cross_entropy_with_logits(logits, targets, reduction="sum"))
            n += targets.shape[0]
            pred = logits.argmax(dim=1)
            qids.append(batch["question_id"].cpu())
            preds.append(pred.cpu())
            scores.append(targets.gather(1, pred[:, None])[:, 0].cpu())
            probs = torch.sigmoid(logits)
            k = min(5, probs.shape[1])
            p, i = probs.topk(k, dim=1)
            top_ids.append(i.cpu())
            top_probs.append(p.cpu())
        local = {
            "question_id": torch.cat(qids).numpy() if qids else np.zeros(0, np.int64),
            "pred": torch.cat(preds).numpy() if preds else np.zeros(0, np.int64),
            "score": torch.cat(scores).numpy() if scores else np.zeros(0, np.float32),
            "top_ids": torch.cat(top_ids).numpy() if top_ids else np.zeros((0, 5), np.int64),
            "top_probs": torch.cat(top_probs).numpy() if top_probs else np.zeros((0, 5), np.float32),
            "loss_sum": loss_sum,
            "n": n,
        }
        if self.world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, local)
            merged = {k: np.concatenate([g[k] for g in gathered]) for k in
                      ("question_id", "pred", "score", "top_ids", "top_probs")}
            merged["loss_sum"] = sum(g["loss_sum"] for g in gathered)
            merged["n"] = sum(g["n"] for g in gathered)
            local = merged
        # A padded last shard may repeat questions: keep each question once.
        _, first = np.unique(local["question_id"], return_index=True)
        for k in ("question_id", "pred", "score", "top_ids", "top_probs"):
            local[k] = local[k][np.sort(first)]
        return local

    @property
    def eval_metric(self) -> str:
        """What ``eval/acc`` is (MLflow tag ``eval.metric``): ``vqa_official`` when the evaluation
        questions carry their human answers (easy-VQA; VQA v2 with the official annotation file),
        else ``soft_score`` (LXMERT's soft score of the top answer)."""
        return EVAL_OFFICIAL if self.data.eval.human_answers is not None else EVAL_SOFT

    def question_scores(self, result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Per-question ``(acc, soft_score)`` of an `evaluate` result (rank 0), each (N,) in [0, 1].

        ``acc`` is the official VQA accuracy of the predicted answer string against the question's
        human answers when they exist (`eval_metric`), else the soft score. Computed once per
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

    def eval_metrics(self, result: dict[str, Any]) -> dict[str, float]:
        acc, soft = self.question_scores(result)
        types = np.asarray(self.data.eval.answer_type_of(result["question_id"]))
        n = len(acc)
        out = {schema.EVAL_ACC: float(acc.mean()) if n else 0.0,
               "eval/soft_score": float(soft.mean()) if n else 0.0,
               "eval/loss": result["loss_sum"] / max(1, result["n"]),
               "eval/n": float(n)}  # fmt: skip
        for group in sorted(set(types.tolist())):
            mask = types == group
            out[f"eval/acc_{_slug(group)}"] = float(acc[mask].mean())
            out[f"eval/soft_score_{_slug(group)}"] = float(soft[mask].mean())
        return out

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
        texts = [self.data.eval.question_text(int(q)) for q in ids]
        gold = [self.data.eval.labels(int(q)) for q in ids]
        out = []
        for qid, text, answers in zip(ids, texts, gold):
            i = index.get(int(qid))
            if i is None:
                continue
            out.append({
                "question_id": int(qid),
                "question": text,
                "gold": answers,
                "top5": [{"answer": self.data.answers[int(a)], "prob": float(p)}
                         for a, p in zip(result["top_ids"][i], result["top_probs"][i])],
            })
        return out

    def engagement(self) -> dict[str, str]:
        """MLflow tags saying whether the cell's adaptive mechanisms ever changed what it computes.

        ``mechanism.engaged`` is ``true`` when every mechanism of the model engaged (a span that
        fell below the longest distance it could mask, a learned alpha that left its start, a
        LayerDrop that dropped a layer), ``false`` when one never did (the cell then computes its
        simpler neighbour: softmax, fixed-alpha entmax, the plain model), with the measured
        evidence in ``mechanism.evidence``. No tags for a model without adaptive mechanisms.
        """
        found = hooks.engagement(unwrap(self.model))
        if self.cfg.model.layerdrop.mode != "none":
            found["layerdrop"] = {
                "engaged": self.steps_dropping > 0,
                "evidence": f"LayerDrop skipped layers in {self.steps_dropping} of {self.step} training steps",
            }
        if not found:
            return {}
        return {schema.MECHANISM_ENGAGED: str(all(e["engaged"] for e in found.values())).lower(),
                schema.MECHANISM_EVIDENCE: "; ".join(f"{name}: {e['evidence']}" for name, e in sorted(found.items()))}

    # -- pretraining ----------------------------------------------------------------------------

    def _build_pretrain_stage(self):
        from sweeps.pretrain import PretrainStage

        self.pretrain_stage = PretrainStage(self.cfg, self.rank, self.world_size, self.device, self.wrap_model,
                                            self.autocast, self.log)  # fmt: skip
        self.pretrain_stage.last_checkpoint = self.last_checkpoint
        return self.pretrain_stage

    def pretrain(self, report: Callable[[dict[str, float], dict[str, Any] | None], None], tracker=None) -> None:
        """Run the remaining pretraining epochs (each checkpointed through ``report`` and logged at
        ``step`` = pretraining epoch), then transfer the encoder into the VQA model."""
        from models.checkpoint import load_pretrained
        from sweeps.tracking import csv_text

        stage = self.pretrain_stage or self._build_pretrain_stage()
        pcfg = self.cfg.pretrain
        if tracker is not None:
            caught = sum(tracker.log_stage_epoch(PRETRAIN_EPOCH, e, m) for e, m in stage.history)
            if caught:
                self.log(f"logged {caught} pretraining epoch(s) the checkpoint held but MLflow lacked")
            tracker.set_tags({"pretrain.weighting": pcfg.weighting, "pretrain.tasks": ",".join(stage.tasks),
                              "pretrain.corpus": pcfg.corpus})  # fmt: skip
        while not stage.done:
            before = stage.elapsed_s
            self.times.first_step()  # its first batch follows at once
            metrics = stage.run_epoch()
            self.elapsed_s += stage.elapsed_s - before
            # Its training epoch counts as training, the rest of the epoch (held-out scoring) as evaluation.
            self.times.add("train_s", metrics["pretrain/epoch_s"])
            self.times.add("eval_s", max(0.0, stage.elapsed_s - before - metrics["pretrain/epoch_s"]))
            metrics[schema.TIME_ELAPSED] = self.elapsed_s
            self._report(report, metrics)
            if self.rank == 0:
                losses = " ".join(f"{t} {metrics[f'pretrain/loss_{t}']:.3f}" for t in stage.tasks
                                  if f"pretrain/loss_{t}" in metrics)  # fmt: skip
                weights = " ".join(f"{t} {metrics[f'pretrain/weight_{t}']:.2f}" for t in stage.tasks)
                self.log(f"pretrain epoch {stage.epoch}/{pcfg.epochs} ({pcfg.weighting}): losses {losses}; "
                         f"weights {weights} ({metrics['pretrain/samples_per_s']:.0f} samples/s, "
                         f"{metrics['pretrain/epoch_s']:.1f} s)")  # fmt: skip
            if tracker is not None:
                tracker.log_stage_epoch(PRETRAIN_EPOCH, stage.epoch, metrics)
                tracker.log_text(csv_text(stage.weight_rows), "pretrain/weights.csv")
        # The transfer: every encoder parameter must load; only the answer head may be fresh.
        core = unwrap(self.model)
        load = load_pretrained(core, stage.core.state_dict(), strict=True, allow=["head.*"], verbose=False)
        self.log(f"pretrained encoder -> VQA model: {load}")
        # The optimizer and schedule restart on the transferred weights (Lookahead keeps copies).
        self.optimizer = build_optimizer(core, self.cfg.train.optimizer, self.cfg.train.lr,
                                         self.cfg.train.weight_decay, self.cfg.train.lookahead_k,
                                         self.cfg.train.lookahead_alpha, self.cfg.train.mechanism_lr_scale)  # fmt: skip
        self.schedule = build_schedule(self.optimizer, self.cfg.train.schedule, self.steps_total,
                                       self.cfg.train.warmup_ratio, self.cfg.train.lr_min,
                                       self.cfg.train.cycle_steps)  # fmt: skip
        self.pretrain_summary = {
            "history": stage.history,
            "epochs": stage.epoch,
            "steps": stage.step,
            "elapsed_s": stage.elapsed_s,
            "transfer": {"loaded": len(load.loaded), "fresh": len(load.fresh), "ignored": len(load.ignored),
                         "kernel": len(load.kernel)},
        }  # fmt: skip
        self.pretrain_stage = None  # frees the pretraining model and its optimizer state
        if tracker is not None:
            tracker.log_text(str(load) + "\n", "pretrain/transfer_report.txt")
            tracker.set_tags({"pretrain.transfer": f"{len(load.loaded)} loaded, {len(load.fresh)} fresh "
                                                   f"({', '.join(load.fresh_components()) or 'none'}), "
                                                   f"{len(load.ignored)} ignored"})  # fmt: skip
            tracker.log_metrics({"pretrain/total_s": stage.elapsed_s, "pretrain/total_steps": float(stage.step)},
                                step=stage.epoch)  # fmt: skip

    # -- the whole trial ------------------------------------------------------------------------

    def _reported(self, where: Any) -> None:
        """Remember where ``report`` put the checkpoint (a path it may return), for the message a
        diverged trial ends with."""
        if isinstance(where, str) and where:
            self.last_checkpoint = where
            if self.pretrain_stage is not None:
                self.pretrain_stage.last_checkpoint = where

    def fit(self, report: Callable[[dict[str, float], dict[str, Any] | None], Any],
            tracker=None) -> dict[str, float]:
        """Train the remaining epochs; after each, ``report(metrics, state)`` then log to MLflow.

        ``report`` receives the checkpoint state on rank 0 (``None`` elsewhere) and must persist
        it before returning (Ray Train's ``report`` does): MLflow is written after it, so a crash
        between the two only delays logging to the next resume's catch-up. It may return where it
        put the checkpoint (a path), which a divergence message then names.

        A failure that no retry can fix (divergence, a config or checkpoint error; see
        :func:`sweeps.failures.classify`) tags the MLflow run with its cause and closes it as
        FAILED before it propagates.
        """
        try:
            return self._fit(report, tracker)
        except Exception as err:
            failure = classify(err)
            if failure is not None:
                record_failure(tracker, *failure)
            raise

    def _fit(self, report: Callable[[dict[str, float], dict[str, Any] | None], Any],
             tracker=None) -> dict[str, float]:
        cfg = self.cfg
        core = unwrap(self.model)
        if tracker is not None:
            from models.flops import count_params, flops_per_sample

            caught = tracker.catch_up(self.history)
            if caught:
                self.log(f"logged {caught} epoch(s) the checkpoint held but MLflow lacked")
            tracker.log_metrics({
                "model/params": float(count_params(cfg.model)),
                "model/flops_per_sample": float(flops_per_sample(cfg.model, n_tokens=self.data.max_seq_len,
                                                                n_regions=self.data.num_regions)),
                "data/train_questions": float(len(self.data.train)),
                "data/eval_questions": float(len(self.data.eval)),
            })
            tracker.set_tags({schema.TRIAL_PRECISION: self.precision, schema.TRIAL_DEVICE: self.device.type,
                              schema.TRIAL_WORLD_SIZE: str(self.world_size), schema.EVAL_METRIC_TAG: self.eval_metric})
        if self.pretrain_pending:
            self.pretrain(report, tracker)
        while self.epoch < cfg.train.epochs:
            t0 = time.perf_counter()
            metrics = self.train_epoch()
            t_eval = time.perf_counter()
            result = self.evaluate()
            self.times.add("eval_s", time.perf_counter() - t_eval)
            self.epoch += 1
            stats = hooks.collect_stats(core)
            if self.rank == 0:
                metrics.update(self.eval_metrics(result))
                metrics.update(stats_summary(stats))
                self.head_rows.extend(stats_rows(stats, self.epoch))
                improved = metrics[schema.EVAL_ACC] > self.best["acc"]
                if improved:
                    self.best = {"acc": metrics[schema.EVAL_ACC], "epoch": self.epoch}
                metrics[schema.BEST_ACC] = self.best["acc"]
                metrics[schema.BEST_EPOCH] = float(self.best["epoch"])
            self.elapsed_s += time.perf_counter() - t0
            metrics[schema.TIME_ELAPSED] = self.elapsed_s
            metrics[schema.EPOCH] = float(self.epoch)
            if self.rank == 0:
                self.history.append((self.epoch, dict(metrics)))
            self._report(report, metrics)
            if self.rank == 0:
                self.log(
                    f"epoch {self.epoch}/{cfg.train.epochs}: loss {metrics['train/loss']:.4f} "
                    f"acc {metrics['eval/acc']:.4f} ({metrics['train/samples_per_s']:.0f} samples/s, "
                    f"{metrics['train/epoch_s']:.1f} s)"
                )
            if tracker is not None:
                tracker.log_epoch(self.epoch, metrics)
                engaged = self.engagement()
                if engaged:
                    tracker.set_tags(engaged)
                from sweeps.tracking import csv_text

                tracker.log_text(csv_text(self.head_rows), schema.HEADS_ARTIFACT)
                if improved:
                    tracker.log_text(self.predictions_table(result), schema.PREDICTIONS_ARTIFACT)
                    tracker.log_dict(self.examples(result, cfg.train.n_examples), schema.EXAMPLES_ARTIFACT)
                    if cfg.train.log_best_checkpoint:
                        buf = io.BytesIO()
                        torch.save(core.state_dict(), buf)
                        tracker.log_bytes(buf.getvalue(), "checkpoint/best_model.pt")
        final = dict(self.history[-1][1]) if self.history else {}
        if tracker is not None:
            tracker.log_metrics({schema.TIME_TRIAL: self.elapsed_s, schema.BEST_ACC: self.best["acc"],
                                 schema.BEST_EPOCH: float(self.best["epoch"]), **self.times.metrics()},
                                step=self.epoch)  # fmt: skip
            tracker.finish("FINISHED")
        final.update(self.times.metrics())  # after the last MLflow call: the whole trial
        return final

    def _report(self, report: Callable[[dict[str, float], dict[str, Any] | None], Any],
                metrics: dict[str, float]) -> None:
        """``report`` (the checkpoint) with its time, state building included, in ``time/checkpoint_s``;
        where it put the checkpoint is remembered (:meth:`_reported`)."""
        t0 = time.perf_counter()
        where = report(metrics, self.state_dict() if self.rank == 0 else None)
        self.times.add("checkpoint_s", time.perf_counter() - t0)
        self._reported(where)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def _csv(text: str) -> str:
    text = str(text)
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def config_dims(cfg: ExperimentConfig, num_answers: int, visual_feat_dim: int) -> ExperimentConfig:
    """``cfg`` with the model's answer count and feature size set from the data."""
    model = dataclasses.replace(cfg.model, num_answers=num_answers, visual_feat_dim=visual_feat_dim)
    return dataclasses.replace(cfg, model=model)
