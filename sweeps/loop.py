"""The one training loop: :class:`TrialLoop` runs a trial's stages, each a task adapter's.

A trial is a list of stages (``ExperimentConfig.stages()``: ``pretrain`` then ``finetune`` with
``pretrain.enabled``, with the evaluation-only ``retrieval`` between them when ``retrieval.enabled``,
else ``finetune`` alone), each driven by a task adapter (``tasks.base``:
``vqa``, ``pretrain``, ...) with its own data, model, optimiser, schedule and budget. The loop knows
no task: per step it asks the adapter for the loss, adds every module's ``aux_loss()`` (the span
penalty), backpropagates, clips, steps the optimiser (or skips a non-finite step, up to
``train.max_nonfinite_steps``), steps the schedule and calls every ``post_step()`` (clamping span z
and alpha); per epoch it evaluates through the adapter, checkpoints the whole state through
``report`` and logs to MLflow (rank 0; idempotent per epoch, so a resumed trial never logs an epoch
twice and catches up any it missed). When an earlier stage ends, its encoder is imported into the
next stage's model (strict: only the next task's heads may stay fresh), or its whole model when the
next adapter's ``transfer`` is ``"model"``, and the next stage's optimiser starts on the imported weights.

Metric names: the last stage's are ``train/*``, ``eval/*``, ``layers/*`` and ``best/<primary
metric>`` at ``step`` = its epoch (``epoch``); an earlier stage's are ``<stage>/*``,
``<stage>/eval_*`` and ``<stage>/layers/*`` at ``step`` = its own epoch (``<stage>/epoch``).

The loop knows nothing about Ray either: it takes a rank, a world size, a device, a way to wrap the
model (DDP or not), a checkpoint to resume from and a ``report`` callback. ``sweeps/executor.py``
binds those to Ray, in the Tune trial's own process (one-worker CPU trials) or on every worker of a
Ray Train worker group (DDP), so the same loop runs in unit tests without a cluster, in a Tune
trial, and on GPU nodes under DDP. Its :class:`TimeAccount` says where the trial's time went.

The model of the trial's last stage is built first, right after seeding (so its task head starts
the same with or without earlier stages); an earlier stage's model is built when that stage starts.
"""

from __future__ import annotations

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
from torch import nn

import models.hooks as hooks
import schema
from models.layerdrop import set_step as set_layerdrop_step
from sweeps.config import ExperimentConfig
from sweeps.failures import CheckpointRefused, FiniteGuard, classify, grad_norm, record_failure
from sweeps.optim import build_optimizer, build_schedule, total_steps
from tasks.base import StepContext, TaskAdapter, get_task, with_model_fields

STATE_FILE = "state.pt"


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
    """``{"lang/3/self/span": [per head]}`` -> rows for the per-head table artifact (keys of other
    shapes, e.g. SpotTune's ``<encoder>/policy/entropy``, are logged by :func:`finetune_metrics`)."""
    rows = []
    for key, values in stats.items():
        if key.count("/") != 3:
            continue
        stack, layer, attention, stat = key.split("/")
        for head, value in enumerate(values):
            rows.append(dict(epoch=epoch, stack=stack, layer=int(layer), attention=attention,
                             stat=stat, head=head, value=float(value)))
    return rows


def stats_summary(stats: dict[str, list[float]]) -> dict[str, float]:
    """Per-layer summary metrics: ``span/lang/3/self`` = mean span over heads (also ``_max``)."""
    out: dict[str, float] = {}
    for key, values in stats.items():
        if key.count("/") != 3:
            continue
        stack, layer, attention, stat = key.split("/")
        name = f"{stat}/{stack}/{layer}/{attention}"
        out[name] = float(np.mean(values))
        out[f"{name}_max"] = float(np.max(values))
    return out


def resident_mb(model: nn.Module, optimizers: list[Any]) -> float:
    """MB held across steps: the model's parameters and buffers (SpotTune's frozen copies and policy
    included) and the optimisers' state tensors (each storage counted once)."""
    seen: dict[Any, int] = {}

    def add(t: torch.Tensor) -> None:
        if torch.is_tensor(t):
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()

    for t in (*model.parameters(), *model.buffers()):
        add(t)
    for opt in optimizers:
        state = opt.state_dict()
        for entry in (state.get("base", state).get("state", {}) or {}).values():
            for value in entry.values():
                add(value)
        for slow in state.get("slow", []):
            add(slow)
    return sum(seen.values()) / 2**20


def finetune_metrics(plan: Any, group_usage: Any, epoch: int) -> tuple[dict[str, float], str]:
    """A SpotTune plan's epoch statistics: MLflow metrics and the per-decision CSV.

    Metrics: ``finetune/usage`` and ``finetune/eval_usage`` (share of decisions that took the
    fine-tuned branch in the epoch's training / evaluation forwards), the same per layer
    (``finetune/usage/<stack>/<layer>``: the mean over the layer's decisions), per sample group
    (``finetune/usage_type/<question type>``), ``finetune/policy_entropy`` (nats per decision) and
    ``finetune/temperature``. The CSV (``finetune/usage_epoch<N>.csv``) has one row per decision
    and column group: ``train``, ``eval`` and each question type.
    """
    names = list(plan.decision_names)
    columns = {"train": plan.encoder.usage("train").double(), "eval": plan.encoder.usage("eval").double()}
    types = group_usage.rates() if group_usage is not None else {}
    out: dict[str, float] = {}
    for split in ("train", "eval"):
        prefix = "finetune/usage" if split == "train" else "finetune/eval_usage"
        values = columns[split]
        out[prefix] = float(values.mean())
        layers: dict[str, list[float]] = {}
        for name, value in zip(names, values.tolist()):
            layers.setdefault("/".join(name.split("/")[:2]), []).append(value)
        out.update({f"{prefix}/{layer}": float(np.mean(v)) for layer, v in layers.items()})
    for group, rate in sorted(types.items()):
        out[f"finetune/usage_type/{_slug(group)}"] = float(rate.mean())
    policy = plan.extra_modules["policy"].stats()
    out["finetune/policy_entropy"] = float(policy["entropy"].reshape(-1)[0])
    out["finetune/temperature"] = float(policy["temperature"].reshape(-1)[0])
    header = ["epoch", "decision", "train", "eval", *(f"type:{g}" for g in sorted(types))]
    lines = [",".join(_csv_cell(h) for h in header)]
    for i, name in enumerate(names):
        cells = [str(epoch), name, f"{float(columns['train'][i]):.6g}", f"{float(columns['eval'][i]):.6g}",
                 *(f"{float(types[g][i]):.6g}" for g in sorted(types))]
        lines.append(",".join(_csv_cell(c) for c in cells))
    return out, "\n".join(lines) + "\n"


def finetune_cost_metrics(cfg: ExperimentConfig, n_tokens: int, n_regions: int) -> dict[str, float]:
    """``model/finetune_*``: the analytic cost of ``model.finetune`` (:func:`models.flops.finetune_cost`,
    VQA head) per sample, logged once per trial so that a report compares strategies; empty where it
    does not apply (LayerDrop, or a model it cannot count)."""
    from models.flops import finetune_cost

    try:
        cost = finetune_cost(cfg.model, n_tokens=n_tokens, n_regions=n_regions)
    except (ValueError, NotImplementedError, KeyError):
        return {}
    return {schema.FINETUNE_TRAIN_FLOPS: float(cost.forward + cost.backward),
            schema.FINETUNE_EVAL_FLOPS: float(cost.eval_forward),
            schema.FINETUNE_PARAMS_TRAINABLE: float(cost.params_trainable),
            schema.FINETUNE_PARAMS_FROZEN: float(cost.params_frozen),
            schema.FINETUNE_PARAMS_POLICY: float(cost.params_policy),
            schema.FINETUNE_DECISIONS: float(cost.decisions)}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(text).lower()).strip("_")


def _csv_cell(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


#: The parts of a trial's wall-clock time (seconds), logged as ``time/<part>`` (docs/tracking.md).
TIME_PARTS = tuple(name.removeprefix(schema.TIME_NS) for name in schema.TIME_ACCOUNT)


class TimeAccount:
    """Where one trial's wall-clock time goes, summed over its attempts.

    An attempt starts when the process that runs it begins (``started``, a ``time.time()``: the
    Tune trainable's first line, or for a restarted Train worker group its worker's start); its
    ``startup_s`` ends at its first training step. ``train_s``, ``eval_s`` and ``checkpoint_s``
    are the time inside :meth:`StageRun.train_epoch` and :meth:`StageRun.evaluate` (of every stage)
    and the ``report`` callback; ``other_s`` is the
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
        out = {f"{schema.TIME_NS}{k}": self.total(k) for k in self.now}
        out[f"{schema.TIME_NS}other_s"] = max(0.0, wall - sum(out.values()))
        out[schema.TIME_WALL] = wall
        return out

    def state_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall_s(), **{k: self.total(k) for k in self.now}}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.before = {k: float(state.get(k, 0.0)) for k in self.before}




class StageRun:
    """One stage of a trial: its adapter, model, what trains, optimiser, schedule and progress.

    Args:
        loop: The trial's :class:`TrialLoop` (device, rank, time account, wrapping).
        name: The stage's name (``pretrain``, ``finetune``): its MLflow namespace and state key.
        adapter: Its task adapter (data loaded).
        final: Whether it is the trial's last stage (the one the trial reports).
    """

    def __init__(self, loop: TrialLoop, name: str, adapter: TaskAdapter, final: bool):
        self.loop, self.name, self.adapter, self.final = loop, name, adapter, final
        model = adapter.build_model()
        cfg = loop.cfg
        if cfg.train.init_checkpoint:
            from models.checkpoint import load_pretrained

            report = load_pretrained(model, cfg.train.init_checkpoint, strict=not cfg.train.init_allow_partial,
                                     allow=list(adapter.fresh_on_init), verbose=False,
                                     **adapter.init_options())  # fmt: skip
            loop.log(f"{name} starts from {cfg.train.init_checkpoint}: {report}")
        model.to(loop.device)
        #: The plain model (hooks, state dicts); ``trainable`` is what runs (the adapter's view, wrapped).
        self.model = model
        #: ``model.finetune`` applied to the model's encoder (:meth:`apply_finetune`), or None.
        self.plan: Any = None
        #: Optimisers of parameter groups that carry their own (SpotTune's policy), by group name.
        self.extra_optimizers: dict[str, Any] = {}
        self.group_usage: Any = None  # SpotTune's usage per sample group (question type) this epoch
        self._trainable: nn.Module | None = None  # wrapped on first use: after the plan replaced the encoder
        if final and len(loop.specs) == 1:
            self.apply_finetune()  # its starting weights (train.init_checkpoint) are in
        self.reset_optimizer()
        self.epoch = 0  # epochs completed
        self.step = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self.elapsed_s = 0.0
        self.passes = 0  # epochs run, or evaluations of an evaluation-only stage (epochs 0)
        self.best: dict[str, float] = {adapter.primary_metric or "value": -1.0, "epoch": 0}
        self.steps_dropping = 0  # training steps in which LayerDrop skipped at least one layer
        # Steps skipped for a non-finite loss; past train.max_nonfinite_steps the trial stops.
        self.guard = FiniteGuard(name, cfg.train.max_nonfinite_steps, loop.world_size, loop.device)
        if final:
            self.train_ns, self.eval_ns, self.layers_ns = schema.TRAIN_NS, schema.EVAL_NS, schema.LAYERS_NS
            self.counter = schema.EPOCH
        else:
            self.train_ns, self.eval_ns, self.layers_ns = f"{name}/", f"{name}/eval_", f"{name}/layers/"
            self.counter = schema.stage_epoch(name)

    @property
    def spec(self):
        """The stage's :class:`tasks.base.OptimSpec` (read from the config each time)."""
        return self.adapter.optim()

    @property
    def trainable(self) -> nn.Module:
        """What trains and evaluates: the adapter's view of the model, wrapped (e.g. DDP).

        Wrapped when first used, so that the wrapper (DDP registers every trainable parameter) sees the
        model as it trains: a fine-tuning plan applied at the hand-over replaces the encoder first.
        """
        if self._trainable is None:
            trainable = self.adapter.trainable(self.model)
            self._trainable = self.loop.wrap_model(trainable) if self.loop.wrap_model else trainable
        return self._trainable

    def apply_finetune(self) -> None:
        """Apply ``model.finetune`` (``models.finetune``) to the encoder at ``adapter.encoder_attr``.

        Called once the stage's starting weights are in (strictly loaded): for a single-stage trial
        when the stage is built, else by :meth:`TrialLoop._hand_over` after the previous stage's
        encoder was imported, and on resume before the checkpoint is loaded (the same plan, whose
        frozen copies, policy and usage counts the checkpoint then overwrites). SpotTune's frozen
        copies are taken here, so they hold the starting weights. ``standard`` leaves the model as
        it is. The caller rebuilds the optimiser (:meth:`reset_optimizer`).
        """
        cfg = self.loop.cfg.model.finetune
        if cfg.name == "standard" or self.plan is not None:
            return
        from models.configkit import ConfigError
        from models.finetune import GroupUsage, apply_finetune

        attr = self.adapter.encoder_attr
        if attr is None or not hasattr(self.model, attr):
            raise ConfigError(f"model.finetune.name={cfg.name!r}: task {self.adapter.name!r} has no encoder to "
                              f"apply it to (its adapter's encoder_attr is {attr!r}); use model.finetune.name=standard")
        self.plan = apply_finetune(getattr(self.model, attr), cfg)
        setattr(self.model, attr, self.plan.encoder)
        self.model.to(self.loop.device)  # the policy network is built on the CPU
        self.group_usage = GroupUsage() if self.plan.adaptive else None
        # A wrapper built before (none is, in the order the loop runs) would miss the new modules.
        self._trainable = None
        self.loop.log(f"{self.name}: model.finetune.name={cfg.name} applied to the model's {attr}"
                      + (f" ({len(self.plan.decision_names)} decisions)" if self.plan.adaptive else ""))

    def reset_optimizer(self) -> None:
        """A fresh optimiser and schedule on the model's current weights (Lookahead keeps copies);
        parameter groups of the fine-tuning plan that carry their own optimiser get it."""
        from models.finetune import make_optimizer

        s = self.spec
        own = [g for g in self.plan.param_groups if "optimizer" in g] if self.plan is not None else []
        scaled = [g["name"] for g in self.plan.param_groups if g.get("lr_scale", 1.0) != 1.0] if self.plan else []
        if scaled:
            raise ValueError(f"fine-tuning plan groups {scaled} ask for a scaled learning rate, which the loop's "
                             "optimiser does not apply")
        exclude = {id(p) for g in own for p in g["params"]}
        self.optimizer = build_optimizer(self.adapter.optimized(self.model), s.optimizer, s.lr, s.weight_decay,
                                         s.lookahead_k, s.lookahead_alpha, s.mechanism_lr_scale,
                                         exclude)  # fmt: skip
        self.extra_optimizers = {g["name"]: make_optimizer(g) for g in own}
        steps = total_steps(self.adapter.train_length(), s.batch_size, self.loop.world_size, s.epochs)
        self.schedule = build_schedule(self.optimizer, s.schedule, max(1, steps), s.warmup_ratio, s.lr_min,
                                       s.cycle_steps)  # fmt: skip

    @property
    def done(self) -> bool:
        return self.epoch >= self.spec.epochs if self.spec.epochs > 0 else self.passes > 0

    # -- checkpoint state ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "passes": self.passes,
            "step": self.step,
            "history": self.history,
            "elapsed_s": self.elapsed_s,
            "best": self.best,
            "steps_dropping": self.steps_dropping,
            "nonfinite_steps": self.guard.count,
            # The plan applied (a resume applies it again before loading "model") and its own optimisers.
            "finetune_plan": self.plan.name if self.plan is not None else "",
            "extra_optimizers": {k: o.state_dict() for k, o in self.extra_optimizers.items()},
            **self.adapter.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("finetune_plan") and self.plan is None:
            self.apply_finetune()
            self.reset_optimizer()
        self.model.load_state_dict(state["model"])
        self.adapter.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        for name, opt_state in state.get("extra_optimizers", {}).items():
            self.extra_optimizers[name].load_state_dict(opt_state)
        self.schedule.load_state_dict(state["schedule"])
        self.epoch = int(state["epoch"])
        self.passes = int(state.get("passes", self.epoch))
        self.step = int(state["step"])
        self.history = [(int(e), dict(m)) for e, m in state["history"]]
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.best = dict(state.get("best", self.best))
        self.steps_dropping = int(state.get("steps_dropping", 0))
        self.guard.count = int(state.get("nonfinite_steps", 0))
        # LayerDrop draws decision k from (seed, k): continue the sequence, not restart it.
        set_layerdrop_step(self.model, self.step)

    # -- one epoch ------------------------------------------------------------------------------

    def context(self) -> StepContext:
        loop = self.loop
        return StepContext(epoch=self.epoch, step=self.step, lr=float(self.optimizer.param_groups[0]["lr"]),
                           device=loop.device, rank=loop.rank, world_size=loop.world_size,
                           autocast=loop.autocast)  # fmt: skip

    def train_epoch(self) -> tuple[dict[str, float], dict[str, float]]:
        """One pass over this rank's shard; returns (the epoch's namespaced metrics, the adapter's bare ones)."""
        loop, adapter, model = self.loop, self.adapter, self.model
        adapter.start_epoch(self.epoch)
        self.trainable.train()
        if self.plan is not None:
            self.plan.reset_usage()  # the epoch's usage statistics (and eval_mode=global's policy)
        if self.group_usage is not None:
            self.group_usage.reset()
        if loop.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(loop.device)
        samples, n_batches = 0, 0
        layer_counts: dict[str, float] = {}
        depths = {"lang": loop.cfg.model.l_layers, "visn": loop.cfg.model.r_layers, "cross": loop.cfg.model.x_layers}
        drop_trace = 0  # checksum of the layers each step ran
        loop.times.first_step()  # start-up ends where training time begins: no second counted twice
        start = time.perf_counter()
        for batch in adapter.train_batches(self.epoch):
            done = self.train_step(batch)
            if done is None:
                continue
            out, finite = done
            n_batches += 1
            samples += out.n if finite else 0
            ran = getattr(model, "layers_ran", None)  # {stack: [layer indices]} of this forward (LayerDrop's)
            if ran:
                for stack, layers in ran.items():
                    layer_counts[stack] = layer_counts.get(stack, 0.0) + len(layers)
                self.steps_dropping += any(len(ran[s]) < depths[s] for s in ran)
                drop_trace = zlib.crc32(repr(sorted(ran.items())).encode(), drop_trace)
        seconds = time.perf_counter() - start
        loop.times.add("train_s", seconds)
        self._check_same_layers_on_every_rank(drop_trace)
        bare = adapter.train_metrics()
        ns = self.train_ns
        metrics = {f"{ns}{k}": v for k, v in bare.items()}
        metrics.update({
            f"{ns}lr": float(self.optimizer.param_groups[0]["lr"]),
            f"{ns}epoch_s": seconds,
            # samples/s of the whole group: every rank trains the same number of samples.
            f"{ns}samples_per_s": samples * loop.world_size / max(seconds, 1e-9),
            f"{ns}steps": float(self.step),
            f"{ns}nonfinite_steps": float(self.guard.count),
            f"{ns}step_s": seconds / max(1, n_batches),
            f"{ns}resident_mb": resident_mb(self.model, [self.optimizer, *self.extra_optimizers.values()]),
        })  # fmt: skip
        if loop.device.type == "cuda":
            metrics[f"{ns}peak_mem_mb"] = torch.cuda.max_memory_allocated(loop.device) / 2**20
        for stack, total_layers in layer_counts.items():
            metrics[f"{self.layers_ns}{stack}_ran"] = total_layers / max(1, n_batches)
        return metrics, bare

    def train_step(self, batch: dict[str, torch.Tensor]):
        """One optimisation step on ``batch``: the adapter's loss plus every module's ``aux_loss()``,
        backward, clipping, the optimiser step (a non-finite step is skipped, or stops the trial:
        :class:`sweeps.failures.FiniteGuard`), the schedule, ``post_step()``. Returns the adapter's
        :class:`tasks.base.StepLoss` and whether the step was applied, or None when the adapter
        skipped the batch."""
        if self.plan is not None:
            self.plan.set_temperature(self.epoch, self.step)  # a function of (epoch, step): resumes exactly
        ctx = self.context()
        out = self.adapter.train_loss(self.trainable, batch, ctx)
        if out is None:
            return None
        model = self.model
        if self.group_usage is not None:
            groups = self.adapter.sample_groups(batch)
            if groups is not None:
                self.group_usage.update(self.plan.last_decisions(), groups)
        aux = hooks.aux_loss(model)
        total = out.loss + aux if torch.is_tensor(aux) else out.loss
        optimizers = [self.optimizer, *self.extra_optimizers.values()]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        total.backward()
        self.adapter.after_backward()
        norm = grad_norm(model.parameters(), self.spec.grad_clip)
        total_value = float(total.detach())
        finite = self.guard.finite(total_value, norm)
        if finite:
            for opt in optimizers:
                opt.step()
        else:  # its NaN gradient would poison every weight: skip it, or stop the trial
            self.guard.skip(self.epoch + 1, self.step + 1, total_value, norm, self.loop.last_checkpoint)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
        self.schedule.step()
        hooks.post_step(model)
        self.adapter.after_step(ctx, out, finite, total_value, float(aux.detach()) if torch.is_tensor(aux) else 0.0)
        self.step += 1
        return out, finite

    def _check_same_layers_on_every_rank(self, drop_trace: int) -> None:
        """Under DDP every rank must run the same layers in a step (else gradients of different
        subnetworks are averaged): compare the epoch's checksums of LayerDrop's choices."""
        if self.loop.world_size == 1:
            return
        import torch.distributed as dist

        traces: list[Any] = [None] * self.loop.world_size
        dist.all_gather_object(traces, drop_trace)
        if len(set(traces)) > 1:
            raise RuntimeError(
                f"LayerDrop ran different layers on different ranks in {self.name} epoch {self.epoch + 1} "
                f"(checksums {traces}); decisions must depend only on (layerdrop.seed, step)"
            )

    def evaluate(self):
        """The adapter's evaluation (timed as evaluation); returns its :class:`tasks.base.EvalResult`."""
        t0 = time.perf_counter()
        result = self.adapter.evaluate(self.trainable, self.context())
        self.loop.times.add("eval_s", time.perf_counter() - t0)
        return result

    def track_best(self, metrics: dict[str, float]) -> bool:
        """Update ``best/<primary metric>`` and ``best/epoch`` in ``metrics``; whether this epoch is the best."""
        key = self.adapter.primary_metric
        if key is None:
            return False
        improved = metrics[f"{self.eval_ns}{key}"] > self.best[key]
        if improved:
            self.best = {key: metrics[f"{self.eval_ns}{key}"], "epoch": self.epoch}
        metrics[f"{schema.BEST_PREFIX}{key}"] = self.best[key]
        metrics[schema.BEST_EPOCH] = float(self.best["epoch"])
        return improved


class TrialLoop:
    """Train and evaluate one trial: its stages in order, one state, one checkpoint.

    Args:
        cfg: the trial's full config (the ``model.*`` fields the data fixes must match it: the
            driver sets them, :func:`prepared_config`).
        rank, world_size: this worker's place in the group.
        device: where the model runs.
        wrap_model: turns what trains into what runs (e.g. DDP); identity by default.
        started: when this attempt of the trial began (``time.time()``; default: now), the
            start of its :class:`TimeAccount`.
    """

    def __init__(self, cfg: ExperimentConfig, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None,
                 wrap_model: Callable[[nn.Module], nn.Module] | None = None,
                 log: Callable[[str], None] = print, started: float | None = None):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        self.wrap_model = wrap_model
        self.log = log if rank == 0 else (lambda _msg: None)
        self.times = TimeAccount(started)
        use_bf16 = self.device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        if cfg.train.precision == "bf16" and self.device.type != "cuda":
            use_bf16 = True  # explicitly asked for: CPU autocast supports bf16 too
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        )
        self.precision = "bf16" if use_bf16 else "fp32"
        self.specs = cfg.stages()
        seed_everything(cfg.train.seed)
        name, task = self.specs[-1]
        #: The trial's last stage, built now; earlier stages are built when they start.
        self.final = StageRun(self, name, self._adapter(task), final=True)
        self.running: StageRun | None = None  # the earlier stage in progress, if any
        #: Earlier stages that have ended: {name: {history, epochs, steps, elapsed_s, transfer}}.
        self.summaries: dict[str, dict[str, Any]] = {}
        self.head_rows: list[dict[str, Any]] = []
        self.elapsed_s = 0.0
        #: Where the last checkpoint went (what ``report`` returned, or the one resumed from).
        self.last_checkpoint = ""

    def _adapter(self, task: str) -> TaskAdapter:
        return get_task(task)(self.cfg, self.rank, self.world_size, self.device, self.log)

    def start_stage(self, index: int) -> StageRun:
        """Build stage ``index`` (an earlier one: the last is built with the loop) as the running one."""
        name, task = self.specs[index]
        self.running = StageRun(self, name, self._adapter(task), final=False)
        return self.running

    @property
    def epoch(self) -> int:
        """Epochs of the last stage completed."""
        return self.final.epoch

    @property
    def history(self) -> list[tuple[int, dict[str, float]]]:
        return self.final.history

    # -- checkpoint state ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole trial: the last stage's state at the top level, each earlier stage under its name
        (``{"done": False, "stage": state}`` while it runs, ``{"done": True, ...summary}`` after)."""
        state = self.final.state_dict()
        state.update({
            "head_rows": self.head_rows,
            "elapsed_s": self.elapsed_s,  # the trial's (the last stage's own is not needed once it is the last)
            "times": self.times.state_dict(),
            "mechanisms": hooks.mechanism_state(self.final.model),
            "rng": rng_state(),
        })  # fmt: skip
        for name, _ in self.specs[:-1]:
            if name in self.summaries:
                state[name] = {"done": True, **self.summaries[name]}
            elif self.running is not None and self.running.name == name:
                state[name] = {"done": False, "stage": self.running.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.final.load_state_dict(state)
        self.head_rows = list(state["head_rows"])
        self.elapsed_s = float(state["elapsed_s"])
        self.times.load_state_dict(state.get("times", {}))  # absent in checkpoints older than the account
        hooks.load_mechanism_state(self.final.model, state.get("mechanisms", {}))
        for index, (name, _) in enumerate(self.specs[:-1]):
            entry = state.get(name)
            if entry is not None and entry["done"]:
                self.summaries[name] = {k: v for k, v in entry.items() if k != "done"}
            elif entry is not None:
                # Before the RNG is restored: building the stage draws its initial weights.
                self.start_stage(index).load_state_dict(entry["stage"])
        set_rng_state(state["rng"])

    # -- the whole trial ------------------------------------------------------------------------

    def engagement(self) -> dict[str, str]:
        """MLflow tags saying whether the cell's adaptive mechanisms ever changed what it computes.

        ``mechanism.engaged`` is ``true`` when every mechanism of the model engaged (a span that
        fell below the longest distance it could mask, a learned alpha that left its start, a
        LayerDrop that dropped a layer), ``false`` when one never did (the cell then computes its
        simpler neighbour: softmax, fixed-alpha entmax, the plain model), with the measured
        evidence in ``mechanism.evidence``. No tags for a model without adaptive mechanisms.
        """
        final = self.final
        found = hooks.engagement(final.model)
        if self.cfg.model.layerdrop.mode != "none":
            found["layerdrop"] = {
                "engaged": final.steps_dropping > 0,
                "evidence": f"LayerDrop skipped layers in {final.steps_dropping} of {final.step} training steps",
            }
        if not found:
            return {}
        return {schema.MECHANISM_ENGAGED: str(all(e["engaged"] for e in found.values())).lower(),
                schema.MECHANISM_EVIDENCE: "; ".join(f"{name}: {e['evidence']}" for name, e in sorted(found.items()))}

    def fit(self, report: Callable[[dict[str, float], dict[str, Any] | None], Any],
            tracker=None) -> dict[str, float]:
        """Run the remaining stages and epochs; after each epoch, ``report(metrics, state)`` then log to MLflow.

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

    def _fit(self, report, tracker=None) -> dict[str, float]:
        cfg, final = self.cfg, self.final
        if tracker is not None:
            from models.flops import count_params, flops_per_sample

            caught = tracker.catch_up(final.history)
            if caught:
                self.log(f"logged {caught} epoch(s) the checkpoint held but MLflow lacked")
            n_tokens, n_regions = final.adapter.sequence_shape()
            tracker.log_metrics({
                schema.MODEL_PARAMS: float(count_params(cfg.model)),
                schema.MODEL_FLOPS: float(flops_per_sample(cfg.model, n_tokens=n_tokens, n_regions=n_regions)),
                **final.adapter.describe(),
                **finetune_cost_metrics(cfg, n_tokens, n_regions),
            })  # fmt: skip
            tracker.set_tags({schema.TRIAL_PRECISION: self.precision, schema.TRIAL_DEVICE: self.device.type,
                              schema.TRIAL_WORLD_SIZE: str(self.world_size), **final.adapter.tags()})
        for index, (name, _) in enumerate(self.specs[:-1]):
            if name in self.summaries:
                continue
            stage = self.running if self.running is not None and self.running.name == name else self.start_stage(index)
            self._run_stage(stage, report, tracker)
            nxt = self.final if index + 1 == len(self.specs) - 1 else self.start_stage(index + 1)
            self._hand_over(stage, nxt, tracker)
        self._run_stage(final, report, tracker)
        out = dict(final.history[-1][1]) if final.history else {}
        if tracker is not None:
            best = {}
            key = final.adapter.primary_metric
            if key is not None:
                best = {f"{schema.BEST_PREFIX}{key}": final.best[key], schema.BEST_EPOCH: float(final.best["epoch"])}
            tracker.log_metrics({schema.TIME_TRIAL: self.elapsed_s, **best, **self.times.metrics()}, step=final.epoch)
            tracker.finish("FINISHED")
        out.update(self.times.metrics())  # after the last MLflow call: the whole trial
        return out

    def _run_stage(self, stage: StageRun, report, tracker) -> None:
        """The stage's remaining epochs (an evaluation-only stage, ``epochs`` 0, evaluates once)."""
        if tracker is not None:
            if stage.final:
                caught = 0  # caught up at the start of the trial
            else:
                caught = sum(tracker.log_stage_epoch(stage.counter, e, m) for e, m in stage.history)
            if caught:
                self.log(f"logged {caught} {stage.name} epoch(s) the checkpoint held but MLflow lacked")
            if not stage.final:
                tracker.set_tags(stage.adapter.tags())
        while not stage.done:
            t0 = time.perf_counter()
            if stage.spec.epochs > 0:
                metrics, bare = stage.train_epoch()
            else:
                metrics, bare = {}, {}
            result = stage.evaluate()
            stage.passes += 1
            stage.epoch += 1 if stage.spec.epochs > 0 else 0
            improved = False
            if self.rank == 0:
                metrics.update({f"{stage.eval_ns}{k}": v for k, v in result.metrics.items()})
                bare.update({f"eval_{k}": v for k, v in result.metrics.items()})
            usage_csv = ""
            if stage.final:
                stats = hooks.collect_stats(stage.model)
                if self.rank == 0:
                    metrics.update(stats_summary(stats))
                    self.head_rows.extend(stats_rows(stats, stage.epoch))
                    if stage.plan is not None and stage.plan.adaptive:
                        found, usage_csv = finetune_metrics(stage.plan, stage.group_usage, stage.epoch)
                        metrics.update(found)
                    improved = stage.track_best(metrics)
            seconds = time.perf_counter() - t0
            stage.elapsed_s += seconds
            self.elapsed_s += seconds
            metrics[schema.TIME_ELAPSED] = self.elapsed_s
            if not stage.final:
                metrics[f"{stage.name}/time_s"] = stage.elapsed_s
            metrics[stage.counter] = float(stage.epoch)
            if self.rank == 0:
                stage.history.append((stage.epoch, dict(metrics)))
            self._report(report, metrics)
            if self.rank == 0:
                label = "epoch" if stage.final else f"{stage.name} epoch"
                speed = (f" ({metrics[f'{stage.train_ns}samples_per_s']:.0f} samples/s, "
                         f"{metrics[f'{stage.train_ns}epoch_s']:.1f} s)") if stage.spec.epochs else ""  # fmt: skip
                where = f"{label} {stage.epoch}/{stage.spec.epochs}" if stage.spec.epochs else f"{stage.name} (evaluation only)"
                self.log(f"{where}: {stage.adapter.progress(bare)}{speed}")
            if tracker is not None:
                self._log_epoch(stage, metrics, result, improved, tracker)
                if usage_csv:
                    tracker.log_text(usage_csv, f"{schema.FINETUNE_USAGE_DIR}/usage_epoch{stage.epoch}.csv")

    def _log_epoch(self, stage: StageRun, metrics: dict[str, float], result, improved: bool, tracker) -> None:
        from sweeps.tracking import csv_text

        folder = "" if stage.final else f"{stage.name}/"
        if stage.final:
            tracker.log_epoch(stage.epoch, metrics)
            engaged = self.engagement()
            if engaged:
                tracker.set_tags(engaged)
            tracker.log_text(csv_text(self.head_rows), schema.HEADS_ARTIFACT)
        else:
            tracker.log_stage_epoch(stage.counter, stage.epoch, metrics)
        for name, content in stage.adapter.epoch_artifacts().items():
            _log_artifact(tracker, f"{folder}{name}", content)
        if improved:
            if result.tags:
                tracker.set_tags(result.tags)
            for name, content in stage.adapter.artifacts(result).items():
                _log_artifact(tracker, f"{folder}{name}", content)
            if stage.final and self.cfg.train.log_best_checkpoint:
                buf = io.BytesIO()
                torch.save(stage.model.state_dict(), buf)
                tracker.log_bytes(buf.getvalue(), schema.BEST_CHECKPOINT_ARTIFACT)

    def _hand_over(self, stage: StageRun, nxt: StageRun, tracker) -> None:
        """Import ``stage``'s encoder into ``nxt``'s model (every encoder parameter must load; only
        ``nxt``'s task heads may stay fresh), or its whole model when ``nxt``'s adapter says
        ``transfer = "model"``; restart ``nxt``'s optimiser, keep ``stage``'s summary."""
        from models.checkpoint import load_pretrained

        if nxt.adapter.transfer == "model":
            load = _whole_model(stage, nxt)
        else:
            load = load_pretrained(nxt.model, stage.model.state_dict(), strict=True,
                                   allow=list(nxt.adapter.fresh_on_transfer), verbose=False)  # fmt: skip
        self.log(f"{stage.name} {'model' if nxt.adapter.transfer == 'model' else 'encoder'} -> {nxt.name} model: {load}")
        if nxt.final:
            nxt.apply_finetune()  # after the import: SpotTune's frozen copies hold the imported encoder
        nxt.reset_optimizer()
        self.summaries[stage.name] = {
            "history": stage.history,
            "epochs": stage.epoch,
            "steps": stage.step,
            "elapsed_s": stage.elapsed_s,
            "transfer": {"loaded": len(load.loaded), "fresh": len(load.fresh), "ignored": len(load.ignored),
                         "kernel": len(load.kernel)},
        }  # fmt: skip
        # Frees the stage's model and its optimizer state; a next stage that is not the last is now the running one.
        self.running = None if nxt.final else nxt
        if tracker is not None:
            tracker.log_text(str(load) + "\n", f"{stage.name}/transfer_report.txt")
            tracker.set_tags({f"{stage.name}.transfer": f"{len(load.loaded)} loaded, {len(load.fresh)} fresh "
                                                        f"({', '.join(load.fresh_components()) or 'none'}), "
                                                        f"{len(load.ignored)} ignored"})  # fmt: skip
            tracker.log_metrics({f"{stage.name}/total_s": stage.elapsed_s,
                                 f"{stage.name}/total_steps": float(stage.step)}, step=stage.epoch)  # fmt: skip

    def _report(self, report, metrics: dict[str, float]) -> None:
        """``report`` (the checkpoint) with its time, state building included, in ``time/checkpoint_s``;
        where it put the checkpoint is remembered for the message a diverged trial ends with."""
        t0 = time.perf_counter()
        where = report(metrics, self.state_dict() if self.rank == 0 else None)
        self.times.add("checkpoint_s", time.perf_counter() - t0)
        if isinstance(where, str) and where:
            self.last_checkpoint = where


def _whole_model(stage: StageRun, nxt: StageRun):
    """Load ``stage``'s whole state dict (parameters and buffers, heads included) into ``nxt``'s model,
    strictly; returns a :class:`models.checkpoint.LoadReport` of it.

    Raises:
        CheckpointError: the two models differ (a key missing, unexpected or of another shape).
    """
    from models.checkpoint import CheckpointError, LoadReport

    state = stage.model.state_dict()
    report = LoadReport(source=f"the {stage.name} stage's model", format="native")
    try:
        nxt.model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"stage {nxt.name!r} takes over the whole model of stage {stage.name!r} "
                              f"(its adapter's transfer = 'model'), but the two models differ: {err}", report) from None
    report.loaded = [n for n, _ in nxt.model.named_parameters()]
    report.applied = True
    return report


def _log_artifact(tracker, name: str, content: Any) -> None:
    if isinstance(content, str):
        tracker.log_text(content, name)
    else:
        tracker.log_dict(content, name)


def prepared_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Prepare every stage's task (caches; driver side, before any trial) and set the ``model.*``
    fields the last stage's data fixes (answer count, feature size). For tests and one-off runs;
    the sweep driver does the same once per distinct data config (``sweeps/ablation.py``)."""
    stages = cfg.stages()
    fields, _line = get_task(stages[-1][1]).prepare(cfg)
    cfg = with_model_fields(cfg, fields)
    for _, task in stages[:-1]:
        get_task(task).prepare(cfg)
    return cfg
