"""Model configuration: flat, validated dataclasses.

Every leaf is a ``str``, ``int``, ``float`` or ``bool`` (lists are comma-separated strings), so a
config flattens to dotted keys (``attention.name``, ``layerdrop.n_drop``, ``hidden_size``) that
round-trip through MLflow params and ``key=value`` command-line overrides::

    cfg = lxmert_base()
    cfg = apply_overrides(cfg, ["attention.name=entmax", "layerdrop.mode=fixed"])
    flat = to_flat_dict(cfg)          # {"hidden_size": 768, "attention.name": "entmax", ...}
    assert from_flat_dict(flat) == cfg

Validation runs in ``__post_init__`` (and again in :func:`models.build_model`); every error names the
offending field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Stacks of the encoder, in the order they run.
STACKS: tuple[str, ...] = ("lang", "visn", "cross")
#: The attention modules of a cross-modality layer, as ``<stack>/<attention>`` names.
CROSS_ATTENTIONS: tuple[str, ...] = ("cross/cross", "cross/lang_self", "cross/visn_self")
#: The attention streams of a fusion layer built from a flow (``models.flow``; not single_stream,
#: whose one attention serves both modalities): the language queries' or the vision queries'.
FLOW_ATTENTIONS: tuple[str, ...] = ("cross/lang", "cross/visn")
#: Everything ``attention.stacks`` accepts: a whole stack, or one attention kind of the x-layers.
ATTENTION_SITES: tuple[str, ...] = STACKS + CROSS_ATTENTIONS + FLOW_ATTENTIONS

LAYERDROP_MODES: tuple[str, ...] = ("none", "prob", "fixed")
LAYERDROP_EVAL: tuple[str, ...] = ("all", "every_other")
ALPHA_MODES: tuple[str, ...] = ("learned", "entmax15", "sparsemax")

FINETUNE_EVAL_MODES: tuple[str, ...] = ("argmax", "sample", "global")
TEMPERATURE_SCHEDULES: tuple[str, ...] = ("fixed", "exp", "linear")
TEMPERATURE_UNITS: tuple[str, ...] = ("epoch", "step")
POLICY_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
POLICY_INITS: tuple[str, ...] = ("copy", "random")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def split_list(value: str) -> list[str]:
    """Split a comma-separated config string into its non-empty, stripped items."""
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass
class AttentionConfig:
    """Which attention normaliser runs where, and its hyper-parameters.

    Attributes:
        name: Registry key of the normaliser (``softmax | span | entmax | span_entmax``; see
            :data:`models.attention.ATTENTION_REGISTRY`).
        stacks: Comma-separated sites that use ``name``; every other attention uses softmax.
            ``lang`` / ``visn``: self-attention of the language / vision ("r") layers; ``cross``: all
            three attentions of the cross-modality layers; ``cross/cross``, ``cross/lang_self``,
            ``cross/visn_self``: only that attention of the cross-modality layers (e.g. span only in
            the cross-attention: ``stacks=cross/cross``); ``cross/lang``, ``cross/visn``: the
            language or vision queries' attention of a fusion layer built from a flow (``merged``,
            ``co_attention``, ``asymmetric_*``; ``single_stream`` has one attention: ``cross``).
        span_max_lang: S_max (tokens) of span heads whose keys are text tokens.
        span_max_visn: S_max of span heads whose keys are regions.
        span_max_cross: S_max of the shared cross-attention (text queries vs region keys and back).
        span_ramp: Ramp length R of the soft span mask (32 in the original adaptive-span code; at 20
            tokens / 36 regions a ramp of 32 can never zero a key, so small models want 2-8).
        span_init: Initial z in [0, 1] (1.0: the full span, i.e. the model starts as softmax, which
            suits fine-tuning pretrained softmax weights).
        span_penalty: Coefficient of the span penalty ``coeff * S_max * mean(z)`` (``aux_loss()``).
        alpha_mode: ``learned`` (alpha per head = clamp(1 + sigmoid(w), alpha_min, alpha_max),
            recomputed in every forward), ``entmax15`` (fixed 1.5) or ``sparsemax`` (fixed 2).
        alpha_init: Initial learned alpha, in (alpha_min, alpha_max).
        alpha_min: Lower clamp of learned alpha (> 1: entmax's gradient blows up as alpha -> 1).
        alpha_max: Upper clamp of learned alpha (<= 2).
        entmax_iters: Maximum Newton iterations of the learned-alpha entmax solver.
        entmax_tol: Stop when every row's ``|sum(p) - 1|`` is below this (before renormalising).
    """

    name: str = "softmax"
    stacks: str = "lang,visn,cross"
    span_max_lang: int = 20
    span_max_visn: int = 36
    span_max_cross: int = 36
    span_ramp: int = 32
    span_init: float = 1.0
    span_penalty: float = 2e-6
    alpha_mode: str = "learned"
    alpha_init: float = 1.5
    alpha_min: float = 1.01
    alpha_max: float = 2.0
    entmax_iters: int = 30
    entmax_tol: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        from models.attention.registry import ATTENTION_REGISTRY  # late: the registry imports configs

        if self.name not in ATTENTION_REGISTRY:
            raise ConfigError(
                f"attention.name={self.name!r} is not a registered attention; valid: {sorted(ATTENTION_REGISTRY)}"
            )
        sites = split_list(self.stacks)
        bad = [s for s in sites if s not in ATTENTION_SITES]
        if bad:
            raise ConfigError(f"attention.stacks has unknown stack(s) {bad}; valid: {list(ATTENTION_SITES)}")
        for key in ("span_max_lang", "span_max_visn", "span_max_cross", "span_ramp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"attention.{key}={getattr(self, key)} must be >= 1")
        if not 0.0 <= self.span_init <= 1.0:
            raise ConfigError(f"attention.span_init={self.span_init} must lie in [0, 1]")
        if self.span_penalty < 0:
            raise ConfigError(f"attention.span_penalty={self.span_penalty} must be >= 0")
        if self.alpha_mode not in ALPHA_MODES:
            raise ConfigError(f"attention.alpha_mode={self.alpha_mode!r}; valid: {list(ALPHA_MODES)}")
        if not 1.0 < self.alpha_min < self.alpha_max <= 2.0:
            raise ConfigError(
                f"attention.alpha_min={self.alpha_min}, alpha_max={self.alpha_max}: need 1 < alpha_min < alpha_max <= 2"
            )
        if not self.alpha_min <= self.alpha_init <= self.alpha_max or self.alpha_init >= 2.0:
            raise ConfigError(
                f"attention.alpha_init={self.alpha_init} must lie in [alpha_min, alpha_max] and below 2 "
                "(alpha = 1 + sigmoid(w) reaches 2 only as w -> inf)"
            )
        if self.entmax_iters < 1:
            raise ConfigError(f"attention.entmax_iters={self.entmax_iters} must be >= 1")
        if not 0.0 < self.entmax_tol < 1.0:
            raise ConfigError(f"attention.entmax_tol={self.entmax_tol} must lie in (0, 1)")

    def uses(self, stack: str, attention: str) -> bool:
        """Whether the attention ``attention`` (``self | cross | lang_self | visn_self``) of ``stack``
        uses :attr:`name` (else softmax)."""
        sites = split_list(self.stacks)
        return stack in sites or f"{stack}/{attention}" in sites


@dataclass
class LayerDropConfig:
    """Structured depth dropout (Fan et al. 2019, https://arxiv.org/abs/1909.11556).

    Attributes:
        mode: ``none``; ``prob``: in training each layer of the named stacks is skipped independently
            with probability ``p`` (fairseq); ``fixed``: in training exactly ``n_drop`` layers per named
            stack are skipped, drawn without replacement (the paper's "p=1").
        p: Drop probability per layer for ``mode=prob``.
        n_drop: Layers dropped per stack per training forward for ``mode=fixed``.
        stacks: Comma-separated stacks (``lang,visn,cross``) LayerDrop applies to.
        eval: What runs outside training: ``all`` layers, or ``every_other`` (layers 0, 2, 4, ... of
            the named stacks: the pruned keep-list). Evaluation never drops at random.
        seed: Seed of the drop decisions. Decision ``k`` (the k-th training forward) depends only on
            ``(seed, k)``, never on torch's global RNG, so every DDP rank drops the same layers.
    """

    mode: str = "none"
    p: float = 0.0
    n_drop: int = 1
    stacks: str = "lang,visn,cross"
    eval: str = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        if self.mode not in LAYERDROP_MODES:
            raise ConfigError(f"layerdrop.mode={self.mode!r}; valid: {list(LAYERDROP_MODES)}")
        if self.eval not in LAYERDROP_EVAL:
            raise ConfigError(f"layerdrop.eval={self.eval!r}; valid: {list(LAYERDROP_EVAL)}")
        if not 0.0 <= self.p < 1.0:
            raise ConfigError(f"layerdrop.p={self.p} must lie in [0, 1)")
        if self.mode == "prob" and self.p == 0.0:
            raise ConfigError("layerdrop.mode=prob needs layerdrop.p > 0")
        if self.n_drop < 0:
            raise ConfigError(f"layerdrop.n_drop={self.n_drop} must be >= 0")
        bad = [s for s in split_list(self.stacks) if s not in STACKS]
        if bad:
            raise ConfigError(f"layerdrop.stacks has unknown stack(s) {bad}; valid: {list(STACKS)}")

    def stack_list(self) -> list[str]:
        """The stacks LayerDrop applies to."""
        return split_list(self.stacks)


@dataclass
class FinetuneConfig:
    """How the encoder is fine-tuned: which parts train, and for SpotTune the policy that picks them.

    Strategies (:data:`models.finetune.FINETUNE_REGISTRY`; see ``docs/finetuning.md``): ``standard``
    (everything trains), ``frozen`` (the encoder layers are frozen), ``last_k`` (the top ``k`` layers
    of each stack train), and SpotTune (Guo et al. 2019, https://arxiv.org/abs/1811.08737) with one
    decision per layer (``spottune_block``), per component (``spottune``: each attention head, each
    attention output, each feed-forward part) or per residual segment (``spottune_res``): a policy
    network picks, per sample and unit, the fine-tuned or the frozen pretrained copy.

    Attributes:
        name: Registry key of the strategy.
        k: Top layers per stack that train under ``last_k`` (every stack must have at least ``k``).
        train_embeddings: Whether the text and region embeddings train under ``frozen``, ``last_k``
            and SpotTune (the reference code trains them; the pooler always trains, ``standard``
            trains everything).
        policy_l_layers: Language layers of the policy network (a small LXMERT).
        policy_x_layers: Cross-modality layers of the policy network.
        policy_r_layers: Vision layers of the policy network.
        policy_hidden: Width of the policy network (0: the encoder's ``hidden_size``).
        policy_heads: Attention heads of the policy network (0: the encoder's ``num_heads``).
        policy_init: ``copy``: the policy starts from the pretrained encoder's embeddings, first
            layers and pooler (needs ``policy_hidden`` equal to the encoder's); ``random``: BERT init.
        temperature: Gumbel-Softmax temperature at the start (5 in the reference code).
        temperature_schedule: ``fixed``; ``exp``: ``max(temperature_min, temperature * decay ** t)``;
            ``linear``: ``max(temperature_min, temperature - decay * t)``, with ``t`` counted in
            ``temperature_unit``.
        temperature_min: Floor of the annealed temperature.
        temperature_decay: Factor (``exp``) or decrement (``linear``) per unit of ``t``.
        temperature_unit: ``epoch`` or ``step``: what ``t`` counts.
        eval_mode: Decisions outside training: ``argmax`` (deterministic), ``sample`` (Gumbel noise),
            ``global`` (one fixed policy: the units that more than half of the current epoch's
            training samples used).
        policy_optimizer: ``sgd | adam | adamw``: the policy's own optimiser.
        policy_lr: Its learning rate (1e-4 with SGD in the reference code).
        policy_momentum: SGD momentum of the policy (0 in the reference code).
        constrain_k: Target K of the constrain-k loss ``scale * (sum over units of usage - K) ** 2``,
            usage being a unit's batch mean of fine-tuned decisions.
        constrain_scale: Its scale (0: off).
        entropy_weight: Weight of the mean binary entropy of the units' usage (0: off; > 0 pushes
            each unit towards always or never fine-tuned, i.e. towards a global policy).
    """

    name: str = "standard"
    k: int = 1
    train_embeddings: bool = True
    policy_l_layers: int = 2
    policy_x_layers: int = 1
    policy_r_layers: int = 1
    policy_hidden: int = 0
    policy_heads: int = 0
    policy_init: str = "copy"
    temperature: float = 5.0
    temperature_schedule: str = "fixed"
    temperature_min: float = 0.5
    temperature_decay: float = 1.0
    temperature_unit: str = "epoch"
    eval_mode: str = "argmax"
    policy_optimizer: str = "sgd"
    policy_lr: float = 1e-4
    policy_momentum: float = 0.0
    constrain_k: float = 0.0
    constrain_scale: float = 0.0
    entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        from models.finetune.registry import FINETUNE_REGISTRY  # late: the strategies import configs

        if self.name not in FINETUNE_REGISTRY:
            raise ConfigError(
                f"finetune.name={self.name!r} is not a registered fine-tuning strategy; "
                f"valid: {sorted(FINETUNE_REGISTRY)}"
            )
        if self.k < 1:
            raise ConfigError(f"finetune.k={self.k} must be >= 1 (k=0 is finetune.name=frozen)")
        for key in ("policy_l_layers", "policy_x_layers", "policy_r_layers", "policy_hidden", "policy_heads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"finetune.{key}={getattr(self, key)} must be >= 0")
        if self.policy_l_layers + self.policy_x_layers == 0:
            raise ConfigError(
                "finetune.policy_l_layers and finetune.policy_x_layers are both 0: the policy's [CLS] would "
                "never see the question (and with policy_x_layers=0 never the regions)"
            )
        if self.policy_hidden and self.policy_heads and self.policy_hidden % self.policy_heads:
            raise ConfigError(
                f"finetune.policy_hidden={self.policy_hidden} is not divisible by "
                f"finetune.policy_heads={self.policy_heads}"
            )
        choices = (("policy_init", POLICY_INITS), ("temperature_schedule", TEMPERATURE_SCHEDULES),
                   ("temperature_unit", TEMPERATURE_UNITS), ("eval_mode", FINETUNE_EVAL_MODES),
                   ("policy_optimizer", POLICY_OPTIMIZERS))  # fmt: skip
        for key, valid in choices:
            if getattr(self, key) not in valid:
                raise ConfigError(f"finetune.{key}={getattr(self, key)!r}; valid: {list(valid)}")
        if not self.temperature > 0:
            raise ConfigError(f"finetune.temperature={self.temperature} must be > 0")
        if not 0 < self.temperature_min <= self.temperature:
            raise ConfigError(
                f"finetune.temperature_min={self.temperature_min} must lie in (0, temperature={self.temperature}]"
            )
        if self.temperature_schedule == "exp" and not 0 < self.temperature_decay <= 1:
            raise ConfigError(
                f"finetune.temperature_decay={self.temperature_decay} must lie in (0, 1] for the exp schedule"
            )
        if self.temperature_schedule == "linear" and self.temperature_decay < 0:
            raise ConfigError(
                f"finetune.temperature_decay={self.temperature_decay} must be >= 0 for the linear schedule"
            )
        if not self.policy_lr > 0:
            raise ConfigError(f"finetune.policy_lr={self.policy_lr} must be > 0")
        if not 0 <= self.policy_momentum < 1:
            raise ConfigError(f"finetune.policy_momentum={self.policy_momentum} must lie in [0, 1)")
        for key in ("constrain_k", "constrain_scale", "entropy_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"finetune.{key}={getattr(self, key)} must be >= 0")

    def temperature_at(self, epoch: int, step: int) -> float:
        """The Gumbel-Softmax temperature at ``epoch`` (0-based) and global ``step`` (0-based)."""
        t = epoch if self.temperature_unit == "epoch" else step
        if self.temperature_schedule == "exp":
            return max(self.temperature_min, self.temperature * self.temperature_decay**t)
        if self.temperature_schedule == "linear":
            return max(self.temperature_min, self.temperature - self.temperature_decay * t)
        return self.temperature


@dataclass
class ModelConfig:
    """An LXMERT-style encoder with a VQA head (Tan & Bansal 2019, https://arxiv.org/abs/1908.07490).

    Defaults are LXMERT base (9 language, 5 vision, 5 cross-modality layers; hidden 768, 12 heads;
    3,129 VQA answers): 213.9M parameters.

    Attributes:
        vocab_size: WordPiece vocabulary (bert-base-uncased: 30,522).
        hidden_size: Width H of every layer.
        num_heads: Attention heads; must divide ``hidden_size``.
        intermediate_size: Feed-forward width (4H in LXMERT).
        l_layers: Language self-attention layers.
        x_layers: Cross-modality layers.
        r_layers: Vision ("relation") self-attention layers.
        visual_feat_dim: Region feature size F (2,048 for Faster R-CNN features).
        visual_pos_dim: Box size (4: x1, y1, x2, y2 in [0, 1]).
        max_position_embeddings: Learned text positions.
        type_vocab_size: Segment ids.
        num_answers: VQA answer classes A.
        hidden_dropout: Dropout after embeddings, attention output and feed-forward.
        attention_dropout: Dropout on attention probabilities.
        layer_norm_eps: LayerNorm epsilon (1e-12 in LXMERT).
        initializer_range: Std of the normal initialisation of linear and embedding weights.
        attention: Attention normaliser per site.
        layerdrop: LayerDrop semantics.
        finetune: Fine-tuning strategy (``standard``: every parameter trains).
        flow: What the ``x_layers`` fusion layers are (:mod:`models.flow`): ``modality_specific``
            (LXMERT's cross layers), ``merged``, ``single_stream``, ``co_attention``,
            ``asymmetric_lang``, ``asymmetric_visn`` or ``mixed``.
        flow_merged_from: With ``flow=mixed``: the first ``flow_merged_from`` fusion layers are
            LXMERT cross layers, the rest merged (0 <= it <= x_layers); 0 for every other flow.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    l_layers: int = 9
    x_layers: int = 5
    r_layers: int = 5
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    num_answers: int = 3129
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    layerdrop: LayerDropConfig = field(default_factory=LayerDropConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    flow: str = "modality_specific"
    flow_merged_from: int = 0

    def __post_init__(self) -> None:
        # Accept plain dicts for the nested configs (e.g. from YAML or a flat-dict round trip).
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig(**self.attention)
        if isinstance(self.layerdrop, dict):
            self.layerdrop = LayerDropConfig(**self.layerdrop)
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        self.validate()

    @property
    def depths(self) -> dict[str, int]:
        """Layers per stack: ``{"lang": l_layers, "visn": r_layers, "cross": x_layers}``."""
        return {"lang": self.l_layers, "visn": self.r_layers, "cross": self.x_layers}

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field (nested configs included)."""
        positive = (
            "vocab_size", "hidden_size", "num_heads", "intermediate_size", "visual_feat_dim",
            "visual_pos_dim", "max_position_embeddings", "type_vocab_size", "num_answers",
        )  # fmt: skip
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        for key in ("l_layers", "x_layers", "r_layers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 0")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key}={getattr(self, key)} must lie in [0, 1)")
        self.attention.validate()
        self.layerdrop.validate()
        self._validate_flow()
        if self.layerdrop.mode == "fixed":
            for stack in self.layerdrop.stack_list():
                depth = self.depths[stack]
                if self.layerdrop.n_drop >= depth:
                    raise ConfigError(
                        f"layerdrop.n_drop={self.layerdrop.n_drop} must be smaller than the number of "
                        f"layers in stack {stack!r} ({depth}); drop fewer layers or remove {stack!r} "
                        "from layerdrop.stacks"
                    )
        self._validate_finetune()

    def _validate_finetune(self) -> None:
        """The checks of ``finetune`` that need the encoder's shape."""
        ft = self.finetune
        ft.validate()
        if ft.name == "last_k":
            for stack, depth in self.depths.items():
                if ft.k > depth:
                    raise ConfigError(
                        f"finetune.k={ft.k} exceeds the {depth} layer(s) of stack {stack!r}: last_k trains the top "
                        "k layers of every stack"
                    )
        if not ft.name.startswith("spottune"):
            return
        hidden = ft.policy_hidden or self.hidden_size
        heads = ft.policy_heads or self.num_heads
        if hidden % heads:
            raise ConfigError(
                f"the policy network's width {hidden} (finetune.policy_hidden) is not divisible by its "
                f"{heads} heads (finetune.policy_heads)"
            )
        if ft.policy_init == "copy":
            if hidden != self.hidden_size or heads != self.num_heads:
                raise ConfigError(
                    f"finetune.policy_init=copy needs the policy as wide as the encoder (hidden_size={self.hidden_size}, "
                    f"num_heads={self.num_heads}); got policy_hidden={hidden}, policy_heads={heads}: "
                    "set finetune.policy_init=random"
                )
            for key, stack in (("policy_l_layers", "lang"), ("policy_r_layers", "visn"), ("policy_x_layers", "cross")):
                if getattr(ft, key) > self.depths[stack]:
                    raise ConfigError(
                        f"finetune.{key}={getattr(ft, key)} exceeds the encoder's {self.depths[stack]} {stack} layer(s) "
                        "that finetune.policy_init=copy copies from; set finetune.policy_init=random"
                    )

    def _validate_flow(self) -> None:
        from models.flow import CROSS, FLOW_LAYERS, FLOWS, layer_kinds  # late: models.flow imports attention

        if self.flow not in FLOWS:
            raise ConfigError(f"flow={self.flow!r} is not a registered attention flow; valid: {list(FLOWS)}")
        if self.flow == "mixed":
            if not 0 <= self.flow_merged_from <= self.x_layers:
                raise ConfigError(
                    f"flow_merged_from={self.flow_merged_from} must lie in [0, x_layers={self.x_layers}] "
                    "(the index of the first merged fusion layer)"
                )
        elif self.flow_merged_from != 0:
            raise ConfigError(f"flow_merged_from={self.flow_merged_from} applies to flow=mixed only (flow={self.flow!r})")
        if not self.x_layers:
            return
        kinds = set(layer_kinds(self.flow, self.x_layers, self.flow_merged_from))
        sites = split_list(self.attention.stacks)
        if CROSS not in kinds:
            bad = [s for s in sites if s in CROSS_ATTENTIONS]
            if bad:
                raise ConfigError(
                    f"attention.stacks names {bad}, attentions of LXMERT's cross layers, but flow={self.flow!r} "
                    f"has none; use cross (all fusion-layer attentions) or {list(FLOW_ATTENTIONS)}"
                )
        if not any(k in FLOW_LAYERS and not FLOW_LAYERS[k].shared for k in kinds):
            bad = [s for s in sites if s in FLOW_ATTENTIONS]
            if bad:
                raise ConfigError(
                    f"attention.stacks names {bad}, per-modality attentions of a flow layer, but flow={self.flow!r} "
                    "has none; use cross" + (f" or {list(CROSS_ATTENTIONS)}" if CROSS in kinds else "")
                )


# --------------------------------------------------------------------------------------------------
# Flat dotted keys <-> nested dataclasses


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Flatten a (nested) config dataclass to ``{"dotted.key": leaf}``."""
    out: dict[str, str | int | float | bool] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value, prefix=f"{key}."))
        else:
            out[key] = value
    return out


def _coerce(value: Any, like: Any, key: str) -> Any:
    """Convert ``value`` (often a string from the command line or MLflow) to the type of ``like``."""
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} is not a boolean")
    try:
        if isinstance(like, int):
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if isinstance(like, float):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a {type(like).__name__}") from None
    return str(value)


def _replace(cfg: Any, updates: dict[str, Any], prefix: str = "") -> Any:
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid: {sorted(to_flat_dict(cfg, prefix))}")
        current = getattr(cfg, head)
        if rest:
            if not dataclasses.is_dataclass(current):
                raise ConfigError(f"config key '{prefix}{key}': {prefix}{head} is not a section")
            nested.setdefault(head, {})[rest] = value
        elif dataclasses.is_dataclass(current):
            raise ConfigError(f"config key '{prefix}{key}' is a section; set {prefix}{key}.<field>")
        else:
            direct[head] = _coerce(value, current, prefix + key)
    for head, sub in nested.items():
        direct[head] = _replace(getattr(cfg, head), sub, prefix=f"{prefix}{head}.")
    return dataclasses.replace(cfg, **direct)


def from_flat_dict(flat: dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from dotted keys (values may be strings, as MLflow returns them)."""
    return _replace(base if base is not None else ModelConfig(), dict(flat))


def apply_overrides(cfg: ModelConfig, overrides: list[str] | dict[str, Any]) -> ModelConfig:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (validated)."""
    if isinstance(overrides, dict):
        return _replace(cfg, overrides)
    updates: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        updates[key.strip()] = value.strip()
    return _replace(cfg, updates)
