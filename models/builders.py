"""Builders: :func:`lxmert` assembles a model from a config; the presets are numbers only.

Usage::

    from models import build_model, lxmert_base, lxmert_tiny
    model = build_model(lxmert_base("attention.name=entmax", "attention.stacks=cross"))
    model = build_model(lxmert_tiny(l_layers=9, x_layers=5, r_layers=5))
    pretraining = lxmert_pretraining(lxmert_tiny(), num_object_labels=4, num_attr_labels=9, num_qa_answers=16)

Presets accept ``key=value`` strings (dotted keys, as on the command line) and keyword fields.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from models.attention import MultiHeadAttention, build_kernel
from models.config import AttentionConfig, ConfigError, ModelConfig, apply_overrides
from models.flow import CROSS, FLOW_LAYERS, Flow, FlowLayer, layer_kinds
from models.heads import ContrastiveHead, MaskedObjectHead, MatchHead, MLMHead, PairHead, VQAHead
from models.layerdrop import LayerDrop
from models.lxmert import (
    LXMERT_PRETRAIN_HEADS,
    PRETRAIN_HEADS,
    AttentionBlock,
    CrossLayer,
    EncoderLayer,
    FeedForward,
    LxmertEncoder,
    LxmertForPretraining,
    LxmertForVQA,
    LxmertModel,
    Pooler,
    TextEmbeddings,
    VisualEmbeddings,
)


def _span_max(cfg: ModelConfig, keys: str) -> int:
    """S_max for an attention whose keys are ``lang`` tokens, ``visn`` regions or ``cross``; ``shared``:
    a single-stream attention, whose span applies within tokens and within regions (the larger)."""
    att = cfg.attention
    return {"lang": att.span_max_lang, "visn": att.span_max_visn, "cross": att.span_max_cross,
            "shared": max(att.span_max_lang, att.span_max_visn)}[keys]  # fmt: skip


def attention_block(cfg: ModelConfig, stack: str, attention: str, keys: str) -> AttentionBlock:
    """The attention sub-layer at one site, with the kernel the config assigns to that site.

    Args:
        cfg: Model config.
        stack: ``lang | visn | cross``.
        attention: ``self | cross | lang_self | visn_self``; in a flow layer the stream: ``lang |
            visn | shared``.
        keys: Whose positions the span measures (``lang | visn | cross | shared``), for its S_max.
    """
    name = cfg.attention.name if cfg.attention.uses(stack, attention) else "softmax"
    kernel = build_kernel(
        name, cfg.num_heads, cfg.attention, span_max=_span_max(cfg, keys), dropout=cfg.attention_dropout
    )
    mha = MultiHeadAttention(cfg.hidden_size, cfg.num_heads, kernel)
    return AttentionBlock(mha, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)


def feed_forward(cfg: ModelConfig) -> FeedForward:
    """The feed-forward sub-layer."""
    return FeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps, cfg.hidden_dropout)


def init_weights(model: nn.Module, std: float) -> None:
    """BERT / HuggingFace initialisation: N(0, std) linear and embedding weights, zero biases,
    LayerNorm (1, 0), the padding row zero. Kernel parameters (span z, alpha) keep their own init."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def cross_layer(cfg: ModelConfig) -> CrossLayer:
    """LXMERT's cross-modality layer (``flow=modality_specific``)."""
    return CrossLayer(
        cross_att=attention_block(cfg, "cross", "cross", "cross"),
        lang_self_att=attention_block(cfg, "cross", "lang_self", "lang"),
        visn_self_att=attention_block(cfg, "cross", "visn_self", "visn"),
        lang_ffn=feed_forward(cfg),
        visn_ffn=feed_forward(cfg),
    )


def flow_layer(cfg: ModelConfig, flow: Flow) -> FlowLayer:
    """A fusion layer of ``flow`` (:mod:`models.flow`): one attention block and one feed-forward per
    stream (``lang`` and ``visn``, or one ``shared``)."""
    streams = flow.streams()
    attention = nn.ModuleDict({s: attention_block(cfg, "cross", s, s) for s in streams})
    return FlowLayer(flow, attention, nn.ModuleDict({s: feed_forward(cfg) for s in streams}))


#: Fusion-layer kind (:func:`models.flow.layer_kinds`) -> builder ``cfg -> layer``.
FUSION_LAYERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    CROSS: cross_layer,
    **{name: partial(flow_layer, flow=flow) for name, flow in FLOW_LAYERS.items()},
}


def fusion_layers(cfg: ModelConfig) -> list[nn.Module]:
    """The ``x_layers`` fusion layers ``cfg.flow`` asks for."""
    return [FUSION_LAYERS[kind](cfg) for kind in layer_kinds(cfg.flow, cfg.x_layers, cfg.flow_merged_from)]


def backbone(cfg: ModelConfig) -> LxmertModel:
    """The encoder (embeddings, language / vision / fusion stacks, pooler), not initialised:
    :func:`lxmert` and :func:`lxmert_pretraining` put their heads on it, then initialise."""
    cfg.validate()
    lang_layers = [EncoderLayer(attention_block(cfg, "lang", "self", "lang"), feed_forward(cfg))
                   for _ in range(cfg.l_layers)]  # fmt: skip
    visn_layers = [EncoderLayer(attention_block(cfg, "visn", "self", "visn"), feed_forward(cfg))
                   for _ in range(cfg.r_layers)]  # fmt: skip
    cross_layers = fusion_layers(cfg)
    encoder = LxmertEncoder(cfg, lang_layers, visn_layers, cross_layers, LayerDrop(cfg.layerdrop, cfg.depths))
    return LxmertModel(cfg, TextEmbeddings(cfg), VisualEmbeddings(cfg), encoder, Pooler(cfg.hidden_size))


def lxmert(cfg: ModelConfig) -> LxmertForVQA:
    """Assemble an :class:`LxmertForVQA` from ``cfg`` (validated), initialised like BERT."""
    model = LxmertForVQA(cfg, backbone(cfg), VQAHead(cfg.hidden_size, cfg.num_answers, cfg.layer_norm_eps))
    init_weights(model, cfg.initializer_range)
    return model


def lxmert_pretraining(
    cfg: ModelConfig,
    heads: tuple[str, ...] | list[str] = LXMERT_PRETRAIN_HEADS,
    *,
    num_object_labels: int = 1600,
    num_attr_labels: int = 400,
    num_qa_answers: int = 9500,
    contrastive_dim: int = 256,
    contrastive_temperature: float = 0.07,
    contrastive_learn_temperature: bool = True,
) -> LxmertForPretraining:
    """Assemble an :class:`LxmertForPretraining`: the same encoder as :func:`lxmert` plus LXMERT's
    pretraining heads, initialised like BERT (the MLM bias at 0, as HuggingFace does).

    Args:
        cfg: Model config (``num_answers`` is the fine-tuning head's and is not used here).
        heads: Which heads to build, a subset of ``mlm, mor, match, qa, contrastive``.
        num_object_labels: Object classes of masked object prediction (LXMERT: 1,600).
        num_attr_labels: Attribute classes (LXMERT: 400).
        num_qa_answers: Answers of the image-QA head (LXMERT: 9,500).
        contrastive_dim: Embedding size of the contrastive head.
        contrastive_temperature: Its initial (or fixed) temperature.
        contrastive_learn_temperature: Train the temperature (else fixed).
    """
    unknown = sorted(set(heads) - set(PRETRAIN_HEADS))
    if unknown:
        raise ConfigError(f"pretraining heads {unknown} are unknown; valid: {', '.join(PRETRAIN_HEADS)}")
    for key, value in (("num_object_labels", num_object_labels), ("num_attr_labels", num_attr_labels),
                       ("num_qa_answers", num_qa_answers), ("contrastive_dim", contrastive_dim)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    h, eps = cfg.hidden_size, cfg.layer_norm_eps
    factories = {
        "mlm": lambda: MLMHead(h, cfg.vocab_size, eps),
        "mor": lambda: MaskedObjectHead(h, num_object_labels, num_attr_labels, cfg.visual_feat_dim, eps),
        "match": lambda: MatchHead(h),
        "qa": lambda: VQAHead(h, num_qa_answers, eps),
        "contrastive": lambda: ContrastiveHead(h, contrastive_dim, contrastive_temperature, contrastive_learn_temperature),
    }
    encoder = backbone(cfg)
    model = LxmertForPretraining(cfg, encoder, nn.ModuleDict({n: factories[n]() for n in PRETRAIN_HEADS if n in heads}))
    init_weights(model, cfg.initializer_range)
    if "mlm" in model.heads:
        nn.init.zeros_(model.heads["mlm"].bias)
    return model


def pair_head(cfg: ModelConfig, num_classes: int = 2, num_images: int = 2) -> PairHead:
    """NLVR2's head for an encoder built from ``cfg``, initialised like BERT (as LXMERT does)."""
    head = PairHead(cfg.hidden_size, num_classes, num_images, cfg.layer_norm_eps)
    init_weights(head, cfg.initializer_range)
    return head


def build_model(cfg: ModelConfig) -> LxmertForVQA:
    """``ModelConfig -> LxmertForVQA`` (the name other packages use)."""
    return lxmert(cfg)


def _preset(base: ModelConfig, overrides: tuple[str, ...], fields: dict[str, Any]) -> ModelConfig:
    cfg = apply_overrides(base, fields) if fields else base
    return apply_overrides(cfg, list(overrides)) if overrides else cfg


def lxmert_base(*overrides: str, **fields: Any) -> ModelConfig:
    """LXMERT base: 9-5-5 layers, hidden 768, 12 heads, 2,048-d regions, 3,129 answers (213.9M params)."""
    return _preset(ModelConfig(), overrides, fields)


def lxmert_10_6_6(*overrides: str, **fields: Any) -> ModelConfig:
    """LXMERT with 10 language, 6 cross-modality, 6 vision layers (the paper's LayerDrop model)."""
    return _preset(ModelConfig(l_layers=10, x_layers=6, r_layers=6), overrides, fields)


def lxmert_tiny(*overrides: str, **fields: Any) -> ModelConfig:
    """A tiny model for tests: hidden 32, 4 heads, 2-2-2 layers, 16-d regions, 64 words, 10 answers."""
    base = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_heads=4,
        intermediate_size=64,
        l_layers=2,
        x_layers=2,
        r_layers=2,
        visual_feat_dim=16,
        max_position_embeddings=32,
        num_answers=10,
        attention=AttentionConfig(span_max_lang=8, span_max_visn=8, span_max_cross=8, span_ramp=2),
    )
    return _preset(base, overrides, fields)
