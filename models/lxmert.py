"""LXMERT: a two-stream (language, vision) transformer with cross-modality layers.

Tan & Bansal 2019, "LXMERT: Learning Cross-Modality Encoder Representations from Transformers",
https://arxiv.org/abs/1908.07490. Read top to bottom:

1. :class:`TextEmbeddings`   token + position + segment embeddings, LayerNorm.
2. :class:`VisualEmbeddings` (LayerNorm(fc(features)) + LayerNorm(fc(boxes))) / 2.
3. :class:`AttentionBlock`   post-norm residual around a :class:`MultiHeadAttention`.
4. :class:`FeedForward`      post-norm residual around Linear-GeLU-Linear.
5. :class:`EncoderLayer`     self-attention + feed-forward (language layers and vision "r" layers).
6. :class:`CrossLayer`       one cross-attention serving both directions, then self-attention and
                             feed-forward per modality.
7. :class:`LxmertEncoder`    language layers, vision layers, cross layers; LayerDrop picks which run.
8. :class:`LxmertModel`      embeddings + encoder + pooler ([CLS] -> Linear -> tanh).
9. :class:`LxmertForVQA`     the model + the VQA answer head (:mod:`models.heads`).
10. :class:`LxmertForPretraining` the same model + LXMERT's pretraining heads (masked LM, masked
                             objects, matching, image QA) and an image-text contrastive head; its
                             ``lxmert.*`` weights are exactly those of :class:`LxmertForVQA`, so the
                             encoder transfers by state dict.

The numerics follow HuggingFace's ``LxmertModel`` exactly (tested to 1e-5); the parameter names are
ours, mapped to HuggingFace's and the original code's in :mod:`models.checkpoint`. Modules are built
by :mod:`models.builders` and receive their attention kernels and LayerDrop from there (injected, no
branching on the variant in here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import MultiHeadAttention, additive_mask
from models.config import ModelConfig
from models.dropout import Dropout
from models.heads import VQAHead
from models.layerdrop import LayerDrop

#: LXMERT's pretraining heads, in its order (what :func:`models.lxmert_pretraining` builds by default).
LXMERT_PRETRAIN_HEADS: tuple[str, ...] = ("mlm", "mor", "match", "qa")
#: Every head :class:`LxmertForPretraining` can carry: LXMERT's and the image-text contrastive head.
PRETRAIN_HEADS: tuple[str, ...] = (*LXMERT_PRETRAIN_HEADS, "contrastive")


class TextEmbeddings(nn.Module):
    """Word + learned position + segment embeddings, then LayerNorm and dropout.

    (HuggingFace / the original code give the position and segment tables ``padding_idx=0``, which
    only freezes row 0 of each in training; we keep ``padding_idx`` for words only.)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, h, padding_idx=0)
        self.position = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type = nn.Embedding(cfg.type_vocab_size, h)
        self.norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, T, H)."""
        x = self.word(input_ids) + self.position.weight[: input_ids.shape[1]]
        if token_type_ids is None:
            x = x + self.token_type.weight[0]
        else:
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class VisualEmbeddings(nn.Module):
    """Region features and boxes -> (LayerNorm(fc(feat)) + LayerNorm(fc(box))) / 2, then dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.feat_fc = nn.Linear(cfg.visual_feat_dim, h)
        self.feat_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.box_fc = nn.Linear(cfg.visual_pos_dim, h)
        self.box_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)

    def forward(self, feats: Tensor, boxes: Tensor) -> Tensor:
        """(B, R, F) features and (B, R, 4) boxes -> (B, R, H)."""
        x = self.feat_norm(self.feat_fc(feats)) + self.box_norm(self.box_fc(boxes))
        return self.dropout(x * 0.5)


class AttentionBlock(nn.Module):
    """``LayerNorm(x + Dropout(Attention(x, ctx)))`` (post-norm, as BERT / LXMERT)."""

    def __init__(self, attention: MultiHeadAttention, hidden_size: int, eps: float, dropout: float):
        super().__init__()
        self.attention = attention
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(
        self, x: Tensor, ctx: Tensor | None, mask: Tensor | None, need_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """(B, Q, H) queries, (B, K, H) context or None (self), (B, 1, 1, K) mask -> (B, Q, H), probs."""
        out, probs = self.attention(x, ctx, mask, need_probs)
        return self.norm(x + self.dropout(out)), probs

    def both(
        self, a: Tensor, b: Tensor, mask_a: Tensor | None, mask_b: Tensor | None, need_probs: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Bidirectional cross-attention (same weights, same LayerNorm): ``a`` over ``b``, ``b`` over ``a``.

        Returns:
            (a' (B, Na, H), b' (B, Nb, H), probs of a's queries, probs of b's queries).
        """
        (out_a, p_a), (out_b, p_b) = self.attention.forward_both(a, b, mask_a, mask_b, need_probs)
        return self.norm(a + self.dropout(out_a)), self.norm(b + self.dropout(out_b)), p_a, p_b


class FeedForward(nn.Module):
    """``LayerNorm(x + Dropout(fc2(GeLU(fc1(x)))))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, H) -> (B, N, H)."""
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class EncoderLayer(nn.Module):
    """A single-modality layer: self-attention then feed-forward (language and vision stacks)."""

    def __init__(self, self_att: AttentionBlock, ffn: FeedForward):
        super().__init__()
        self.self_att = self_att
        self.ffn = ffn

    def forward(self, x: Tensor, mask: Tensor | None, need_probs: bool = False) -> tuple[Tensor, dict]:
        """(B, N, H), (B, 1, 1, N) mask -> (B, N, H), {"self": probs} if need_probs."""
        x, probs = self.self_att(x, None, mask, need_probs)
        return self.ffn(x), ({"self": probs} if need_probs else {})


class CrossLayer(nn.Module):
    """A cross-modality layer.

    One cross-attention module (shared weights and kernel) serves both directions, language queries
    over regions and region queries over tokens, both from the layer's inputs; then each modality
    runs its own self-attention and feed-forward.
    """

    def __init__(
        self,
        cross_att: AttentionBlock,
        lang_self_att: AttentionBlock,
        visn_self_att: AttentionBlock,
        lang_ffn: FeedForward,
        visn_ffn: FeedForward,
    ):
        super().__init__()
        self.cross_att = cross_att
        self.lang_self_att = lang_self_att
        self.visn_self_att = visn_self_att
        self.lang_ffn = lang_ffn
        self.visn_ffn = visn_ffn

    def forward(
        self,
        lang: Tensor,
        lang_mask: Tensor | None,
        visn: Tensor,
        visn_mask: Tensor | None,
        need_probs: bool = False,
    ) -> tuple[Tensor, Tensor, dict]:
        """(B, T, H), (B, 1, 1, T), (B, R, H), (B, 1, 1, R) -> (B, T, H), (B, R, H), probs."""
        # Both directions read the layer's inputs; each stream's q, k, v come from one matmul.
        lang_x, visn_x, p_lv, p_vl = self.cross_att.both(lang, visn, lang_mask, visn_mask, need_probs)
        lang, p_l = self.lang_self_att(lang_x, None, lang_mask, need_probs)
        visn, p_v = self.visn_self_att(visn_x, None, visn_mask, need_probs)
        probs = {"cross": p_lv, "cross_visn": p_vl, "lang_self": p_l, "visn_self": p_v} if need_probs else {}
        return self.lang_ffn(lang), self.visn_ffn(visn), probs


class Tap(nn.Module):
    """An identity with a name: a place in the forward whose values forward hooks can read
    (``register_forward_hook``), e.g. the single-modality states the fusion stack starts from."""

    def forward(self, *values: Tensor) -> tuple[Tensor, ...]:
        return values


class LxmertEncoder(nn.Module):
    """Language layers, then vision layers, then cross-modality layers.

    Args:
        cfg: The model config.
        lang_layers: The language stack (HF ``encoder.layer``).
        visn_layers: The vision stack (HF ``encoder.r_layers``).
        cross_layers: The cross-modality stack (HF ``encoder.x_layers``).
        layerdrop: Which layers run in each forward.

    Attributes:
        layers_ran: ``{"lang": [...], "visn": [...], "cross": [...]}`` indices run by the last forward.
        unimodal: A :class:`Tap` that sees ``(lang, visn)`` after the single-modality stacks, before
            the cross-modality layers (what the contrastive head reads).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        lang_layers: list[EncoderLayer],
        visn_layers: list[EncoderLayer],
        cross_layers: list[CrossLayer],
        layerdrop: LayerDrop,
    ):
        super().__init__()
        self.config = cfg
        self.lang_layers = nn.ModuleList(lang_layers)
        self.visn_layers = nn.ModuleList(visn_layers)
        self.cross_layers = nn.ModuleList(cross_layers)
        self.layerdrop = layerdrop
        self.unimodal = Tap()

    @property
    def layers_ran(self) -> dict[str, list[int]]:
        return self.layerdrop.last

    def forward(
        self,
        lang: Tensor,
        lang_mask: Tensor | None,
        visn: Tensor,
        visn_mask: Tensor | None,
        need_probs: bool = False,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Run the three stacks.

        Args:
            lang: (B, T, H) text embeddings.
            lang_mask: (B, 1, 1, T) additive mask or None.
            visn: (B, R, H) region embeddings.
            visn_mask: (B, 1, 1, R) additive mask or None.
            need_probs: Collect attention probabilities, keyed ``<stack>/<layer>/<attention>``.

        Returns:
            (lang (B, T, H), visn (B, R, H), probs dict).
        """
        plan = self.layerdrop.plan(self.training)
        probs: dict[str, Tensor] = {}
        for i in plan["lang"]:
            lang, p = self.lang_layers[i](lang, lang_mask, need_probs)
            probs.update({f"lang/{i}/{k}": v for k, v in p.items()})
        for i in plan["visn"]:
            visn, p = self.visn_layers[i](visn, visn_mask, need_probs)
            probs.update({f"visn/{i}/{k}": v for k, v in p.items()})
        lang, visn = self.unimodal(lang, visn)
        for i in plan["cross"]:
            lang, visn, p = self.cross_layers[i](lang, lang_mask, visn, visn_mask, need_probs)
            probs.update({f"cross/{i}/{k}": v for k, v in p.items()})
        return lang, visn, probs


class Pooler(nn.Module):
    """[CLS] hidden state -> Linear -> tanh."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, lang: Tensor) -> Tensor:
        """(B, T, H) -> (B, H)."""
        return torch.tanh(self.dense(lang[:, 0]))


@dataclass
class LxmertOutput:
    """Outputs of :class:`LxmertModel` / :class:`LxmertForVQA`.

    Attributes:
        lang: (B, T, H) language output.
        visn: (B, R, H) vision output.
        pooled: (B, H) pooled [CLS].
        logits: (B, A) answer logits (None without a head).
        attentions: ``{"<stack>/<layer>/<attention>": (B, heads, Q, K)}`` when requested; attention in
            ``self | cross (text queries) | cross_visn (region queries) | lang_self | visn_self``.
    """

    lang: Tensor
    visn: Tensor
    pooled: Tensor
    logits: Tensor | None = None
    attentions: dict[str, Tensor] | None = None


class LxmertModel(nn.Module):
    """Embeddings, encoder and pooler (HuggingFace ``LxmertModel``)."""

    def __init__(
        self,
        cfg: ModelConfig,
        embeddings: TextEmbeddings,
        visual_embeddings: VisualEmbeddings,
        encoder: LxmertEncoder,
        pooler: Pooler,
    ):
        super().__init__()
        self.config = cfg
        self.embeddings = embeddings
        self.visual_embeddings = visual_embeddings
        self.encoder = encoder
        self.pooler = pooler

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
        """Encode a batch.

        Args:
            input_ids: (B, T) WordPiece ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding (None: all real).
            token_type_ids: (B, T) segment ids (None: zeros).
            visual_feats: (B, R, F) region features.
            visual_pos: (B, R, 4) boxes in [0, 1].
            visual_attention_mask: (B, R) 1 for real regions (None: all real).
            output_attentions: Return the attention probabilities.

        Returns:
            :class:`LxmertOutput` with ``lang``, ``visn``, ``pooled`` (and ``attentions``).
        """
        if visual_feats is None or visual_pos is None:
            raise ValueError("visual_feats and visual_pos are required")
        lang = self.embeddings(input_ids, token_type_ids)
        visn = self.visual_embeddings(visual_feats, visual_pos)
        # Additive masks built once per forward, shared by every layer.
        lang_mask = additive_mask(attention_mask, lang.dtype)
        visn_mask = additive_mask(visual_attention_mask, visn.dtype)
        lang, visn, probs = self.encoder(lang, lang_mask, visn, visn_mask, output_attentions)
        return LxmertOutput(
            lang=lang, visn=visn, pooled=self.pooler(lang), attentions=probs if output_attentions else None
        )

    def encode_unimodal(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Texts and / or images through their own stack only (no cross-modality layers).

        The states the encoder's :attr:`LxmertEncoder.unimodal` tap sees, for one modality without
        the other: N texts and M images cost N + M encodings, where a pair score costs N x M (the
        embedding-similarity scoring of zero-shot retrieval). Runs the layers LayerDrop runs at
        evaluation.

        Args:
            input_ids, attention_mask, token_type_ids: As :meth:`forward` (None: no texts).
            visual_feats, visual_pos, visual_attention_mask: As :meth:`forward` (None: no images).

        Returns:
            (lang (B, T, H) or None, visn (B, R, H) or None).
        """
        plan = self.encoder.layerdrop.eval_plan()
        lang = visn = None
        if input_ids is not None:
            lang = self.embeddings(input_ids, token_type_ids)
            mask = additive_mask(attention_mask, lang.dtype)
            for i in plan["lang"]:
                lang, _ = self.encoder.lang_layers[i](lang, mask)
        if visual_feats is not None:
            if visual_pos is None:
                raise ValueError("visual_pos is required with visual_feats")
            visn = self.visual_embeddings(visual_feats, visual_pos)
            mask = additive_mask(visual_attention_mask, visn.dtype)
            for i in plan["visn"]:
                visn, _ = self.encoder.visn_layers[i](visn, mask)
        return lang, visn


class LxmertForVQA(nn.Module):
    """LXMERT with the VQA answer head: pooled [CLS] -> 2H -> GeLU -> LayerNorm -> answers.

    ``forward(input_ids, attention_mask, token_type_ids, visual_feats, visual_pos,
    visual_attention_mask=None)`` returns an :class:`LxmertOutput` with ``logits (B, A)``,
    ``lang (B, T, H)``, ``visn (B, R, H)``, ``pooled (B, H)``. Build it with
    :func:`models.build_model`.
    """

    def __init__(self, cfg: ModelConfig, lxmert: LxmertModel, head: VQAHead):
        super().__init__()
        self.config = cfg
        self.lxmert = lxmert
        self.head = head

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
        """As :meth:`LxmertModel.forward`, plus ``logits`` (B, A)."""
        out = self.lxmert(
            input_ids, attention_mask, token_type_ids, visual_feats, visual_pos, visual_attention_mask,
            output_attentions,
        )  # fmt: skip
        out.logits = self.head(out.pooled)
        return out

    @property
    def layers_ran(self) -> dict[str, list[int]]:
        """Layer indices per stack that ran in the last forward (LayerDrop)."""
        return self.lxmert.encoder.layers_ran


@dataclass
class PretrainOutput(LxmertOutput):
    """Outputs of :class:`LxmertForPretraining` (the heads that ran; None for the others).

    Attributes:
        mlm: (N, V) vocabulary logits of the N token positions selected by ``mlm_mask`` (all
            ``B * T`` positions, flattened, without a mask).
        mor: ``{"obj": (M, O), "attr": (M, Aₜ), "feat": (M, F)}`` for the M regions selected by
            ``region_mask`` (all ``B * R``, flattened, without one).
        match: (B, 2) image-sentence matching logits (class 1 = matched).
        qa: (B, A) image-QA answer logits.
        contrastive: ``{"text": (B, D), "image": (B, D), "scale": ()}``: unit embeddings of each
            row's text and image from the single-modality states (the :attr:`LxmertEncoder.unimodal`
            tap, mean-pooled over real tokens / regions) and the similarity scale.
    """

    mlm: Tensor | None = None
    mor: dict[str, Tensor] | None = None
    match: Tensor | None = None
    qa: Tensor | None = None
    contrastive: dict[str, Tensor] | None = None


class LxmertForPretraining(nn.Module):
    """LXMERT with its pretraining heads (HuggingFace ``LxmertForPreTraining``).

    Built by :func:`models.builders.lxmert_pretraining`. ``lxmert`` is an :class:`LxmertModel`
    named exactly as in :class:`LxmertForVQA`, so ``load_pretrained(vqa_model, this.state_dict())``
    transfers the whole encoder (the pretraining heads are reported as ignored, the VQA head as
    fresh). The heads live in ``heads`` (a ``ModuleDict`` over a subset of :data:`PRETRAIN_HEADS`).

    Only the positions a loss reads are sent through the heads (``mlm_mask``, ``region_mask``):
    with a 30,522-word vocabulary the MLM logits of every token would dominate a small model's
    step. Every head runs inside ``forward`` so that DDP sees all parameters that get gradients.
    """

    def __init__(self, cfg: ModelConfig, lxmert: LxmertModel, heads: nn.ModuleDict):
        super().__init__()
        unknown = sorted(set(heads) - set(PRETRAIN_HEADS))
        if unknown:
            raise ValueError(f"unknown pretraining head(s) {unknown}; valid: {list(PRETRAIN_HEADS)}")
        self.config = cfg
        self.lxmert = lxmert
        self.heads = heads

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        output_attentions: bool = False,
        *,
        heads: tuple[str, ...] | list[str] | None = None,
        mlm_mask: Tensor | None = None,
        region_mask: Tensor | None = None,
    ) -> PretrainOutput:
        """Encode a batch and run the requested heads.

        Args:
            input_ids ... output_attentions: As :meth:`LxmertModel.forward`.
            heads: Heads to run (default: every head the model has); asking for one it lacks raises.
            mlm_mask: (B, T) bool, token positions whose vocabulary logits are computed.
            region_mask: (B, R) bool, regions whose object predictions are computed.

        Returns:
            :class:`PretrainOutput` (``lang``, ``visn``, ``pooled`` and the heads' outputs).
        """
        names = tuple(self.heads) if heads is None else tuple(heads)
        missing = [h for h in names if h not in self.heads]
        if missing:
            raise ValueError(f"this model has no pretraining head(s) {missing}; it has {list(self.heads)}")
        unimodal: list[tuple[Tensor, ...]] = []
        # The contrastive head compares single-modality states: with cross-modal attention the final
        # states of a pair have seen each other, and in-batch negatives would compare images through
        # the texts they were paired with. The tap hands them over from this same forward.
        tap = (self.lxmert.encoder.unimodal.register_forward_hook(lambda _m, _i, values: unimodal.append(values))
               if "contrastive" in names else None)  # fmt: skip
        try:
            base = self.lxmert(
                input_ids, attention_mask, token_type_ids, visual_feats, visual_pos, visual_attention_mask,
                output_attentions,
            )  # fmt: skip
        finally:
            if tap is not None:
                tap.remove()
        out = PretrainOutput(lang=base.lang, visn=base.visn, pooled=base.pooled, attentions=base.attentions)
        if "mlm" in names:
            lang = base.lang[mlm_mask] if mlm_mask is not None else base.lang.reshape(-1, base.lang.shape[-1])
            out.mlm = self.heads["mlm"](lang, self.lxmert.embeddings.word.weight)
        if "mor" in names:
            visn = base.visn[region_mask] if region_mask is not None else base.visn.reshape(-1, base.visn.shape[-1])
            out.mor = self.heads["mor"](visn)
        if "match" in names:
            out.match = self.heads["match"](base.pooled)
        if "qa" in names:
            out.qa = self.heads["qa"](base.pooled)
        if "contrastive" in names:
            lang, visn = unimodal[-1]
            out.contrastive = self.heads["contrastive"](lang, attention_mask, visn, visual_attention_mask)
        return out

    @property
    def layers_ran(self) -> dict[str, list[int]]:
        """Layer indices per stack that ran in the last forward (LayerDrop)."""
        return self.lxmert.encoder.layers_ran
