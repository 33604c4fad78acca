"""Analytic parameter and FLOP counts for any :class:`models.config.ModelConfig`.

FLOPs count the matrix products (a multiply-add = 2 FLOPs): every Linear, and the attention score
(QK^T) and value (PV) products. LayerNorm, GeLU, softmax / entmax / span masks, dropout and embedding
lookups are elementwise and left out (under 1% here). Backward is taken as 2x forward.

Reference numbers (tested): LXMERT 9-5-5 with the 3,129-answer VQA head has 213,930,297 parameters
(HuggingFace ``LxmertForQuestionAnswering(num_qa_labels=3129)``; the encoder alone, ``LxmertModel``,
has 207,936,768); at 20 tokens + 36 regions it costs 10.6 GFLOP forward, 31.8 GFLOP forward +
backward per sample; dropping one layer per stack (8-4-4 layers run) saves 17.6% (the paper: 17.54%).

Attention flows (``ModelConfig.flow``, :mod:`models.flow`): a fusion layer is LXMERT's cross layer
(``modality_specific``) or a flow layer (one attention block + feed-forward per stream, or one shared);
:func:`fusion_layer_params` and :func:`fusion_layer_flops` give each kind's cost.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from models.config import ModelConfig
from models.flow import CROSS, FLOW_LAYERS, layer_kinds


def _fusion_kinds(cfg: ModelConfig) -> list[str]:
    """The kind of each fusion layer (``modality_specific`` or a flow of :data:`models.flow.FLOW_LAYERS`)."""
    return layer_kinds(cfg.flow, cfg.x_layers, cfg.flow_merged_from)


def _fusion_attentions(kind: str) -> tuple[str, ...]:
    """The attention modules of one fusion layer, by their ``attention.stacks`` names under ``cross``."""
    return ("cross", "lang_self", "visn_self") if kind == CROSS else FLOW_LAYERS[kind].streams()


def _kernel_params(cfg: ModelConfig) -> int:
    """Parameters of the attention kernels: span z and/or learned alpha, H per attention module."""
    att = cfg.attention
    per_module = 0
    if att.name in ("span", "span_entmax"):
        per_module += cfg.num_heads
    if att.name in ("entmax", "span_entmax") and att.alpha_mode == "learned":
        per_module += cfg.num_heads
    if not per_module:
        return 0
    sites = cfg.l_layers * att.uses("lang", "self") + cfg.r_layers * att.uses("visn", "self")
    sites += sum(att.uses("cross", a) for kind in _fusion_kinds(cfg) for a in _fusion_attentions(kind))
    return per_module * sites


def fusion_layer_params(kind: str, hidden_size: int, intermediate_size: int) -> int:
    """Parameters of one fusion layer of ``kind`` (kernel parameters not included).

    ``modality_specific`` (LXMERT): one shared cross-attention, two self-attentions, two feed-forwards;
    a flow layer: one attention block and one feed-forward per stream (two, or one when shared).
    """
    h, i = hidden_size, intermediate_size
    ln = 2 * h  # LayerNorm weight and bias
    attention = 4 * (h * h + h) + ln  # qkv + output projection + LayerNorm
    ffn = (h * i + i) + (i * h + h) + ln
    if kind == CROSS:
        return 3 * attention + 2 * ffn
    return len(FLOW_LAYERS[kind].streams()) * (attention + ffn)


def count_params(cfg: ModelConfig, *, head: bool = True) -> int:
    """Exact number of parameters of ``build_model(cfg)`` (``head=False``: the encoder alone)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    ln = 2 * h
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * h + ln
    visual = (cfg.visual_feat_dim + 1) * h + ln + (cfg.visual_pos_dim + 1) * h + ln
    attention = 4 * (h * h + h) + ln  # qkv + output projection + LayerNorm
    ffn = (h * i + i) + (i * h + h) + ln
    self_layer = attention + ffn
    fusion = sum(n * fusion_layer_params(kind, h, i) for kind, n in Counter(_fusion_kinds(cfg)).items())
    pooler = h * h + h
    total = embeddings + visual + (cfg.l_layers + cfg.r_layers) * self_layer + fusion
    total += pooler + _kernel_params(cfg)
    if head:
        total += (h * 2 * h + 2 * h) + 2 * (2 * h) + (2 * h * cfg.num_answers + cfg.num_answers)
    return total


@dataclass
class FlopCount:
    """FLOPs per sample, by part (forward)."""

    embeddings: float
    lang: float
    visn: float
    cross: float
    pooler_head: float
    layers_run: dict[str, float]

    @property
    def forward(self) -> float:
        return self.embeddings + self.lang + self.visn + self.cross + self.pooler_head

    @property
    def forward_backward(self) -> float:
        return 3 * self.forward


def _self_layer(n: int, h: int, i: int) -> float:
    """FLOPs of one self-attention + FFN layer over n positions."""
    return 2 * (4 * n * h * h + 2 * n * n * h + 2 * n * h * i)


def _cross_layer(t: int, r: int, h: int, i: int) -> float:
    """FLOPs of one cross-modality layer: both cross directions, two self-attentions, two FFNs."""
    n = t + r
    cross = 2 * (4 * n * h * h + 2 * 2 * t * r * h)  # q, k, v, out over both streams; QK^T and PV both ways
    return cross + _self_layer(t, h, i) + _self_layer(r, h, i)


def fusion_layer_flops(kind: str, t: int, r: int, h: int, i: int) -> float:
    """Forward FLOPs of one fusion layer of ``kind`` over T tokens and R regions.

    A flow layer projects every token once (q, k, v, output, feed-forward, whatever the sharing) and
    scores every query against all ``T + R`` keys: the blocks its flow hides are masked, not skipped
    (under 1% of a layer at LXMERT's sizes), so it costs one self-attention layer over ``T + R``
    positions, like a single-stream layer.
    """
    return _cross_layer(t, r, h, i) if kind == CROSS else _self_layer(t + r, h, i)


def _keep_probability(cfg: ModelConfig, stack: str, index: int, training: bool) -> float:
    """How often layer ``index`` of ``stack`` runs: in training its expected rate under LayerDrop, else 0/1."""
    ld = cfg.layerdrop
    n = cfg.depths[stack]
    if stack not in ld.stack_list():
        return 1.0
    if training and ld.mode == "fixed":
        return (n - ld.n_drop) / n
    if training and ld.mode == "prob":
        return 1 - ld.p
    if not training and ld.eval == "every_other":
        return float(index % 2 == 0)
    return 1.0


def _fusion_flops(cfg: ModelConfig, layers: float, t: int, r: int, training: bool) -> float:
    """FLOPs of the fusion stack: ``layers`` (expected) layers of one kind, or per kind (mixed)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kinds = _fusion_kinds(cfg)
    if len(set(kinds)) <= 1:  # one kind: the expected layer count times its cost
        return layers * fusion_layer_flops(kinds[0] if kinds else CROSS, t, r, h, i)
    return sum(_keep_probability(cfg, "cross", j, training) * fusion_layer_flops(kind, t, r, h, i)
               for j, kind in enumerate(kinds))  # fmt: skip


def expected_layers(cfg: ModelConfig, training: bool) -> dict[str, float]:
    """Layers run per stack: in training the expected number under LayerDrop, else the eval keep-list."""
    depths = {k: float(v) for k, v in cfg.depths.items()}
    ld = cfg.layerdrop
    for stack in ld.stack_list():
        n = depths[stack]
        if training and ld.mode == "fixed":
            depths[stack] = n - ld.n_drop
        elif training and ld.mode == "prob":
            depths[stack] = n * (1 - ld.p)
        elif not training and ld.eval == "every_other":
            depths[stack] = float(len(range(0, int(n), 2)))
    return depths


def flop_count(cfg: ModelConfig, n_tokens: int = 20, n_regions: int = 36, *, training: bool = False,
               head: bool = True) -> FlopCount:  # fmt: skip
    """Forward FLOPs per sample by part.

    Args:
        cfg: Model config.
        n_tokens: Text length T (20 for VQA).
        n_regions: Regions R (36).
        training: Count the layers LayerDrop runs in training (expected value for ``mode=prob``);
            otherwise the layers run at evaluation.
        head: Include the VQA head.
    """
    h, i, t, r = cfg.hidden_size, cfg.intermediate_size, n_tokens, n_regions
    layers = expected_layers(cfg, training)
    emb = 2 * r * (cfg.visual_feat_dim + cfg.visual_pos_dim) * h
    pooler_head = 2 * h * h + (2 * (h * 2 * h + 2 * h * cfg.num_answers) if head else 0)
    return FlopCount(
        embeddings=emb,
        lang=layers["lang"] * _self_layer(t, h, i),
        visn=layers["visn"] * _self_layer(r, h, i),
        cross=_fusion_flops(cfg, layers["cross"], t, r, training),
        pooler_head=pooler_head,
        layers_run=layers,
    )


def flops_per_sample(cfg: ModelConfig, n_tokens: int = 20, n_regions: int = 36, *, training: bool = False,
                     backward: bool = False, head: bool = True) -> float:  # fmt: skip
    """Forward (or, with ``backward=True``, forward + backward) FLOPs per sample.

    See :func:`flop_count` for the arguments. ``training=True`` with LayerDrop counts the layers that
    run in a training step, so ``1 - flops(training=True) / flops(training=False)`` is the saving.
    """
    count = flop_count(cfg, n_tokens, n_regions, training=training, head=head)
    return count.forward_backward if backward else count.forward


def layerdrop_saving(cfg: ModelConfig, n_tokens: int = 20, n_regions: int = 36) -> float:
    """Fraction of training FLOPs LayerDrop saves against running every layer."""
    full = flops_per_sample(cfg, n_tokens, n_regions, training=False)
    if cfg.layerdrop.eval != "all":
        from dataclasses import replace

        full = flops_per_sample(replace(cfg, layerdrop=replace(cfg.layerdrop, eval="all")), n_tokens, n_regions)
    return 1.0 - flops_per_sample(cfg, n_tokens, n_regions, training=True) / full
