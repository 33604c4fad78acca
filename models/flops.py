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


def _kernel_per_module(cfg: ModelConfig) -> int:
    """Parameters of one attention module's kernel where ``attention.name`` applies: span z and/or
    learned alpha, H each."""
    att = cfg.attention
    per_module = 0
    if att.name in ("span", "span_entmax"):
        per_module += cfg.num_heads
    if att.name in ("entmax", "span_entmax") and att.alpha_mode == "learned":
        per_module += cfg.num_heads
    return per_module


def _kernel_params(cfg: ModelConfig) -> int:
    """Parameters of all attention kernels: span z and/or learned alpha, H per attention module."""
    att, per_module = cfg.attention, _kernel_per_module(cfg)
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


def _param_parts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part for LXMERT's layout (the fine-tuning costs read it): ``embeddings`` (text +
    regions), ONE ``lang`` / ``visn`` / ``cross`` layer (with its kernel parameters), ``pooler``, the
    VQA ``head``."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    ln = 2 * h
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * h + ln
    visual = (cfg.visual_feat_dim + 1) * h + ln + (cfg.visual_pos_dim + 1) * h + ln
    attention = 4 * (h * h + h) + ln  # qkv + output projection + LayerNorm
    ffn = (h * i + i) + (i * h + h) + ln
    kernel, att = _kernel_per_module(cfg), cfg.attention
    cross_sites = sum(att.uses("cross", a) for a in ("cross", "lang_self", "visn_self"))
    return {
        "embeddings": embeddings + visual,
        "lang": attention + ffn + kernel * att.uses("lang", "self"),
        "visn": attention + ffn + kernel * att.uses("visn", "self"),
        # one shared cross-attention, two self-attentions, two FFNs
        "cross": 3 * attention + 2 * ffn + kernel * cross_sites,
        "pooler": h * h + h,
        "head": (h * 2 * h + 2 * h) + 2 * (2 * h) + (2 * h * cfg.num_answers + cfg.num_answers),
    }


def count_params(cfg: ModelConfig, *, head: bool = True) -> int:
    """Exact number of parameters of ``build_model(cfg)`` (``head=False``: the encoder alone), any flow."""
    parts = _param_parts(cfg)
    h, i = cfg.hidden_size, cfg.intermediate_size
    ln = 2 * h
    self_layer = (4 * (h * h + h) + ln) + ((h * i + i) + (i * h + h) + ln)
    fusion = sum(n * fusion_layer_params(kind, h, i) for kind, n in Counter(_fusion_kinds(cfg)).items())
    total = parts["embeddings"] + (cfg.l_layers + cfg.r_layers) * self_layer + fusion + parts["pooler"]
    total += _kernel_params(cfg)
    return total + (parts["head"] if head else 0)


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


# --------------------------------------------------------------------------------------------------
# Fine-tuning strategies (models.finetune): what trains decides the backward, SpotTune runs two copies


@dataclass
class FinetuneCost:
    """FLOPs per sample and parameters of a fine-tuning strategy (``cfg.finetune``), VQA head included.

    Attributes:
        strategy: ``finetune.name``.
        forward: Training forward (SpotTune: both copies of every unit + the policy network).
        backward: Its backward: a matrix product costs its forward once for the gradient of its
            weights (if they train) and once for the gradient of its input (if anything below it
            trains); the attention products twice when their inputs need gradients; nothing for the
            products whose output never reaches a head that reads the pooled [CLS] (the vision half
            of the last cross layer).
        eval_forward: Forward at evaluation (``eval_mode=global`` skips the policy network).
        policy_forward: The policy network's share of ``forward`` (0 without one).
        decisions: SpotTune decisions per sample (0 otherwise).
        params_trainable: Parameters the loop's main optimiser trains (encoder + head).
        params_frozen: Frozen parameters (SpotTune's frozen copies; ``frozen`` / ``last_k``'s frozen layers).
        params_policy: The policy network's (its own optimiser).
    """

    strategy: str
    forward: float
    backward: float
    eval_forward: float
    policy_forward: float
    decisions: int
    params_trainable: int
    params_frozen: int
    params_policy: int

    @property
    def train(self) -> float:
        """Forward + backward FLOPs of a training step, per sample."""
        return self.forward + self.backward

    @property
    def params_total(self) -> int:
        return self.params_trainable + self.params_frozen + self.params_policy


class _Tally:
    """Forward and backward FLOPs of matrix products, given what needs a gradient.

    ``live=False`` marks a product whose output never reaches the loss (the vision half of the last
    cross layer under a head that reads the pooled [CLS]): autograd skips its backward.
    """

    def __init__(self) -> None:
        self.fwd = 0.0
        self.bwd = 0.0

    def linear(self, flops: float, weight_trains: bool, input_grad: bool, live: bool = True) -> None:
        self.fwd += flops
        self.bwd += flops * (int(weight_trains) + int(input_grad)) if live else 0.0

    def product(self, flops: float, input_grad: bool, live: bool = True) -> None:
        """QK^T and PV: both operands are activations."""
        self.fwd += flops
        self.bwd += 2 * flops if input_grad and live else 0.0


def _copies(mode: str) -> tuple[bool, ...]:
    """Whether the weights train, for each copy a unit runs in ``mode``."""
    return {"train": (True,), "frozen": (False,)}.get(mode, (True, False))


def _attention_cost(t: _Tally, h: int, rows: tuple[int, int], prods: tuple[float, float], mode: str, g: bool,
                    live: tuple[bool, bool] = (True, True)) -> bool:  # fmt: skip
    """One attention sub-layer in ``mode`` (``train | frozen | res | component``; ``res`` and
    ``component`` run a fine-tuned and a frozen copy) on an input that needs a gradient iff ``g``.

    ``rows``: query rows per direction (one direction for self-attention, the second 0); ``prods``:
    score + value FLOPs per direction; ``live``: whether each direction's output reaches the loss.
    Returns whether the output needs a gradient. (q, k, v of all rows come from one matmul.)
    """
    n = rows[0] + rows[1]
    for w in _copies(mode):
        t.linear(2 * n * h * 3 * h, w, g, live=any(live))
        for prod, alive in zip(prods, live):
            t.product(prod, g or w, live=alive)
    # the output part of each copy reads its own heads (res) or the per-head mix of both (component)
    heads_grad = True if mode == "component" else None
    for w in _copies(mode):
        for r, alive in zip(rows, live):
            t.linear(2 * r * h * h, w, heads_grad if heads_grad is not None else g or w, live=alive)
    return g or mode != "frozen"


def _ffn_cost(t: _Tally, h: int, i: int, rows: int, mode: str, g: bool, live: bool = True) -> bool:
    for w in _copies(mode):
        t.linear(2 * rows * h * i, w, g, live=live)
    for w in _copies(mode):
        t.linear(2 * rows * i * h, w, True if mode == "component" else g or w, live=live)
    return g or mode != "frozen"


def _layer_cost(t: _Tally, cfg: ModelConfig, stack: str, mode: str, n_t: int, n_r: int, g_l: bool, g_v: bool,
                visn_live: bool) -> tuple[bool, bool]:  # fmt: skip
    """One layer in ``mode`` (``block``: the whole layer twice, fine-tuned and frozen, same input);
    ``visn_live``: whether its vision output reaches the loss."""
    if mode == "block":
        out = _layer_cost(t, cfg, stack, "train", n_t, n_r, g_l, g_v, visn_live)
        _layer_cost(t, cfg, stack, "frozen", n_t, n_r, g_l, g_v, visn_live)
        return out  # the fine-tuned copy's output needs a gradient, so does the mix
    h, i = cfg.hidden_size, cfg.intermediate_size
    if stack == "lang":
        g = _attention_cost(t, h, (n_t, 0), (4 * n_t * n_t * h, 0.0), mode, g_l)
        return _ffn_cost(t, h, i, n_t, mode, g), g_v
    if stack == "visn":
        g = _attention_cost(t, h, (n_r, 0), (4 * n_r * n_r * h, 0.0), mode, g_v, (visn_live, False))
        return g_l, _ffn_cost(t, h, i, n_r, mode, g, visn_live)
    # the shared cross-attention: text queries over regions and region queries over text
    g = _attention_cost(t, h, (n_t, n_r), (4 * n_t * n_r * h, 4 * n_t * n_r * h), mode, g_l or g_v, (True, visn_live))
    g_l = _ffn_cost(t, h, i, n_t, mode, _attention_cost(t, h, (n_t, 0), (4 * n_t * n_t * h, 0.0), mode, g))
    g_v = _attention_cost(t, h, (n_r, 0), (4 * n_r * n_r * h, 0.0), mode, g, (visn_live, False))
    return g_l, _ffn_cost(t, h, i, n_r, mode, g_v, visn_live)


def _layer_modes(cfg: ModelConfig) -> dict[str, list[str]]:
    """Per stack, the mode of each layer under ``cfg.finetune``."""
    ft = cfg.finetune
    gated = {"spottune_block": "block", "spottune": "component", "spottune_res": "res"}
    modes: dict[str, list[str]] = {}
    for stack, depth in cfg.depths.items():
        if ft.name in gated:
            modes[stack] = [gated[ft.name]] * depth
        elif ft.name == "last_k":
            modes[stack] = ["train" if j >= depth - ft.k else "frozen" for j in range(depth)]
        else:
            modes[stack] = ["frozen" if ft.name == "frozen" else "train"] * depth
    return modes


def _model_cost(cfg: ModelConfig, n_t: int, n_r: int, head_out: int, embeddings_train: bool) -> _Tally:
    """Encoder (layers per :func:`_layer_modes`) + pooler + an MLP head Linear(H, 2H), Linear(2H, out)
    that reads the pooled [CLS] only."""
    t, h = _Tally(), cfg.hidden_size
    # Regions reach the [CLS] only through the cross layers, and not out of the last one.
    regions_live = cfg.x_layers > 0
    # region embeddings read data: no input gradient (token embeddings are lookups: no FLOPs)
    t.linear(2 * n_r * cfg.visual_feat_dim * h, embeddings_train, False, live=regions_live)
    t.linear(2 * n_r * cfg.visual_pos_dim * h, embeddings_train, False, live=regions_live)
    g_l = g_v = embeddings_train
    modes = _layer_modes(cfg)
    for stack in ("lang", "visn", "cross"):
        for j, mode in enumerate(modes[stack]):
            visn_live = regions_live and not (stack == "cross" and j == cfg.x_layers - 1)
            g_l, g_v = _layer_cost(t, cfg, stack, mode, n_t, n_r, g_l, g_v, visn_live)
    t.linear(2 * h * h, True, g_l)  # the pooler always trains
    t.linear(2 * h * 2 * h, True, True)
    t.linear(2 * 2 * h * head_out, True, True)
    return t


def finetune_cost(cfg: ModelConfig, n_tokens: int = 20, n_regions: int = 36) -> FinetuneCost:
    """FLOPs per sample and parameters of ``cfg.finetune`` applied to ``cfg``'s model (with its VQA head).

    Every layer is counted as running (LayerDrop is not modelled here: a config with it raises).
    For ``standard`` the forward equals :func:`flops_per_sample`; the backward is slightly under its
    2x convention (the region-feature projections need no input gradient). Tested against
    ``torch.utils.flop_counter`` for every strategy, forward and backward.
    """
    from models.finetune.policy import policy_config
    from models.finetune.spottune import GRANULARITY, decision_count

    if cfg.layerdrop.mode != "none":
        raise ValueError("finetune_cost counts every layer; it does not model LayerDrop (layerdrop.mode=none)")
    ft = cfg.finetune
    spottune = ft.name in GRANULARITY
    embeddings_train = ft.name == "standard" or ft.train_embeddings
    main = _model_cost(cfg, n_tokens, n_regions, cfg.num_answers, embeddings_train)
    parts = _param_parts(cfg)
    layers = {stack: parts[stack] * depth for stack, depth in cfg.depths.items()}
    trainable = parts["pooler"] + parts["head"] + (parts["embeddings"] if embeddings_train else 0)
    frozen = 0 if embeddings_train else parts["embeddings"]
    decisions, policy_fwd, policy_bwd, policy_params = 0, 0.0, 0.0, 0
    if spottune:
        trainable += sum(layers.values())
        frozen += sum(layers.values())
        decisions = decision_count(cfg, ft.name)
        pcfg = policy_config(cfg)
        policy = _model_cost(pcfg, n_tokens, n_regions, 2 * decisions, True)
        policy_fwd, policy_bwd = policy.fwd, policy.bwd
        ph = pcfg.hidden_size
        policy_params = (count_params(pcfg, head=False)
                         + (ph * 2 * ph + 2 * ph) + 2 * (2 * ph) + (2 * ph * 2 * decisions + 2 * decisions))  # fmt: skip
    else:
        modes = _layer_modes(cfg)
        for stack, stack_modes in modes.items():
            n_train = sum(m == "train" for m in stack_modes)
            trainable += parts[stack] * n_train
            frozen += parts[stack] * (len(stack_modes) - n_train)
    eval_policy = policy_fwd if spottune and ft.eval_mode != "global" else 0.0
    return FinetuneCost(
        strategy=ft.name,
        forward=main.fwd + policy_fwd,
        backward=main.bwd + policy_bwd,
        eval_forward=main.fwd + eval_policy,
        policy_forward=policy_fwd,
        decisions=decisions,
        params_trainable=trainable,
        params_frozen=frozen,
        params_policy=policy_params,
    )
