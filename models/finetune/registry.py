"""``FINETUNE_REGISTRY``: strategy name -> ``apply(encoder, cfg) -> FinetunePlan``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from models.finetune.plan import FinetunePlan
from models.finetune.spottune import spottune_plan
from models.finetune.strategies import frozen, last_k, standard

#: A plain dict (an unknown name raises listing the valid ones: :func:`get_strategy`).
FINETUNE_REGISTRY: dict[str, Callable[..., FinetunePlan]] = {
    "standard": standard,
    "frozen": frozen,
    "last_k": last_k,
    "spottune_block": partial(spottune_plan, granularity="spottune_block"),
    "spottune": partial(spottune_plan, granularity="spottune"),
    "spottune_res": partial(spottune_plan, granularity="spottune_res"),
}


def get_strategy(name: str) -> Callable[..., FinetunePlan]:
    """The builder registered as ``name``; raises ``KeyError`` listing the valid names."""
    try:
        return FINETUNE_REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown fine-tuning strategy {name!r}; valid: {sorted(FINETUNE_REGISTRY)}") from None


def apply_finetune(encoder: nn.Module, cfg=None) -> FinetunePlan:
    """Apply ``cfg`` (default: ``encoder.config.finetune``) to ``encoder``, AFTER its pretrained
    weights are loaded (SpotTune's frozen copies are taken here). Modifies ``encoder`` in place."""
    cfg = cfg if cfg is not None else encoder.config.finetune
    return get_strategy(cfg.name)(encoder, cfg)
