"""Task heads on top of :class:`models.lxmert.LxmertModel`.

* :class:`VQAHead`: the answer head (VQA fine-tuning, 3,129 answers; GQA, the same head with 1,842;
  LXMERT's pretraining image-QA head has the same shape with 9,500 answers).
* :class:`PairHead`: NLVR2's classifier over the pooled outputs of one sentence encoded with each of
  two images, concatenated.
* LXMERT's pretraining heads (Tan & Bansal 2019, https://arxiv.org/abs/1908.07490, Sec. 3.1):
  :class:`MLMHead` (masked cross-modality language modelling, decoder tied to the word
  embeddings), :class:`MaskedObjectHead` (masked object prediction: feature regression and
  detected-label classification of objects and attributes), :class:`MatchHead` (image-sentence
  matching on the pooled output). :func:`models.builders.lxmert_pretraining` assembles them.
* :class:`ContrastiveHead`: image-text contrastive projection (one embedding per text and per
  image, compared by cosine similarity at a fixed or learned temperature; CLIP / ALIGN style), for
  the ``contrastive`` pretraining objective and embedding-similarity retrieval.

Each head takes the states it reads (``lang``, ``visn`` or ``pooled`` of
:class:`models.lxmert.LxmertOutput`). Their HuggingFace names (``cls.predictions.*``,
``cls.seq_relationship.*``, ``obj_predict_head.*``, ``answer_head.*``) are mapped in
:mod:`models.checkpoint`, and the numerics follow HuggingFace's ``LxmertForPreTraining`` (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class VQAHead(nn.Module):
    """LXMERT's answer head: Linear(H, 2H) -> GeLU -> LayerNorm -> Linear(2H, A).

    HuggingFace: ``answer_head.logit_fc.{0,2,3}``; the original VQA code: ``logit_fc.{0,2,3}``.

    Args:
        hidden_size: H.
        num_answers: A (3,129 for VQA v2; 9,500 for LXMERT's pretraining QA).
        eps: LayerNorm epsilon.
    """

    def __init__(self, hidden_size: int, num_answers: int, eps: float = 1e-12):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, 2 * hidden_size)
        self.norm = nn.LayerNorm(2 * hidden_size, eps=eps)
        self.fc2 = nn.Linear(2 * hidden_size, num_answers)

    def forward(self, pooled: Tensor) -> Tensor:
        """(B, H) pooled [CLS] -> (B, A) logits."""
        return self.fc2(self.norm(F.gelu(self.fc1(pooled))))


class PairHead(nn.Module):
    """A classifier over K pooled outputs concatenated: Linear(KH, KH) -> GeLU -> LayerNorm -> Linear(KH, C).

    LXMERT's NLVR2 head (``tasks/nlvr2_model.py``, K = 2 images, C = 2 classes): the sentence is
    encoded once with each image, and the two pooled [CLS] vectors, ``img0`` first, are joined into
    one 2H vector. ``fc1``'s input columns ``[k*H, (k+1)*H)`` read image k: swapping the images and
    those column blocks gives the same logits.

    Args:
        hidden_size: H.
        num_classes: C (2: False, True).
        num_images: K (2).
        eps: LayerNorm epsilon.
    """

    def __init__(self, hidden_size: int, num_classes: int = 2, num_images: int = 2, eps: float = 1e-12):
        super().__init__()
        self.num_images = num_images
        width = num_images * hidden_size
        self.fc1 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.fc2 = nn.Linear(width, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        """(B, K, H) pooled outputs, one per image -> (B, C) logits."""
        if pooled.dim() != 3 or pooled.shape[1] != self.num_images:
            raise ValueError(f"PairHead expects (B, {self.num_images}, H) pooled outputs, got {tuple(pooled.shape)}")
        x = pooled.reshape(pooled.shape[0], -1)
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


class Transform(nn.Module):
    """BERT's prediction-head transform: Linear(H, H) -> GeLU -> LayerNorm (HF ``...transform``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """(..., H) -> (..., H)."""
        return self.norm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """Masked language modelling: transform, then the word-embedding matrix (tied) plus a bias.

    The decoder weight is not a parameter of this head: the caller passes the word embeddings'
    weight, so the tie survives ``state_dict`` round trips and DDP without a duplicated key (HF:
    ``cls.predictions.transform.*``, ``cls.predictions.bias``; its ``decoder.weight`` is the tie).

    Args:
        hidden_size: H.
        vocab_size: V.
        eps: LayerNorm epsilon (1e-12 in BERT / LXMERT heads).
    """

    def __init__(self, hidden_size: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.transform = Transform(hidden_size, eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, lang: Tensor, word_weight: Tensor) -> Tensor:
        """(..., H) token states and the (V, H) word embeddings -> (..., V) vocabulary logits."""
        return F.linear(self.transform(lang), word_weight, self.bias)


class MaskedObjectHead(nn.Module):
    """Masked object prediction: one transform, then three decoders per region.

    ``obj`` classifies the detected object label (1,600 Visual Genome classes in LXMERT), ``attr``
    the detected attribute (400), ``feat`` regresses the region's input feature (F = 2,048). HF:
    ``obj_predict_head.transform.*``, ``obj_predict_head.decoder_dict.{obj,attr,feat}.*``.

    Args:
        hidden_size: H.
        num_object_labels: Object classes.
        num_attr_labels: Attribute classes.
        visual_feat_dim: F.
        eps: LayerNorm epsilon.
    """

    def __init__(self, hidden_size: int, num_object_labels: int, num_attr_labels: int, visual_feat_dim: int,
                 eps: float = 1e-12):  # fmt: skip
        super().__init__()
        self.transform = Transform(hidden_size, eps)
        self.obj = nn.Linear(hidden_size, num_object_labels)
        self.attr = nn.Linear(hidden_size, num_attr_labels)
        self.feat = nn.Linear(hidden_size, visual_feat_dim)

    def forward(self, visn: Tensor) -> dict[str, Tensor]:
        """(..., H) region states -> ``{"obj": (..., O), "attr": (..., Aₜ), "feat": (..., F)}``."""
        h = self.transform(visn)
        return {"obj": self.obj(h), "attr": self.attr(h), "feat": self.feat(h)}


class MatchHead(nn.Module):
    """Image-sentence matching: Linear(H, 2) on the pooled [CLS] (HF ``cls.seq_relationship``);
    class 1 = the sentence describes the image (LXMERT's ``is_matched``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc = nn.Linear(hidden_size, 2)

    def forward(self, pooled: Tensor) -> Tensor:
        """(B, H) -> (B, 2) logits."""
        return self.fc(pooled)


def masked_mean(states: Tensor, keep: Tensor | None) -> Tensor:
    """Mean over the positions ``keep`` marks: (B, N, H) and (B, N) 1/0 (None: all) -> (B, H)."""
    if keep is None:
        return states.mean(1)
    w = keep.to(states.dtype).unsqueeze(-1)
    return (states * w).sum(1) / w.sum(1).clamp_min(1.0)


class ContrastiveHead(nn.Module):
    """Image-text contrastive projection: mean-pooled text / image states -> Linear -> unit vectors.

    Each modality's states are averaged over its real positions (tokens, regions: with no
    single-modality layers the [CLS] state would be the same for every text) and projected.

    Similarities are ``scale * <text, image>`` with ``scale = 1 / temperature``. A learned temperature
    is parametrised as CLIP's (Radford et al. 2021, https://arxiv.org/abs/2103.00020):
    ``log_scale`` is trained and ``post_step()`` keeps ``scale <= max_scale`` (100 in CLIP); a fixed
    one is a buffer (saved with the model, never trained).

    Args:
        hidden_size: H.
        dim: Embedding size D.
        temperature: Initial (or fixed) temperature (CLIP's init: 0.07).
        learn_temperature: Train the temperature.
        max_scale: Upper bound of ``1 / temperature`` when learned.
    """

    def __init__(self, hidden_size: int, dim: int = 256, temperature: float = 0.07, learn_temperature: bool = True,
                 max_scale: float = 100.0):  # fmt: skip
        super().__init__()
        if not 0 < temperature:
            raise ValueError(f"temperature={temperature} must be > 0")
        if learn_temperature and not 1.0 / temperature <= max_scale:
            raise ValueError(f"1 / temperature = {1 / temperature:g} is above max_scale={max_scale:g}")
        self.text = nn.Linear(hidden_size, dim)
        self.image = nn.Linear(hidden_size, dim)
        self.max_log_scale = math.log(max_scale)
        self.learn_temperature = learn_temperature
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def embed_text(self, lang: Tensor, keep: Tensor | None = None) -> Tensor:
        """(B, T, H) token states and their (B, T) 1/0 mask (None: all real) -> (B, D) unit vectors."""
        return F.normalize(self.text(masked_mean(lang, keep)), dim=-1)

    def embed_image(self, visn: Tensor, keep: Tensor | None = None) -> Tensor:
        """(B, R, H) region states and their (B, R) 1/0 mask (None: all real) -> (B, D) unit vectors."""
        return F.normalize(self.image(masked_mean(visn, keep)), dim=-1)

    def scale(self) -> Tensor:
        """The 0-d similarity scale ``1 / temperature``."""
        return self.log_scale.exp()

    def forward(self, lang: Tensor, lang_keep: Tensor | None, visn: Tensor, visn_keep: Tensor | None) -> dict[str, Tensor]:
        """(B, T, H), (B, T), (B, R, H), (B, R) -> ``{"text": (B, D), "image": (B, D), "scale": ()}``."""
        return {"text": self.embed_text(lang, lang_keep), "image": self.embed_image(visn, visn_keep),
                "scale": self.scale()}  # fmt: skip

    @torch.no_grad()
    def post_step(self) -> None:
        """Keep a learned scale at or below ``max_scale`` (CLIP clamps it the same way)."""
        if self.learn_temperature:
            self.log_scale.clamp_(max=self.max_log_scale)
