"""Fine-tuning strategies: what of a pretrained encoder trains, and for SpotTune, per input, which copy runs.

``FINETUNE_REGISTRY[name](encoder, cfg) -> FinetunePlan`` (``standard``, ``frozen``, ``last_k``,
``spottune_block``, ``spottune``, ``spottune_res``). See ``docs/finetuning.md``::

    encoder = models.builders.backbone(cfg)          # then load the pretrained weights into it
    plan = apply_finetune(encoder, cfg.finetune)      # SpotTune takes its frozen copies here
    out = plan.encoder(input_ids, attention_mask, token_type_ids, visual_feats, visual_pos)
    groups = plan.param_groups                        # "encoder" (+ "policy" with its own optimiser)

Pure PyTorch: never imports ray, mlflow, tasks or sweeps.
"""

from models.finetune.gates import (
    DecisionBoard,
    GatedFeedForward,
    GatedHeads,
    GatedModule,
    GatedUnit,
    mix,
    straight_through_gumbel,
)
from models.finetune.plan import FinetunePlan, GroupUsage, make_optimizer
from models.finetune.policy import PolicyNetwork, SpotTunePolicy, policy_config
from models.finetune.registry import FINETUNE_REGISTRY, apply_finetune, get_strategy
from models.finetune.spottune import GRANULARITY, SpotTuneEncoder, decision_count

__all__ = [
    "DecisionBoard",
    "FINETUNE_REGISTRY",
    "FinetunePlan",
    "GRANULARITY",
    "GatedFeedForward",
    "GatedHeads",
    "GatedModule",
    "GatedUnit",
    "GroupUsage",
    "PolicyNetwork",
    "SpotTuneEncoder",
    "SpotTunePolicy",
    "apply_finetune",
    "decision_count",
    "get_strategy",
    "make_optimizer",
    "mix",
    "policy_config",
    "straight_through_gumbel",
]
