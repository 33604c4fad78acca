"""Helpers shared by the models/ tests (a uniquely named module: ``conftest`` is ambiguous when
several test folders have one)."""

from __future__ import annotations

import pytest
import torch


def make_batch(cfg, batch: int = 3, tokens: int = 7, regions: int = 5, seed: int = 0, pad: bool = True,
               visual_pad: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """A random batch in the tasks/ format; with ``pad`` rows 0 and 2 end in padding tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    if pad:
        mask[0, tokens // 2 :] = 0
        mask[-1, tokens - 1 :] = 0
    vmask = torch.ones(batch, regions, dtype=torch.long)
    if visual_pad:
        vmask[1, regions // 2 :] = 0
    return {
        "input_ids": torch.randint(1, cfg.vocab_size, (batch, tokens), generator=g) * mask,
        "attention_mask": mask,
        "token_type_ids": torch.zeros(batch, tokens, dtype=torch.long),
        "visual_feats": torch.randn(batch, regions, cfg.visual_feat_dim, generator=g),
        "visual_pos": torch.rand(batch, regions, 4, generator=g),
        "visual_attention_mask": vmask if visual_pad else None,
    }


def run_model(model, batch, **kw):
    return model(
        batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["visual_feats"],
        batch["visual_pos"], batch["visual_attention_mask"], **kw,
    )  # fmt: skip


def hf_config(cfg):
    """The ``transformers.LxmertConfig`` equal to our ``ModelConfig``."""
    transformers = pytest.importorskip("transformers")
    return transformers.LxmertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, l_layers=cfg.l_layers, x_layers=cfg.x_layers,
        r_layers=cfg.r_layers, visual_feat_dim=cfg.visual_feat_dim,
        max_position_embeddings=cfg.max_position_embeddings, num_qa_labels=cfg.num_answers,
    )  # fmt: skip


def hf_qa_model(cfg, seed: int = 0):
    """A random-weight ``LxmertForQuestionAnswering`` at ``cfg`` (eval mode)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return transformers.LxmertForQuestionAnswering(hf_config(cfg)).eval()
