"""Attention flow: which queries see which keys in the fusion layers, as configuration.

LXMERT's encoder has three stacks: language self-attention layers, vision self-attention layers,
then ``x_layers`` fusion ("cross-modality") layers. ``ModelConfig.flow`` chooses what the fusion
layers are; the single-modality stacks stay as they are (with ``l_layers = r_layers = 0`` every layer
is a fusion layer, the all-layers-of-one-kind models of Hendricks et al. 2021,
https://arxiv.org/abs/2102.00529):

==================  ============================================================================
flow                fusion layer
==================  ============================================================================
modality_specific   LXMERT's cross layer (:class:`models.lxmert.CrossLayer`): a cross-attention
                    shared by both directions, then self-attention per modality; every
                    normaliser runs over ONE modality's keys (today's model, bit for bit)
merged              language and vision queries each attend over the union of both modalities'
                    keys with ONE normaliser; each modality projects its own tokens with its
                    own weights (q, k, v, output, LayerNorm, feed-forward)
single_stream       merged, with one set of weights for both modalities (UNITER / VisualBERT)
co_attention        queries see only the other modality's keys (ViLBERT's co-attention layer:
                    no within-modality attention in the layer)
asymmetric_lang     language queries attend over both modalities, vision queries only over
                    vision keys: only language takes in the image (Hendricks' "language-q")
asymmetric_visn     vision queries attend over both, language queries only over language
                    keys (Hendricks' "image-q")
mixed               the first ``flow_merged_from`` fusion layers modality_specific, the rest merged
==================  ============================================================================

All but ``modality_specific`` are one layer, :class:`FlowLayer`, built from a :class:`Flow` (data:
the key modalities of each query modality, and whether the weights are shared), in the manner of
VOLTA's per-sub-layer attention flows (Bugliarello et al. 2021, e-bug/volta): text-text,
text-vision, vision-text, vision-vision. The flow's block pattern and the padding become one
additive mask over the concatenated keys ``[lang; visn]``, so every query row is normalised once
over the keys its flow allows, by the same :class:`models.attention.MultiHeadAttention` and kernel
contract as everywhere else: softmax, span, entmax and span_entmax all work in every flow.

Adaptive span on merged keys: a query keeps the index distance ``|i - j|`` to the keys of its own
modality (as that modality's self-attention stack does) and has no distance to the other modality's
keys (:data:`models.attention.NO_DISTANCE`: never masked by the span). Distance across the modality
boundary means nothing, and one budget over the concatenation would let the text length decide how
many regions a head may see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.attention import NO_DISTANCE, KeyDistance, mask_value

#: The two modalities, in the order their keys are concatenated.
MODALITIES: tuple[str, ...] = ("lang", "visn")


@dataclass(frozen=True)
class Flow:
    """Which keys each query modality attends over in a :class:`FlowLayer`.

    Attributes:
        name: The registry name.
        lang_keys: Key modalities of the language queries (one normaliser over their union).
        visn_keys: Key modalities of the vision queries.
        shared: One set of weights (attention, LayerNorm, feed-forward, kernel) for both modalities.
    """

    name: str
    lang_keys: tuple[str, ...]
    visn_keys: tuple[str, ...]
    shared: bool = False

    def keys(self, modality: str) -> tuple[str, ...]:
        """The key modalities ``modality``'s queries attend over."""
        return self.lang_keys if modality == "lang" else self.visn_keys

    def streams(self) -> tuple[str, ...]:
        """The weight sets a layer of this flow holds: ``("shared",)`` or ``("lang", "visn")``."""
        return ("shared",) if self.shared else MODALITIES

    def stream(self, modality: str) -> str:
        """The weight set that serves ``modality``'s tokens."""
        return "shared" if self.shared else modality

    @property
    def crosses(self) -> bool:
        """Whether any query sees the other modality."""
        return "visn" in self.lang_keys or "lang" in self.visn_keys


_BOTH = ("lang", "visn")
#: The fusion layers built as a :class:`FlowLayer`, by ``ModelConfig.flow`` name.
FLOW_LAYERS: dict[str, Flow] = {
    "merged": Flow("merged", _BOTH, _BOTH),
    "single_stream": Flow("single_stream", _BOTH, _BOTH, shared=True),
    "co_attention": Flow("co_attention", ("visn",), ("lang",)),
    "asymmetric_lang": Flow("asymmetric_lang", _BOTH, ("visn",)),
    "asymmetric_visn": Flow("asymmetric_visn", ("lang",), _BOTH),
}
#: Every value ``ModelConfig.flow`` takes.
FLOWS: tuple[str, ...] = ("modality_specific", *FLOW_LAYERS, "mixed")
#: The fusion-layer kind of LXMERT's cross layer.
CROSS = "modality_specific"


def layer_kinds(flow: str, x_layers: int, merged_from: int = 0) -> list[str]:
    """The kind of each fusion layer: ``modality_specific`` or a key of :data:`FLOW_LAYERS`.

    Args:
        flow: ``ModelConfig.flow``.
        x_layers: Fusion layers.
        merged_from: ``flow_merged_from``: with ``flow=mixed``, the index of the first merged layer.
    """
    if flow == "mixed":
        return [CROSS if i < merged_from else "merged" for i in range(x_layers)]
    if flow != CROSS and flow not in FLOW_LAYERS:
        raise ValueError(f"unknown flow {flow!r}; valid: {list(FLOWS)}")
    return [flow] * x_layers


def _concat_padding(lang_mask: Tensor | None, visn_mask: Tensor | None, t: int, r: int) -> Tensor | None:
    """(B, 1, 1, T) and (B, 1, 1, R) additive masks (or None) -> (B, 1, 1, T + R) or None."""
    if lang_mask is None and visn_mask is None:
        return None
    like = lang_mask if lang_mask is not None else visn_mask
    b = like.shape[0]
    lm = lang_mask if lang_mask is not None else like.new_zeros(b, 1, 1, t)
    vm = visn_mask if visn_mask is not None else like.new_zeros(b, 1, 1, r)
    return torch.cat([lm.expand(b, 1, 1, t), vm.expand(b, 1, 1, r)], dim=-1)


class FlowLayer(nn.Module):
    """A fusion layer whose attention flow is data (:class:`Flow`).

    Each modality's tokens are projected to q, k, v by their own stream (or the one shared
    stream); the keys and values of both modalities are concatenated ``[lang; visn]``; the queries
    of modality m attend over them under one additive mask (padding + the flow's blocks), so the
    kernel normalises each query row once over the union of the keys the flow allows. Then the
    post-norm residual and the feed-forward of m's stream, as in an encoder layer.

    Args:
        flow: The flow.
        attention: Stream name -> :class:`models.lxmert.AttentionBlock`; the keys are
            ``flow.streams()`` (``lang`` and ``visn``, or ``shared``).
        ffn: Stream name -> :class:`models.lxmert.FeedForward`, the same keys.
    """

    def __init__(self, flow: Flow, attention: nn.ModuleDict, ffn: nn.ModuleDict):
        super().__init__()
        for what, modules in (("attention", attention), ("ffn", ffn)):
            if sorted(modules) != sorted(flow.streams()):
                raise ValueError(f"flow {flow.name!r} needs {what} streams {list(flow.streams())}, got {list(modules)}")
        self.flow = flow
        self.att = attention
        self.ffn = ffn
        self._layouts: dict[tuple, tuple[Tensor | None, KeyDistance]] = {}

    def layout(self, modality: str, t: int, r: int, device: torch.device, dtype: torch.dtype
               ) -> tuple[Tensor | None, KeyDistance]:  # fmt: skip
        """The flow's part of the mask and the span distances for ``modality``'s queries.

        Returns:
            ``(block, distance)``: ``block`` (1, 1, Q, T + R) additive (``mask_value`` on the keys the
            flow hides; None when it hides none); ``distance`` a :class:`KeyDistance` with ``|i - j|``
            inside the modality's own keys and no distance elsewhere.
        """
        key = (modality, t, r, device, dtype)
        if key not in self._layouts:
            n = {"lang": t, "visn": r}
            q = n[modality]
            allowed = self.flow.keys(modality)
            keep = torch.cat([torch.full((q, n[m]), m in allowed, dtype=torch.bool) for m in MODALITIES], dim=1)
            block = None if bool(keep.all()) else (~keep).to(dtype).mul(mask_value(dtype))[None, None].to(device)
            dist = torch.full((q, t + r), NO_DISTANCE)
            reach = 0
            if modality in allowed:
                start = 0 if modality == "lang" else t
                i = torch.arange(q, dtype=torch.float32)
                dist[:, start : start + q] = (i[:, None] - i[None, :]).abs()
                reach = q - 1
            self._layouts[key] = (block, KeyDistance(dist.to(device), reach))
        return self._layouts[key]

    def forward(
        self,
        lang: Tensor,
        lang_mask: Tensor | None,
        visn: Tensor,
        visn_mask: Tensor | None,
        need_probs: bool = False,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(B, T, H), (B, 1, 1, T), (B, R, H), (B, 1, 1, R) -> (B, T, H), (B, R, H), probs.

        ``probs`` (when ``need_probs``): ``{"lang": (B, heads, T, T + R), "visn": (B, heads, R, T + R)}``,
        each query's distribution over the concatenated keys ``[lang; visn]`` (zero on hidden keys).
        """
        t, r = lang.shape[1], visn.shape[1]
        states = {"lang": lang, "visn": visn}
        proj = {m: self.att[self.flow.stream(m)].attention.project(states[m]) for m in MODALITIES}
        k = torch.cat([proj["lang"][1], proj["visn"][1]], dim=2)  # (B, heads, T + R, hd)
        v = torch.cat([proj["lang"][2], proj["visn"][2]], dim=2)
        padding = _concat_padding(lang_mask, visn_mask, t, r)
        out: dict[str, Tensor] = {}
        probs: dict[str, Tensor] = {}
        for m in MODALITIES:
            block, distance = self.layout(m, t, r, lang.device, lang.dtype)
            mask = block if padding is None else padding if block is None else torch.minimum(padding, block)
            att = self.att[self.flow.stream(m)]
            o, p = att.attention.attend(proj[m][0], k, v, mask, need_probs, distance)
            out[m] = self.ffn[self.flow.stream(m)](att.norm(states[m] + att.dropout(o)))
            if need_probs:
                probs[m] = p
        return out["lang"], out["visn"], probs

    def extra_repr(self) -> str:
        return f"flow={self.flow.name}, lang_keys={self.flow.lang_keys}, visn_keys={self.flow.visn_keys}"
