"""Task weighting for multi-task pretraining: one interface, four strategies.

Every strategy is an ``nn.Module`` (its state, learned or not, checkpoints with ``state_dict``)
with the same two calls per training step::

    losses = {task: TaskLoss.loss for the active tasks}          # 0-d tensors, means over their terms
    weights = strategy.update(step, losses, shared_params, counts)   # may read per-task gradients
    total = strategy.combine(losses)                                 # what .backward() is called on

``counts`` holds each task's number of loss terms in the batch (``TaskLoss.n``); ``shared_params``
are the parameters every task trains (the encoder). Tasks may come and go (the schedule): a
strategy weighs the tasks it is given and keeps its state for the others.

* ``equal`` (LXMERT): ``w_t = 1``.
* ``grad_std`` (the seed notes' question; formula below): ``w_t ∝ 1 / s_t`` from the standard
  deviation of each task's gradient on the shared parameters, normalised for batch and output size.
* ``uncertainty`` (Kendall, Gal & Cipolla 2018, https://arxiv.org/abs/1705.07115): learned
  ``s_t = log σ_t²``, ``total = Σ exp(-s_t) L_t + s_t`` (their eq. 7 with the constant factors ½
  dropped, as their classification form and most implementations do; the optimum is
  ``exp(-s_t) = 1 / L_t``); ``w_t = exp(-s_t)``, trained by the model's optimizer.
* ``gradnorm`` (Chen et al. 2018, https://arxiv.org/abs/1711.02257): weights moved so that each
  task's weighted gradient norm ``G_t = w_t ||∇_W L_t||`` approaches ``mean(G) · r_t^α`` with
  ``r_t = (L_t / L_t(0)) / mean_u(L_u / L_u(0))`` (the target held constant), by Adam on
  ``Σ |G_t - target_t|``, then renormalised to ``Σ w_t = T``.

**The gradient-std formula.** At an update step, for each active task t with n_t > 0 terms:

    g_t = ∂L_t / ∂θ                       over the D shared parameters θ, flattened (L_t a mean over n_t terms)
    σ_t = std(g_t)                         population standard deviation over the D entries
    s_t = σ_t · sqrt(n_t) / c_t            batch-size and output-size normalisation
    ŝ_t = max(s_t, ρ · mean_u s_u)         floor (ρ = ``grad_std_floor``, 0.1)
    w_t = T · (1 / ŝ_t) / Σ_u (1 / ŝ_u)    weights sum to T, the number of active tasks

Why these normalisers: L_t averages n_t per-term gradients, so the noise part of g_t shrinks as
1 / sqrt(n_t); ``sqrt(n_t)`` restores the per-term scale, whatever the batch size or the masking
rate gave the task this step. ``c_t`` is the norm of the loss's gradient with respect to the head's
outputs, per term, for an uninformed predictor (:mod:`tasks.pretrain.objectives`:
``sqrt(1 - 1/K)`` for K-way softmax cross-entropy, ``sqrt((1 - 2 φ(1)) / F)`` for SmoothL1 averaged
over F standardised dimensions): the gradient reaching the encoder is the head's Jacobian times
that output gradient, so dividing by it removes the dependence on the label-space size K (or F)
that the output gradient alone carries, and s_t ≈ the noise per term relative to chance. (We do
not divide by log K, the chance *loss*: the cross-entropy gradient does not grow with log K, so
that would reward large label spaces rather than correct for them.) A task with a zero gradient
gets ŝ_t = ρ · mean, i.e. at most ``1/ρ`` times the mean weight, never an infinite one; a task with
no terms in the update batch (n_t = 0, e.g. no question drew an answer) keeps its previous s_t;
one never measured yet is treated as average (``s_t = mean``); with nothing measured, the
weights are equal. Weights are recomputed every ``weight_every`` steps (held in between) and
averaged over ranks under DDP.

**Cost.** An update needs one extra backward pass per active task, from its loss to the shared
parameters (``torch.autograd.grad`` with the graph retained), before the usual backward of the
weighted sum: about ``T * (backward / step)`` extra on update steps, ``1/weight_every`` of that on
average. ``shared=last_layer`` stops those passes at the last cross-modality layer. Measured:
``python -m tasks.pretrain.bench`` (docs/pretraining.md).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from tasks.pretrain.config import WEIGHTINGS, PretrainConfig


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mean_over_ranks(values: dict[str, float], tasks: list[str]) -> dict[str, float]:
    """Average per-task statistics over ranks (a rank without a value for a task does not count)."""
    if not _distributed():
        return values
    import torch.distributed as dist

    buf = torch.zeros(2, len(tasks), dtype=torch.float64)
    for i, t in enumerate(tasks):
        if t in values:
            buf[0, i], buf[1, i] = values[t], 1.0
    if dist.get_backend() == "nccl":
        buf = buf.cuda()
    dist.all_reduce(buf)
    buf = buf.cpu()
    return {t: float(buf[0, i] / buf[1, i]) for i, t in enumerate(tasks) if buf[1, i] > 0}


def gradient_moments(grads: list[Tensor | None], sizes: list[int]) -> tuple[float, float]:
    """(population std, L2 norm) of the concatenated gradients; ``None`` (unused) counts as zeros.

    Args:
        grads: One gradient (or None) per shared parameter.
        sizes: ``numel`` of each shared parameter (D = their sum).
    """
    d = float(sum(sizes))
    present = [g.detach() for g in grads if g is not None]
    if not present:
        return 0.0, 0.0
    # float64 accumulation without float64 copies; one device sync for all parameters.
    total = float(torch.stack([g.sum(dtype=torch.float64) for g in present]).sum())
    squares = float(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in present]).sum())
    mean = total / d
    var = max(squares / d - mean * mean, 0.0)
    return math.sqrt(var), math.sqrt(squares)


class Weighting(nn.Module):
    """The interface (module docstring). Subclasses set ``name`` and override what they need.

    Args:
        tasks: Every task the stage may run (the schedule picks the active ones per step).
        scales: ``{task: c_t}``, the output-size normalisers (``objectives.chance_scales``).
        cfg: The pretraining config (``weight_every``, ``grad_std_floor``, ``gradnorm_*``).
    """

    name = "base"
    #: Whether ``update`` reads per-task gradients of the shared parameters (costs backward passes).
    needs_grads = False

    def __init__(self, tasks: list[str], scales: dict[str, float], cfg: PretrainConfig):
        super().__init__()
        self.tasks = list(tasks)
        self.scales = dict(scales)
        self.every = int(cfg.weight_every)
        self._current: dict[str, float] = {t: 1.0 for t in self.tasks}
        #: Seconds spent in ``update`` by the last call (the strategy's own cost).
        self.last_update_s = 0.0

    def update(self, step: int, losses: dict[str, Tensor], shared: list[Tensor],
               counts: dict[str, int]) -> dict[str, float]:  # fmt: skip
        """Refresh the weights for this step's active tasks (``losses``' keys); returns them."""
        self._current = {t: 1.0 for t in losses}
        return dict(self._current)

    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        """The weighted total ``Σ_t w_t L_t`` (plus a strategy's own regulariser)."""
        return sum(self._current.get(t, 1.0) * loss for t, loss in losses.items())

    def weights(self) -> dict[str, float]:
        """The weights of the active tasks as last set by :meth:`update`."""
        return dict(self._current)

    def signals(self) -> dict[str, float]:
        """Per-task statistics behind the weights (for logging), e.g. ``s_mlm``."""
        return {}

    def _index(self, task: str) -> int:
        return self.tasks.index(task)


class EqualWeighting(Weighting):
    """LXMERT: the losses are added."""

    name = "equal"


class GradStdWeighting(Weighting):
    """``w_t ∝ 1 / s_t``, ``s_t = std(∂L_t/∂θ) · sqrt(n_t) / c_t`` (module docstring)."""

    name = "grad_std"
    needs_grads = True

    def __init__(self, tasks: list[str], scales: dict[str, float], cfg: PretrainConfig):
        super().__init__(tasks, scales, cfg)
        self.floor = float(cfg.grad_std_floor)
        # NaN = not measured yet. A buffer, so a resumed trial continues with the same estimates.
        self.register_buffer("s", torch.full((len(self.tasks),), float("nan"), dtype=torch.float64))
        self.register_buffer("raw_std", torch.full((len(self.tasks),), float("nan"), dtype=torch.float64))

    def measure(self, losses: dict[str, Tensor], shared: list[Tensor], counts: dict[str, int]) -> dict[str, float]:
        """``{task: s_t}`` from this batch's gradients (tasks with n_t = 0 are left out)."""
        sizes = [p.numel() for p in shared]
        out: dict[str, float] = {}
        for t, loss in losses.items():
            n = int(counts.get(t, 0))
            if n <= 0 or not loss.requires_grad:
                continue
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            std, _ = gradient_moments(list(grads), sizes)
            self.raw_std[self._index(t)] = std
            out[t] = std * math.sqrt(n) / self.scales[t]
        return out

    def formula(self, active: list[str]) -> dict[str, float]:
        """The weights of ``active`` from the stored ``s`` (floor, inverse, normalise to sum T)."""
        known = {t: float(self.s[self._index(t)]) for t in active if not math.isnan(float(self.s[self._index(t)]))}
        if not active:
            return {}
        if not known:
            return {t: 1.0 for t in active}
        mean = sum(known.values()) / len(known)
        if mean <= 0.0:
            return {t: 1.0 for t in active}  # no task has any gradient: nothing to balance
        floor = self.floor * mean
        inv = {t: 1.0 / max(known.get(t, mean), floor) for t in active}
        total = sum(inv.values())
        return {t: len(active) * v / total for t, v in inv.items()}

    def update(self, step: int, losses: dict[str, Tensor], shared: list[Tensor],
               counts: dict[str, int]) -> dict[str, float]:  # fmt: skip
        t0 = time.perf_counter()
        if step % self.every == 0:
            measured = _mean_over_ranks(self.measure(losses, shared, counts), self.tasks)
            for t, value in measured.items():
                self.s[self._index(t)] = value
        self._current = self.formula(list(losses))
        self.last_update_s = time.perf_counter() - t0
        return dict(self._current)

    def signals(self) -> dict[str, float]:
        out = {}
        for i, t in enumerate(self.tasks):
            if not math.isnan(float(self.s[i])):
                out[f"s_{t}"] = float(self.s[i])
                out[f"grad_std_{t}"] = float(self.raw_std[i])
        return out


class UncertaintyWeighting(Weighting):
    """Kendall et al. 2018: ``total = Σ exp(-s_t) L_t + s_t`` with learned ``s_t = log σ_t²``."""

    name = "uncertainty"

    def __init__(self, tasks: list[str], scales: dict[str, float], cfg: PretrainConfig):
        super().__init__(tasks, scales, cfg)
        # s = 0: every weight starts at 1, as equal weighting.
        self.log_var = nn.Parameter(torch.zeros(len(self.tasks)))

    def update(self, step: int, losses: dict[str, Tensor], shared: list[Tensor],
               counts: dict[str, int]) -> dict[str, float]:  # fmt: skip
        self._current = {t: float(torch.exp(-self.log_var[self._index(t)]).detach()) for t in losses}
        return dict(self._current)

    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        total = 0.0
        for t, loss in losses.items():
            s = self.log_var[self._index(t)]
            total = total + torch.exp(-s).to(loss.dtype) * loss + s.to(loss.dtype)
        return total

    def signals(self) -> dict[str, float]:
        return {f"log_var_{t}": float(self.log_var[i].detach()) for i, t in enumerate(self.tasks)}


class GradNormWeighting(Weighting):
    """Chen et al. 2018 (module docstring); Adam on the weights, renormalised to sum to T."""

    name = "gradnorm"
    needs_grads = True
    betas = (0.9, 0.999)

    def __init__(self, tasks: list[str], scales: dict[str, float], cfg: PretrainConfig):
        super().__init__(tasks, scales, cfg)
        self.alpha = float(cfg.gradnorm_alpha)
        self.lr = float(cfg.gradnorm_lr)
        n = len(self.tasks)
        self.register_buffer("w", torch.ones(n, dtype=torch.float64))
        self.register_buffer("initial_loss", torch.full((n,), float("nan"), dtype=torch.float64))
        self.register_buffer("adam_m", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("adam_t", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("grad_norm", torch.full((n,), float("nan"), dtype=torch.float64))

    def update(self, step: int, losses: dict[str, Tensor], shared: list[Tensor],
               counts: dict[str, int]) -> dict[str, float]:  # fmt: skip
        t0 = time.perf_counter()
        present = [t for t in losses if int(counts.get(t, 0)) > 0]
        values = _mean_over_ranks({t: float(losses[t].detach()) for t in present}, self.tasks)
        for t in present:
            i = self._index(t)
            if math.isnan(float(self.initial_loss[i])) and t in values and values[t] > 0:
                self.initial_loss[i] = values[t]  # L_t(0): the first loss seen (a task may start late)
        if step % self.every == 0 and present:
            sizes = [p.numel() for p in shared]
            norms = {}
            for t in present:
                if not losses[t].requires_grad:
                    continue
                grads = torch.autograd.grad(losses[t], shared, retain_graph=True, allow_unused=True)
                norms[t] = gradient_moments(list(grads), sizes)[1]
            norms = _mean_over_ranks(norms, self.tasks)
            usable = [t for t in norms if t in values and not math.isnan(float(self.initial_loss[self._index(t)]))]
            if len(usable) >= 2:
                self._step(usable, norms, values)
            for t, g in norms.items():
                self.grad_norm[self._index(t)] = g
        active = list(losses)
        if active:
            idx = [self._index(t) for t in active]
            total = float(self.w[idx].sum())
            self._current = {t: float(self.w[self._index(t)]) * len(active) / total for t in active}
        self.last_update_s = time.perf_counter() - t0
        return dict(self._current)

    def _step(self, tasks: list[str], norms: dict[str, float], losses: dict[str, float]) -> None:
        idx = [self._index(t) for t in tasks]
        w = self.w[idx]
        g = torch.tensor([norms[t] for t in tasks], dtype=torch.float64)
        big_g = w * g
        ratio = torch.tensor([losses[t] / float(self.initial_loss[i]) for t, i in zip(tasks, idx)], dtype=torch.float64)
        r = ratio / ratio.mean()
        target = big_g.mean() * r.pow(self.alpha)  # held constant (Chen et al.)
        grad = torch.sign(big_g - target) * g  # d/dw_t of Σ |w_t g_t - target_t|
        b1, b2 = self.betas
        self.adam_t[idx] += 1
        self.adam_m[idx] = b1 * self.adam_m[idx] + (1 - b1) * grad
        self.adam_v[idx] = b2 * self.adam_v[idx] + (1 - b2) * grad * grad
        m_hat = self.adam_m[idx] / (1 - b1 ** self.adam_t[idx])
        v_hat = self.adam_v[idx] / (1 - b2 ** self.adam_t[idx])
        w = (w - self.lr * m_hat / (v_hat.sqrt() + 1e-8)).clamp(min=1e-3)
        self.w[idx] = w * len(tasks) / w.sum()  # Σ w = T over the tasks updated

    def signals(self) -> dict[str, float]:
        return {f"grad_norm_{t}": float(self.grad_norm[i]) for i, t in enumerate(self.tasks)
                if not math.isnan(float(self.grad_norm[i]))}  # fmt: skip


REGISTRY: dict[str, type[Weighting]] = {
    "equal": EqualWeighting,
    "grad_std": GradStdWeighting,
    "uncertainty": UncertaintyWeighting,
    "gradnorm": GradNormWeighting,
}
assert tuple(REGISTRY) == WEIGHTINGS


def build(name: str, tasks: list[str], scales: dict[str, float], cfg: PretrainConfig) -> Weighting:
    """The strategy ``name`` for ``tasks``; an unknown name raises listing the valid ones."""
    if name not in REGISTRY:
        raise KeyError(f"unknown task weighting {name!r}; valid: {', '.join(REGISTRY)}")
    missing = [t for t in tasks if t not in scales]
    if missing:
        raise KeyError(f"no output-size scale for task(s) {missing}")
    return REGISTRY[name](tasks, scales, cfg)
