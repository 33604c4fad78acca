"""The strategies that only choose what trains: ``standard``, ``frozen``, ``last_k``."""

from __future__ import annotations

from torch import nn

from models.config import FinetuneConfig
from models.finetune.plan import FinetunePlan, trainable_group
from models.lxmert import LxmertModel


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def _check(encoder: nn.Module, name: str) -> LxmertModel:
    if not isinstance(encoder, LxmertModel):
        raise TypeError(f"finetune.name={name} applies to an LxmertModel; got {type(encoder).__name__}")
    return encoder


def _plan(name: str, encoder: LxmertModel, cfg: FinetuneConfig) -> FinetunePlan:
    params = [p for p in encoder.parameters() if p.requires_grad]
    groups = [trainable_group("encoder", params)] if params else []
    return FinetunePlan(name=name, encoder=encoder, param_groups=groups, config=cfg)


def standard(encoder: nn.Module, cfg: FinetuneConfig) -> FinetunePlan:
    """Every parameter of the encoder trains; the encoder is returned as it is."""
    encoder = _check(encoder, "standard")
    _set_trainable(encoder, True)
    return _plan("standard", encoder, cfg)


def _freeze_layers(encoder: LxmertModel, cfg: FinetuneConfig, keep_top: int) -> None:
    """Freeze every layer but the top ``keep_top`` of each stack; embeddings per ``train_embeddings``;
    the pooler trains (it sits on top, with the task head)."""
    _set_trainable(encoder, True)
    enc = encoder.encoder
    for layers in (enc.lang_layers, enc.visn_layers, enc.cross_layers):
        for i, layer in enumerate(layers):
            _set_trainable(layer, i >= len(layers) - keep_top)
    _set_trainable(encoder.embeddings, cfg.train_embeddings)
    _set_trainable(encoder.visual_embeddings, cfg.train_embeddings)


def frozen(encoder: nn.Module, cfg: FinetuneConfig) -> FinetunePlan:
    """The encoder's layers are frozen; the pooler (and the embeddings, unless
    ``finetune.train_embeddings=false``) train with the head, as the reference code's Frozen_Bert."""
    encoder = _check(encoder, "frozen")
    _freeze_layers(encoder, cfg, keep_top=0)
    return _plan("frozen", encoder, cfg)


def last_k(encoder: nn.Module, cfg: FinetuneConfig) -> FinetunePlan:
    """The top ``finetune.k`` layers of each stack (language, vision, cross) train, the others are
    frozen; embeddings per ``finetune.train_embeddings``, the pooler trains."""
    encoder = _check(encoder, "last_k")
    for stack, depth in encoder.config.depths.items():
        if cfg.k > depth:
            raise ValueError(f"finetune.k={cfg.k} exceeds the {depth} layer(s) of stack {stack!r}")
    _freeze_layers(encoder, cfg, keep_top=cfg.k)
    return _plan("last_k", encoder, cfg)
