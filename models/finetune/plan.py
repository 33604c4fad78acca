"""What a fine-tuning strategy hands the training loop: :class:`FinetunePlan`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models.config import FinetuneConfig


def trainable_group(name: str, params: list[nn.Parameter], lr_scale: float = 1.0) -> dict[str, Any]:
    """A parameter group trained by the loop's main optimiser, at ``lr_scale`` times its learning rate."""
    return {"name": name, "params": list(params), "lr_scale": lr_scale}


@dataclass
class FinetunePlan:
    """A fine-tuning strategy applied to an encoder.

    Attributes:
        name: The strategy (``model.finetune.name``).
        encoder: The module the loop calls in place of the encoder (the same object for ``standard``,
            ``frozen`` and ``last_k``; a :class:`~models.finetune.spottune.SpotTuneEncoder` for SpotTune).
            It is called like :class:`~models.lxmert.LxmertModel` and holds every extra module (the
            policy), so ``.to()``, ``state_dict()`` and DDP cover them.
        param_groups: What trains, each ``{"params", "name", "lr_scale"}`` (the loop's main optimiser,
            learning rate scaled) or ``{"params", "name", "optimizer": {"name", "lr", "momentum"}}`` (its
            own optimiser: :func:`make_optimizer`). Parameters not in a group do not train (and have
            ``requires_grad`` False). The task head is not the plan's: the loop adds it.
        config: ``model.finetune``.
        extra_modules: Modules besides the encoder's own, by name (``{"policy": SpotTunePolicy}``).
        decision_names: One name per SpotTune decision (empty otherwise).

    The hooks the loop calls on every module (:mod:`models.hooks`) carry the rest: ``aux_loss()``
    (constrain-k and usage entropy, on the policy), ``stats()`` (``usage`` / ``eval_usage`` per gated
    unit, ``entropy`` / ``temperature`` on the policy).
    """

    name: str
    encoder: nn.Module
    param_groups: list[dict[str, Any]]
    config: FinetuneConfig
    extra_modules: dict[str, nn.Module] = field(default_factory=dict)
    decision_names: list[str] = field(default_factory=list)

    @property
    def adaptive(self) -> bool:
        """Whether a policy decides per sample (the SpotTune strategies)."""
        return "policy" in self.extra_modules

    def set_temperature(self, epoch: int, step: int) -> float | None:
        """Apply ``finetune.temperature_schedule`` at (epoch, global step); returns the temperature
        (None for strategies without a policy). Call it every step (or every epoch for per-epoch
        schedules), also after a resume: the temperature is a function of (epoch, step)."""
        policy = self.extra_modules.get("policy")
        return policy.set_temperature(epoch, step) if policy is not None else None

    def reset_usage(self) -> None:
        """Start a new usage window: zero the units' usage counts and the policy-entropy accumulators.

        The loop calls it at the start of every epoch, so that ``stats()`` at the end of the epoch are
        the epoch's and ``eval_mode=global`` uses the epoch's training decisions.
        """
        if self.adaptive:
            self.encoder.reset_usage()

    def last_decisions(self) -> Tensor | None:
        """(B, D) decisions of the last forward (1 = fine-tuned; columns ``decision_names``), or None."""
        return self.encoder.last_decisions if self.adaptive else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter of every group."""
        return [p for group in self.param_groups for p in group["params"]]


def make_optimizer(group: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimiser of a group that carries its own (``group["optimizer"]``: name ``sgd | adam | adamw``,
    ``lr``, ``momentum`` for SGD)."""
    spec = group.get("optimizer")
    if spec is None:
        raise ValueError(f"parameter group {group.get('name')!r} has no optimizer of its own (it uses the loop's)")
    name, lr = spec["name"], spec["lr"]
    if name == "sgd":
        return torch.optim.SGD(group["params"], lr=lr, momentum=spec.get("momentum", 0.0))
    if name == "adam":
        return torch.optim.Adam(group["params"], lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(group["params"], lr=lr)
    raise ValueError(f"parameter group {group.get('name')!r}: optimizer {name!r}; valid: ['adam', 'adamw', 'sgd']")


class GroupUsage:
    """Usage of the fine-tuned branch per decision and per group of samples (e.g. question type).

    Feed it :meth:`FinetunePlan.last_decisions` after each forward with the batch's group labels::

        by_type = GroupUsage()
        by_type.update(plan.last_decisions(), batch_question_types)
        rates = by_type.rates()      # {"what color": (D,) share of its samples that fine-tuned, ...}
    """

    def __init__(self) -> None:
        self.used: dict[str, Tensor] = {}
        self.seen: dict[str, int] = {}

    def update(self, decisions: Tensor, groups: list[str] | tuple[str, ...]) -> None:
        """Count (B, D) 0/1 decisions under each sample's group (B labels)."""
        if decisions.shape[0] != len(groups):
            raise ValueError(f"{decisions.shape[0]} rows of decisions for {len(groups)} group labels")
        d = decisions.detach().to("cpu", torch.float64)
        for group in dict.fromkeys(groups):
            rows = torch.tensor([g == group for g in groups])
            self.used[group] = self.used.get(group, torch.zeros(d.shape[1], dtype=torch.float64)) + d[rows].sum(0)
            self.seen[group] = self.seen.get(group, 0) + int(rows.sum())

    def rates(self) -> dict[str, Tensor]:
        """``{group: (D,) share of the group's samples that took the fine-tuned branch}``."""
        return {group: self.used[group] / self.seen[group] for group in self.used}

    def reset(self) -> None:
        self.used.clear()
        self.seen.clear()
