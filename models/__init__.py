"""The network: an LXMERT-style encoder with swappable attention, LayerDrop and weight import.

Pure PyTorch; never imports ray, mlflow, tasks or transformers. See ``docs/models.md``.
"""

from models.builders import build_model, lxmert, lxmert_10_6_6, lxmert_base, lxmert_pretraining, lxmert_tiny
from models.config import (
    AttentionConfig,
    ConfigError,
    FinetuneConfig,
    LayerDropConfig,
    ModelConfig,
    apply_overrides,
    from_flat_dict,
    to_flat_dict,
)
from models.lxmert import (
    LXMERT_PRETRAIN_HEADS,
    PRETRAIN_HEADS,
    LxmertForPretraining,
    LxmertForVQA,
    LxmertModel,
    LxmertOutput,
    PretrainOutput,
)

__all__ = [
    "AttentionConfig",
    "ConfigError",
    "FinetuneConfig",
    "LXMERT_PRETRAIN_HEADS",
    "LayerDropConfig",
    "LxmertForPretraining",
    "LxmertForVQA",
    "LxmertModel",
    "LxmertOutput",
    "ModelConfig",
    "PRETRAIN_HEADS",
    "PretrainOutput",
    "apply_overrides",
    "build_model",
    "from_flat_dict",
    "lxmert",
    "lxmert_10_6_6",
    "lxmert_base",
    "lxmert_pretraining",
    "lxmert_tiny",
    "to_flat_dict",
]
