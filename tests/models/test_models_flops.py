"""Analytic parameter and FLOP counts against the built model, PyTorch's FLOP counter and HuggingFace."""

import pytest
import torch
from models_testutils import make_batch, run_model
from torch.utils.flop_counter import FlopCounterMode

from models import build_model, lxmert_10_6_6, lxmert_base, lxmert_tiny
from models.flops import count_params, flops_per_sample, layerdrop_saving

CONFIGS = {
    "base": lxmert_base(),
    "10-6-6": lxmert_10_6_6(),
    "base-span-entmax-some-sites": lxmert_base("attention.name=span_entmax", "attention.stacks=lang,cross/cross"),
    "base-sparsemax": lxmert_base("attention.name=entmax", "attention.alpha_mode=sparsemax"),
    "tiny-span": lxmert_tiny("attention.name=span", l_layers=3, x_layers=1, r_layers=4),
    "tiny-entmax-2048": lxmert_tiny("attention.name=entmax", visual_feat_dim=2048, num_answers=3129),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_count_params_equals_the_built_model(name):
    cfg = CONFIGS[name]
    with torch.device("meta"):  # no memory, no init time
        model = build_model(cfg) if name.startswith("base") or name == "10-6-6" else None
    model = model if model is not None else build_model(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())


def test_base_is_213_9m_like_huggingface_with_the_vqa_head():
    transformers = pytest.importorskip("transformers")
    assert count_params(lxmert_base()) == 213_930_297  # "213.9M": encoder + 3,129-answer VQA head
    assert count_params(lxmert_base(), head=False) == 207_936_768
    hc = transformers.LxmertConfig(num_qa_labels=3129)
    with torch.device("meta"):
        qa = transformers.LxmertForQuestionAnswering(hc)
    assert sum(p.numel() for p in qa.parameters()) == 213_930_297
    assert sum(p.numel() for p in qa.lxmert.parameters()) == 207_936_768


def test_flops_of_lxmert_base_and_the_layerdrop_saving():
    fwd = flops_per_sample(lxmert_base(), n_tokens=20, n_regions=36)
    assert fwd == pytest.approx(10.6e9, rel=0.005)
    assert flops_per_sample(lxmert_base(), 20, 36, backward=True) == pytest.approx(31.8e9, rel=0.005)
    assert flops_per_sample(lxmert_10_6_6(), 20, 36) / fwd == pytest.approx(1.18, abs=0.005)
    ld = lxmert_base("layerdrop.mode=fixed", "layerdrop.n_drop=1")
    assert layerdrop_saving(ld) == pytest.approx(0.176, abs=0.001)
    assert flops_per_sample(ld, training=False) == fwd  # evaluation runs every layer
    prob = lxmert_base("layerdrop.mode=prob", "layerdrop.p=0.5")
    assert flops_per_sample(prob, training=True) < 0.55 * fwd


def test_flops_match_pytorchs_flop_counter():
    cfg = lxmert_tiny(l_layers=3, x_layers=2, r_layers=1)
    model = build_model(cfg).eval()
    batch = make_batch(cfg, batch=2, tokens=7, regions=5, pad=False)
    with FlopCounterMode(display=False) as counter:
        run_model(model, batch, output_attentions=True)  # explicit matmuls: the counter sees them all
    assert counter.get_total_flops() / 2 == flops_per_sample(cfg, n_tokens=7, n_regions=5)
