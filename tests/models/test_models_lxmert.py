"""The model: parity with HuggingFace's LxmertModel, every variant end to end, hooks."""

import pytest
import torch
from models_testutils import hf_qa_model, make_batch, run_model

from models import build_model, hooks, lxmert_tiny
from models.attention import ATTENTION_REGISTRY
from models.checkpoint import load_pretrained

PARITY = {
    # different l/x/r counts, 4 heads
    "3-2-1": lxmert_tiny(l_layers=3, x_layers=2, r_layers=1, visual_feat_dim=24, intermediate_size=48),
    # 2,048-d region features (Faster R-CNN), 6 heads of 8
    "feat2048": lxmert_tiny(hidden_size=48, num_heads=6, intermediate_size=96, l_layers=1, x_layers=1,
                            r_layers=2, visual_feat_dim=2048),  # fmt: skip
    # VQA lengths (20 tokens, 36 regions), padded regions too, 2 heads
    "vqa-lengths": lxmert_tiny(hidden_size=64, num_heads=2, intermediate_size=128, l_layers=2, x_layers=3,
                               r_layers=2, visual_feat_dim=40, num_answers=17),  # fmt: skip
}
LENGTHS = {"3-2-1": (7, 5), "feat2048": (9, 4), "vqa-lengths": (20, 36)}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_parity_with_huggingface(name):
    cfg = PARITY[name]
    hf = hf_qa_model(cfg, seed=1)
    ours = build_model(cfg).eval()
    report = load_pretrained(ours, hf.state_dict(), verbose=False)
    assert report.complete and len(report.loaded) == len(list(ours.parameters()))
    tokens, regions = LENGTHS[name]
    batch = make_batch(cfg, batch=3, tokens=tokens, regions=regions, visual_pad=(name == "vqa-lengths"))
    with torch.no_grad():
        out = run_model(ours, batch)
        ref = hf.lxmert(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"], visual_feats=batch["visual_feats"],
            visual_pos=batch["visual_pos"], visual_attention_mask=batch["visual_attention_mask"],
        )  # fmt: skip
        logits = hf.answer_head(ref.pooled_output)
    torch.testing.assert_close(out.lang, ref.language_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.visn, ref.vision_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooled, ref.pooled_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)


def test_output_interface_and_attention_probabilities():
    cfg = lxmert_tiny()
    model = build_model(cfg).eval()
    batch = make_batch(cfg, tokens=6, regions=4)
    out = run_model(model, batch, output_attentions=True)
    assert out.logits.shape == (3, 10) and out.lang.shape == (3, 6, 32)
    assert out.visn.shape == (3, 4, 32) and out.pooled.shape == (3, 32)
    assert out.attentions["cross/1/cross"].shape == (3, 4, 6, 4)  # text queries over regions
    assert out.attentions["cross/1/cross_visn"].shape == (3, 4, 4, 6)  # regions over text
    assert set(out.attentions) >= {"lang/0/self", "visn/1/self", "cross/0/lang_self", "cross/0/visn_self"}
    # Padded tokens get no attention anywhere.
    assert (out.attentions["lang/0/self"][0, :, :, 3:] == 0).all()
    assert (out.attentions["cross/0/cross_visn"][0, :, :, 3:] == 0).all()
    with torch.no_grad():
        plain = run_model(model, batch)
    torch.testing.assert_close(plain.logits, out.logits, atol=1e-5, rtol=0)


def test_one_cross_attention_module_serves_both_directions():
    model = build_model(lxmert_tiny())
    layer = model.lxmert.encoder.cross_layers[0]
    names = [n for n, _ in layer.named_children()]
    assert names == ["cross_att", "lang_self_att", "visn_self_att", "lang_ffn", "visn_ffn"]


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_every_variant_trains_end_to_end(name):
    cfg = lxmert_tiny(f"attention.name={name}", "attention.span_init=0.5", "attention.alpha_init=1.3")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = make_batch(cfg, tokens=10, regions=6, visual_pad=True)
    out = run_model(model, batch)
    # The last cross layer's vision branch does not feed the logits (as in LXMERT): use visn too.
    loss = out.logits.logsumexp(-1).mean() + out.visn.square().mean() + hooks.aux_loss(model)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if pname.endswith((".z", ".alpha_logit")):
            assert p.grad.abs().sum() > 0, pname
    stats = hooks.collect_stats(model)
    if name != "softmax":
        key = "cross/1/cross/" + ("alpha" if "entmax" in name else "span")
        assert len(stats[key]) == cfg.num_heads
    else:
        assert stats == {}


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_every_variant_is_finite_under_bf16_autocast_with_padding(name):
    cfg = lxmert_tiny(f"attention.name={name}", "attention.span_init=0.5")
    model = build_model(cfg).train()
    batch = make_batch(cfg, tokens=10, regions=6, visual_pad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_model(model, batch)
    (out.logits.float().sum() + out.visn.float().sum()).backward()
    assert torch.isfinite(out.logits.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_span_model_at_full_span_equals_softmax_model():
    soft = build_model(lxmert_tiny()).eval()
    span = build_model(lxmert_tiny("attention.name=span", "attention.span_init=1.0")).eval()
    load_pretrained(span, soft.state_dict(), verbose=False)
    batch = make_batch(soft.config, tokens=8, regions=8)
    with torch.no_grad():
        torch.testing.assert_close(run_model(span, batch).logits, run_model(soft, batch).logits, atol=1e-5, rtol=0)


def test_attention_stacks_select_the_sites():
    model = build_model(lxmert_tiny("attention.name=span", "attention.stacks=cross/cross"))
    kinds = {hooks.site_of(n): type(m).__name__ for n, m in model.named_modules() if n.endswith("kernel")}
    assert kinds["cross/0/cross"] == "AdaptiveSpanAttention"
    assert kinds["cross/0/lang_self"] == kinds["lang/0/self"] == kinds["visn/1/self"] == "SoftmaxAttention"


def test_hooks_sum_penalties_and_clamp():
    cfg = lxmert_tiny("attention.name=span", "attention.span_penalty=0.1", "attention.stacks=lang")
    model = build_model(cfg)
    expected = 2 * 0.1 * cfg.attention.span_max_lang * cfg.attention.span_init  # two language layers
    torch.testing.assert_close(hooks.aux_loss(model), torch.tensor(expected))
    z = model.lxmert.encoder.lang_layers[0].self_att.attention.kernel.span.z
    with torch.no_grad():
        z.fill_(3.0)
    hooks.post_step(model)
    assert (z == 1).all()
    assert hooks.aux_loss(build_model(lxmert_tiny())).item() == 0.0
    assert hooks.collect_stats(model)["lang/0/self/span"] == [8.0] * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_every_variant_is_finite_with_half_precision_weights_and_padding(name, dtype):
    cfg = lxmert_tiny(f"attention.name={name}", "attention.span_init=0.5")
    model = build_model(cfg).to(dtype).train()
    batch = make_batch(cfg, tokens=10, regions=6, visual_pad=True)
    batch["visual_feats"], batch["visual_pos"] = batch["visual_feats"].to(dtype), batch["visual_pos"].to(dtype)
    out = run_model(model, batch)
    (out.logits.float().sum() + out.visn.float().sum()).backward()
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
