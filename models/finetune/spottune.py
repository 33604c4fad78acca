"""SpotTune for LXMERT: the encoder with gated units, a policy network, and the three unit granularities.

Decisions are laid out in the order the encoder runs: language layers, vision layers, cross layers.

* ``spottune_block``: one per layer; a cross layer's decision is shared by both streams
  (LXMERT 9-5-5: 9 + 5 + 5 = 19).
* ``spottune`` (per component): per attention sub-layer one per head and one for its output part;
  per feed-forward one for the intermediate part and one for the output part. A single-stream layer
  has ``heads + 3``; a cross layer has three attention sub-layers (the shared cross-attention, whose
  decisions serve both directions, and a self-attention per stream) and two feed-forwards:
  ``3 * (heads + 1) + 4`` (12 heads: 15 and 43; LXMERT 9-5-5: 14 * 15 + 5 * 43 = 425).
* ``spottune_res`` (per residual segment): one per attention sub-layer and one per feed-forward; a
  cross layer's cross-attention has one per stream (2 per single-stream layer, 6 per cross layer;
  LXMERT 9-5-5: 14 * 2 + 5 * 6 = 58).

:func:`models.finetune.decision_count` gives these numbers from a config without building anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.config import FinetuneConfig, ModelConfig
from models.finetune.gates import DecisionBoard, GatedFeedForward, GatedHeads, GatedModule, GatedUnit
from models.finetune.plan import FinetunePlan, trainable_group
from models.finetune.policy import PolicyNetwork, SpotTunePolicy, policy_config
from models.lxmert import LxmertModel, LxmertOutput

#: Attention sub-layers and feed-forwards of a cross layer, in run order (the cross-attention first).
CROSS_ATTENTIONS = ("cross_att", "lang_self_att", "visn_self_att")
CROSS_FFNS = ("lang_ffn", "visn_ffn")


def _site(stack: str, layer: int, part: str) -> str:
    """``lang``, 3, ``self_att`` -> ``lang/3/self`` (the names :func:`models.hooks.site_of` gives)."""
    return f"{stack}/{layer}/{part.removesuffix('_att')}"


def _stacks(lxmert: LxmertModel) -> list[tuple[str, nn.ModuleList]]:
    enc = lxmert.encoder
    return [("lang", enc.lang_layers), ("visn", enc.visn_layers), ("cross", enc.cross_layers)]


def _gate_blocks(lxmert: LxmertModel, board: DecisionBoard) -> list[str]:
    """One :class:`GatedModule` per layer; returns the decision names."""
    names: list[str] = []
    for stack, layers in _stacks(lxmert):
        for i in range(len(layers)):
            layers[i] = GatedModule(layers[i], board, len(names), [""])
            names.append(f"{stack}/{i}/layer")
    return names


def _gate_residual(lxmert: LxmertModel, board: DecisionBoard) -> list[str]:
    """One :class:`GatedModule` per attention / feed-forward sub-layer (two for a cross-attention)."""
    names: list[str] = []
    for stack, layers in _stacks(lxmert):
        for i, layer in enumerate(layers):
            parts = ("self_att", "ffn") if stack != "cross" else CROSS_ATTENTIONS + CROSS_FFNS
            for part in parts:
                streams = ["lang", "visn"] if part == "cross_att" else [""]
                setattr(layer, part, GatedModule(getattr(layer, part), board, len(names), streams))
                names += [f"{_site(stack, i, part)}/{s}".rstrip("/") for s in streams]
    return names


def _gate_components(lxmert: LxmertModel, board: DecisionBoard) -> list[str]:
    """Per-head + output decisions per attention sub-layer, intermediate + output per feed-forward."""
    names: list[str] = []
    for stack, layers in _stacks(lxmert):
        for i, layer in enumerate(layers):
            attentions, ffns = (("self_att",), ("ffn",)) if stack != "cross" else (CROSS_ATTENTIONS, CROSS_FFNS)
            for part in attentions:
                gate = GatedHeads(getattr(layer, part), board, len(names))
                setattr(layer, part, gate)
                names += [f"{_site(stack, i, part)}/{n}" for n in gate.decision_names]
            for part in ffns:
                gate = GatedFeedForward(getattr(layer, part), board, len(names))
                setattr(layer, part, gate)
                names += [f"{_site(stack, i, part)}/{n}" for n in gate.decision_names]
    return names


#: Strategy name -> the function that puts its gated units into the encoder.
GRANULARITY: dict[str, Callable[[LxmertModel, DecisionBoard], list[str]]] = {
    "spottune_block": _gate_blocks,
    "spottune": _gate_components,
    "spottune_res": _gate_residual,
}


class SpotTuneEncoder(nn.Module):
    """The encoder with gated units and its policy: call it as the :class:`LxmertModel` it wraps.

    Each forward runs the policy on the same inputs, draws one decision per unit and sample, and runs
    the encoder, whose gated units read their decisions from the shared board.

    Args:
        lxmert: The encoder, its units already gated (built by the ``spottune*`` strategies).
        policy: The :class:`SpotTunePolicy`.
        board: The decisions shared with the units.
        decision_names: One name per decision, e.g. ``lang/3/self/head5``, ``cross/0/cross/lang``,
            ``visn/2/layer`` (the column names of :attr:`last_decisions`).

    Attributes (passed through to the wrapped model): ``config``, ``embeddings``,
    ``visual_embeddings``, ``encoder``, ``pooler``, ``layers_ran``.
    """

    def __init__(self, lxmert: LxmertModel, policy: SpotTunePolicy, board: DecisionBoard,
                 decision_names: list[str]):  # fmt: skip
        super().__init__()
        self.lxmert = lxmert
        self.policy = policy
        self.board = board
        self.decision_names = list(decision_names)

    # -- the wrapped model's attributes, so task code can use either --------------------------------
    @property
    def config(self) -> ModelConfig:
        return self.lxmert.config

    @property
    def embeddings(self) -> nn.Module:
        return self.lxmert.embeddings

    @property
    def visual_embeddings(self) -> nn.Module:
        return self.lxmert.visual_embeddings

    @property
    def encoder(self) -> nn.Module:
        return self.lxmert.encoder

    @property
    def pooler(self) -> nn.Module:
        return self.lxmert.pooler

    @property
    def layers_ran(self) -> dict[str, list[int]]:
        return self.lxmert.encoder.layers_ran

    # -- decisions ----------------------------------------------------------------------------------
    def units(self) -> list[GatedUnit]:
        """The gated units, in decision order."""
        return sorted((m for m in self.lxmert.modules() if isinstance(m, GatedUnit)), key=lambda u: u.start)

    def global_decisions(self) -> Tensor:
        """(D,) the ``global`` policy: 1 for the units that more than half the counted training samples
        fine-tuned. Raises if no training sample was counted since the last :meth:`reset_usage`."""
        units = self.units()
        if all(int(u.train_seen) == 0 for u in units):
            raise RuntimeError(
                "finetune.eval_mode=global needs the decisions of the current epoch's training samples, and none "
                "were counted since the last reset_usage(): train first, or evaluate with eval_mode=argmax"
            )
        return torch.cat([u.global_decisions() for u in units])

    @property
    def last_decisions(self) -> Tensor | None:
        """(B, D) decisions of the last forward (1 = fine-tuned; columns :attr:`decision_names`)."""
        return self.policy.last

    def force(self, decisions: str | Tensor | None) -> None:
        """Bypass the policy: ``"finetuned"``, ``"frozen"``, 0/1 decisions (D,) for every sample or (B, D)
        per sample, or None to use the policy again. (Tests and diagnostics: with forced decisions the
        policy gets no gradient.)"""
        if decisions is None:
            self.policy.forced = None
            return
        if isinstance(decisions, str):
            if decisions not in ("finetuned", "frozen"):
                raise ValueError(f"force({decisions!r}): use 'finetuned', 'frozen', a 0/1 tensor or None")
            decisions = torch.full((self.board.size,), 1.0 if decisions == "finetuned" else 0.0)
        if decisions.shape[-1:] != (self.board.size,) or decisions.dim() > 2:
            raise ValueError(f"force(): expected (D,) or (B, D) decisions with D={self.board.size}, "
                             f"got {tuple(decisions.shape)}")  # fmt: skip
        if not bool(((decisions == 0) | (decisions == 1)).all()):
            raise ValueError("force(): decisions must be 0 (frozen) or 1 (fine-tuned)")
        self.policy.forced = decisions.float()

    def _branch_state_dict(self, keep: str) -> dict[str, Tensor]:
        drop = "frozen" if keep == "finetuned" else "finetuned"
        counters = ("train_used", "train_seen", "eval_used", "eval_seen")
        out: dict[str, Tensor] = {}
        for key, value in self.lxmert.state_dict().items():
            parts = key.split(".")
            if drop in parts or parts[-1] in counters:
                continue
            out[".".join(p for p in parts if p != keep)] = value
        return out

    def finetuned_state_dict(self) -> dict[str, Tensor]:
        """The state dict of a plain :class:`LxmertModel` holding the fine-tuned copies (what every
        decision at "fine-tuned" computes): load it into ``backbone(cfg)`` to export or compare."""
        return self._branch_state_dict("finetuned")

    def frozen_state_dict(self) -> dict[str, Tensor]:
        """The same with the frozen copies: the pretrained encoder as it was when the plan was built
        (up to the embeddings and pooler, which train unless ``finetune.train_embeddings=false``)."""
        return self._branch_state_dict("frozen")

    def reset_usage(self) -> None:
        """Zero the usage counts of every unit and the policy's entropy accumulators."""
        for unit in self.units():
            unit.reset_usage()
        self.policy.reset_usage()

    def usage(self, split: str = "train") -> Tensor:
        """(D,) share of counted samples that fine-tuned each unit (``train`` or ``eval`` forwards)."""
        return torch.cat([u.usage(split) for u in self.units()])

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        output_attentions: bool = False,
    ) -> LxmertOutput:
        """As :meth:`LxmertModel.forward`; :attr:`last_decisions` holds the decisions it used."""
        if visual_feats is None or visual_pos is None:
            raise ValueError("visual_feats and visual_pos are required")
        inputs = (input_ids, attention_mask, token_type_ids, visual_feats, visual_pos, visual_attention_mask)
        self.board.current = self.policy.decide(inputs, input_ids.shape[0], self.global_decisions)
        try:
            return self.lxmert(*inputs, output_attentions)
        finally:
            self.board.current = None  # the units read it only inside this forward; do not hold the graph


def spottune_plan(encoder: LxmertModel, cfg: FinetuneConfig, granularity: str) -> FinetunePlan:
    """Gate ``encoder``'s units at ``granularity`` and attach a policy network.

    Takes the frozen copies NOW: call it after loading the pretrained weights into ``encoder`` (which
    it modifies in place and wraps). Weights loaded later would reach the fine-tuned copies only, and
    under new names (``...lang_layers.3.finetuned.*``), so a strict load into the wrapped model fails
    instead of silently leaving the frozen copies at another initialisation.
    """
    if not isinstance(encoder, LxmertModel):
        raise TypeError(f"{granularity} gates an LxmertModel's layers; got {type(encoder).__name__}")
    model_cfg = encoder.config
    if model_cfg.finetune != cfg:
        model_cfg = dataclasses.replace(model_cfg, finetune=cfg)  # validates the policy against the encoder
    # The policy is built and copied from the pretrained encoder before any unit is gated.
    network = PolicyNetwork(policy_config(model_cfg), num_decisions=decision_count(model_cfg, granularity))
    if cfg.policy_init == "copy":
        network.copy_from(encoder)
    board = DecisionBoard(network.num_decisions)
    for p in encoder.parameters():
        p.requires_grad_(True)
    if not cfg.train_embeddings:
        for module in (encoder.embeddings, encoder.visual_embeddings):
            for p in module.parameters():
                p.requires_grad_(False)
    names = GRANULARITY[granularity](encoder, board)
    if len(names) != board.size:
        raise AssertionError(f"{granularity}: {len(names)} decision names for {board.size} policy outputs")
    policy = SpotTunePolicy(network, cfg)
    wrapped = SpotTuneEncoder(encoder, policy, board, names)
    policy_params = list(network.parameters())
    policy_ids = {id(p) for p in policy_params}
    encoder_params = [p for p in wrapped.parameters() if p.requires_grad and id(p) not in policy_ids]
    groups = [
        trainable_group("encoder", encoder_params),
        {"name": "policy", "params": policy_params,
         "optimizer": {"name": cfg.policy_optimizer, "lr": cfg.policy_lr, "momentum": cfg.policy_momentum}},
    ]  # fmt: skip
    return FinetunePlan(name=granularity, encoder=wrapped, param_groups=groups, config=cfg,
                        extra_modules={"policy": policy}, decision_names=names)  # fmt: skip


def decision_count(cfg: ModelConfig, granularity: str) -> int:
    """Decisions of a SpotTune granularity for ``cfg``'s encoder (no model built)."""
    single, cross = cfg.l_layers + cfg.r_layers, cfg.x_layers
    if granularity == "spottune_block":
        return single + cross
    if granularity == "spottune":
        return single * (cfg.num_heads + 3) + cross * (3 * (cfg.num_heads + 1) + 4)
    if granularity == "spottune_res":
        return single * 2 + cross * 6
    raise ValueError(f"{granularity!r} is not a SpotTune granularity; valid: {sorted(GRANULARITY)}")
