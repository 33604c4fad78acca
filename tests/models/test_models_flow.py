"""Attention flows (models.flow): references, masks, weight sharing, every normaliser in every flow, costs."""

import dataclasses

import pytest
import torch
from models_testutils import make_batch, run_model
from torch.utils.flop_counter import FlopCounterMode

from models import ConfigError, build_model, hooks, lxmert_base, lxmert_pretraining, lxmert_tiny
from models.attention import ATTENTION_REGISTRY
from models.checkpoint import CheckpointError, load_pretrained
from models.flops import count_params, flop_count, flops_per_sample, layerdrop_saving
from models.flow import FLOW_LAYERS, FLOWS, Flow, FlowLayer
from models.layerdrop import prune

KERNEL_OPTIONS = ("attention.span_init=0.4", "attention.span_ramp=2", "attention.alpha_init=1.3")


def tiny(flow: str, *overrides: str, **fields):
    extra = ("flow_merged_from=1",) if flow == "mixed" else ()
    return lxmert_tiny(f"flow={flow}", *extra, *overrides, **fields)


def copy_block(src, dst):
    """Load one module's weights into another of the same structure (strict)."""
    dst.load_state_dict(src.state_dict(), strict=True)


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_merged_with_every_cross_modal_score_masked_equals_modality_specific_layers(name):
    # A merged model whose fusion layers hide every cross-modal key, against LXMERT's single-modality
    # layers (modality_specific, x_layers=0) holding the same weights: one normaliser over the union
    # with the other modality masked must be each modality's own self-attention.
    options = (f"attention.name={name}", *KERNEL_OPTIONS)
    merged = build_model(tiny("merged", *options, l_layers=1, r_layers=1, x_layers=2)).eval()
    plain = build_model(lxmert_tiny(*options, l_layers=3, r_layers=3, x_layers=0)).eval()
    within = Flow("within", ("lang",), ("visn",))
    enc, ref = merged.lxmert.encoder, plain.lxmert.encoder
    for layer in enc.cross_layers:
        layer.flow = within  # the flow is data: this masks every cross-modal score
    for part in ("embeddings", "visual_embeddings", "pooler"):
        copy_block(getattr(merged.lxmert, part), getattr(plain.lxmert, part))
    copy_block(merged.head, plain.head)
    copy_block(enc.lang_layers[0], ref.lang_layers[0])
    copy_block(enc.visn_layers[0], ref.visn_layers[0])
    for j, layer in enumerate(enc.cross_layers):
        for m, stack in (("lang", ref.lang_layers), ("visn", ref.visn_layers)):
            copy_block(layer.att[m], stack[1 + j].self_att)
            copy_block(layer.ffn[m], stack[1 + j].ffn)
    batch = make_batch(merged.config, tokens=9, regions=6, visual_pad=True)
    with torch.no_grad():
        a, b = run_model(merged, batch), run_model(plain, batch)
    for key in ("lang", "visn", "pooled", "logits"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), atol=2e-6, rtol=1e-6)


def test_single_stream_layer_equals_a_bert_layer_over_the_concatenated_sequence():
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertLayer

    cfg = tiny("single_stream", l_layers=0, r_layers=0, x_layers=1)
    layer = build_model(cfg).lxmert.encoder.cross_layers[0].eval()
    bert_cfg = transformers.BertConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
                                       intermediate_size=cfg.intermediate_size, layer_norm_eps=cfg.layer_norm_eps,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    bert = BertLayer(bert_cfg).eval()
    att, ffn = layer.att["shared"], layer.ffn["shared"]
    h = cfg.hidden_size
    with torch.no_grad():
        weights, biases = att.attention.qkv.weight.split(h), att.attention.qkv.bias.split(h)  # q, k, v stacked
        for i, dst in enumerate((bert.attention.self.query, bert.attention.self.key, bert.attention.self.value)):
            dst.weight.copy_(weights[i])
            dst.bias.copy_(biases[i])
        for dst, src in ((bert.attention.output.dense, att.attention.out), (bert.attention.output.LayerNorm, att.norm),
                         (bert.intermediate.dense, ffn.fc1), (bert.output.dense, ffn.fc2),
                         (bert.output.LayerNorm, ffn.norm)):  # fmt: skip
            dst.load_state_dict(src.state_dict())
    g = torch.Generator().manual_seed(0)
    lang, visn = torch.randn(2, 5, h, generator=g), torch.randn(2, 4, h, generator=g)
    keep = torch.ones(2, 9)
    keep[0, 3:5] = 0  # padded tokens
    keep[1, 7:] = 0  # padded regions
    from models.attention import additive_mask

    mask = additive_mask(keep, torch.float32)
    with torch.no_grad():
        out_l, out_v, _ = layer(lang, mask[..., :5], visn, mask[..., 5:])
        ref = bert(torch.cat([lang, visn], 1), attention_mask=mask)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(torch.cat([out_l, out_v], 1), ref, atol=1e-5, rtol=0)


def test_merged_with_equal_stream_weights_equals_single_stream():
    single = build_model(tiny("single_stream", x_layers=1)).eval()
    merged = build_model(tiny("merged", x_layers=1)).eval()
    state = single.state_dict()
    for key, value in list(state.items()):
        if ".att.shared." in key or ".ffn.shared." in key:
            for m in ("lang", "visn"):
                state[key.replace(".shared.", f".{m}.")] = value
            del state[key]
    merged.load_state_dict(state, strict=True)
    batch = make_batch(single.config, tokens=6, regions=5, visual_pad=True)
    with torch.no_grad():
        torch.testing.assert_close(run_model(merged, batch).visn, run_model(single, batch).visn, atol=1e-6, rtol=0)


def test_single_stream_shares_exactly_one_set_of_weights():
    single = build_model(tiny("single_stream", x_layers=1)).lxmert.encoder.cross_layers[0]
    merged = build_model(tiny("merged", x_layers=1)).lxmert.encoder.cross_layers[0]
    # One stream serves both modalities' tokens: the same module object, hence the same tensors.
    assert single.att[single.flow.stream("lang")] is single.att[single.flow.stream("visn")]
    assert single.ffn[single.flow.stream("lang")] is single.ffn[single.flow.stream("visn")]
    ids = {id(p) for p in single.parameters()}
    assert ids == {id(p) for p in single.att["shared"].parameters()} | {id(p) for p in single.ffn["shared"].parameters()}
    n_single = sum(p.numel() for p in single.parameters())
    assert 2 * n_single == sum(p.numel() for p in merged.parameters())
    assert not {id(p) for p in merged.att["lang"].parameters()} & {id(p) for p in merged.att["visn"].parameters()}
    # And it is trained as one: the gradient of a loss on either modality lands on the same tensors.
    layer = single
    lang, visn = torch.randn(2, 4, 32), torch.randn(2, 3, 32)
    out_l, out_v, _ = layer(lang, None, visn, None)
    out_v.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


HIDDEN = {  # flow -> (modality of the queries, modality of the keys it must never see)
    "asymmetric_lang": [("visn", "lang")],
    "asymmetric_visn": [("lang", "visn")],
    "co_attention": [("lang", "lang"), ("visn", "visn")],
    "merged": [],
    "single_stream": [],
}


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
@pytest.mark.parametrize("flow", sorted(HIDDEN))
def test_queries_give_zero_probability_exactly_to_the_keys_their_flow_hides(flow, name):
    cfg = tiny(flow, f"attention.name={name}", *KERNEL_OPTIONS)
    model = build_model(cfg).eval()
    t, r = 7, 5
    batch = make_batch(cfg, tokens=t, regions=r, visual_pad=True)
    with torch.no_grad():
        out = run_model(model, batch, output_attentions=True)
    cols = {"lang": slice(0, t), "visn": slice(t, t + r)}
    for i in range(cfg.x_layers):
        for queries in ("lang", "visn"):
            p = out.attentions[f"cross/{i}/{queries}"]
            assert p.shape == (3, cfg.num_heads, t if queries == "lang" else r, t + r)
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5, rtol=0)
            hidden = [k for q, k in HIDDEN[flow] if q == queries]
            for keys in hidden:
                assert (p[..., cols[keys]] == 0).all(), (flow, queries, keys)
            # Padding is hidden too (text row 0 from t // 2 on; regions of row 1 from r // 2 on).
            assert (p[0, ..., t // 2 : t] == 0).all() and (p[1, ..., t + r // 2 :] == 0).all()
            if name == "softmax":  # softmax gives every visible key some weight (row 2: last token padded)
                visible = {"lang": slice(0, t - 1), "visn": slice(t, t + r)}
                for m in ("lang", "visn"):
                    if m not in hidden:
                        assert (p[2, ..., visible[m]] > 0).all(), (flow, queries, m)


def test_asymmetric_lang_vision_stays_blind_to_language():
    # Beyond the probabilities: in asymmetric_lang (only language queries cross over) the vision
    # output cannot depend on the text at all.
    model = build_model(tiny("asymmetric_lang", l_layers=1, r_layers=1, x_layers=2)).eval()
    batch = make_batch(model.config, tokens=6, regions=4)
    other = dict(batch, input_ids=(batch["input_ids"] * 7 + 3) % model.config.vocab_size)
    with torch.no_grad():
        a, b = run_model(model, batch), run_model(model, other)
    torch.testing.assert_close(a.visn, b.visn, atol=0, rtol=0)
    assert not torch.allclose(a.lang, b.lang)


def test_span_on_merged_keys_measures_distance_inside_a_modality_only():
    cfg = tiny("merged", "attention.name=span", "attention.span_init=0.0", "attention.span_ramp=2",
               l_layers=0, r_layers=0, x_layers=1)  # fmt: skip
    model = build_model(cfg).eval()
    t, r = 6, 5
    batch = make_batch(cfg, tokens=t, regions=r, pad=False)
    with torch.no_grad():
        p = run_model(model, batch, output_attentions=True).attentions
    lang, visn = p["cross/0/lang"], p["cross/0/visn"]
    i = torch.arange(t)
    far = (i[:, None] - i[None, :]).abs() >= 2  # span 0 with ramp 2: m(x) = 0 from x = 2 on
    assert (lang[..., :t][..., far] == 0).all() and (lang[..., :t][..., ~far] > 0).all()
    assert (lang[..., t:] > 0).all()  # no span across the boundary: every region stays visible
    j = torch.arange(r)
    far_v = (j[:, None] - j[None, :]).abs() >= 2
    assert (visn[..., t:][..., far_v] == 0).all() and (visn[..., :t] > 0).all()
    kernel = model.lxmert.encoder.cross_layers[0].att["lang"].attention.kernel
    assert kernel.span.engagement()["reach"] == t - 1


def test_span_is_never_engaged_where_a_flow_has_no_within_modality_keys():
    cfg = tiny("co_attention", "attention.name=span", "attention.span_init=0.0", "attention.stacks=cross",
               l_layers=0, r_layers=0, x_layers=1)  # fmt: skip
    model = build_model(cfg).eval()
    batch = make_batch(cfg, tokens=6, regions=5, pad=False)
    with torch.no_grad():
        run_model(model, batch)
    eng = hooks.engagement(model)["span"]
    assert eng["engaged"] is False and eng["sites"] == 2


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
@pytest.mark.parametrize("flow", FLOWS)
def test_every_normaliser_trains_in_every_flow(flow, name):
    cfg = tiny(flow, f"attention.name={name}", *KERNEL_OPTIONS, x_layers=2)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = make_batch(cfg, tokens=8, regions=5, visual_pad=True)
    out = run_model(model, batch)
    loss = out.logits.logsumexp(-1).mean() + out.visn.square().mean() + hooks.aux_loss(model)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    if name != "softmax":
        stat = "alpha" if "entmax" in name else "span"
        stats = hooks.collect_stats(model)
        streams = ("cross",) if flow == "modality_specific" else ("shared",) if flow == "single_stream" else ("lang", "visn")
        for s in streams:
            assert len(stats[f"cross/1/{s}/{stat}"]) == cfg.num_heads
    hooks.post_step(model)


@pytest.mark.parametrize("flow", FLOWS)
def test_params_and_flops_per_flow_match_the_built_model_and_pytorchs_counter(flow):
    cfg = tiny(flow, "attention.name=span_entmax", l_layers=1, r_layers=2, x_layers=3)
    model = build_model(cfg).eval()
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    batch = make_batch(cfg, batch=2, tokens=7, regions=5, pad=False)
    with FlopCounterMode(display=False) as counter:
        run_model(model, batch, output_attentions=True)
    assert counter.get_total_flops() / 2 == flops_per_sample(cfg, n_tokens=7, n_regions=5)


def test_flow_costs_at_lxmert_base_size():
    base = lxmert_base()
    assert count_params(base) == 213_930_297 and flops_per_sample(base, 20, 36) == pytest.approx(10.59e9, rel=1e-3)
    merged, single = lxmert_base("flow=merged"), lxmert_base("flow=single_stream")
    # LXMERT's cross layer: 3 attention blocks + 2 feed-forwards; a merged layer: 2 + 2; single-stream: 1 + 1.
    attention = 4 * (768 * 768 + 768) + 2 * 768  # q, k, v, output projection, LayerNorm: 2,363,904
    ffn = 2 * 768 * 3072 + 3072 + 768 + 2 * 768  # 4,723,968
    assert count_params(base) - count_params(merged) == 5 * attention
    assert count_params(merged) - count_params(single) == 5 * (attention + ffn)
    assert flops_per_sample(merged, 20, 36) == flops_per_sample(single, 20, 36)
    for flow in FLOW_LAYERS:
        assert flops_per_sample(lxmert_base(f"flow={flow}"), 20, 36) == flops_per_sample(merged, 20, 36)
    mixed = lxmert_base("flow=mixed", "flow_merged_from=2")
    assert flops_per_sample(mixed, 20, 36) == pytest.approx(
        (2 * flops_per_sample(base, 20, 36) + 3 * flops_per_sample(merged, 20, 36)) / 5, rel=1e-12)
    # LayerDrop over a mixed fusion stack: each of its 5 layers runs in 4 of 5 training steps.
    ld = lxmert_base("flow=mixed", "flow_merged_from=2", "layerdrop.mode=fixed", "layerdrop.n_drop=1")
    assert flop_count(ld, training=True).cross == pytest.approx(0.8 * flop_count(ld).cross, rel=1e-12)
    every_other = lxmert_base("flow=mixed", "flow_merged_from=2", "layerdrop.eval=every_other")
    kept = flop_count(every_other).cross  # layers 0, 2 and 4 run: one LXMERT layer, two merged
    per = {"x": flop_count(base).cross / 5, "m": flop_count(merged).cross / 5}
    assert kept == pytest.approx(per["x"] + 2 * per["m"], rel=1e-12)
    assert 0 < layerdrop_saving(ld) < 1


def test_flow_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="flow='volta'.*valid"):
        lxmert_tiny("flow=volta")
    with pytest.raises(ConfigError, match="flow_merged_from=1 applies to flow=mixed only"):
        lxmert_tiny("flow=merged", "flow_merged_from=1")
    with pytest.raises(ConfigError, match=r"flow_merged_from=3 must lie in \[0, x_layers=2\]"):
        lxmert_tiny("flow=mixed", "flow_merged_from=3")
    with pytest.raises(ConfigError, match="cross/cross.*flow='merged' has none"):
        lxmert_tiny("flow=merged", "attention.stacks=cross/cross")
    with pytest.raises(ConfigError, match="cross/lang.*flow='single_stream' has none"):
        lxmert_tiny("flow=single_stream", "attention.stacks=cross/lang")
    with pytest.raises(ConfigError, match="cross/visn.*flow='modality_specific' has none"):
        lxmert_tiny("attention.stacks=cross/visn")
    lxmert_tiny("flow=mixed", "flow_merged_from=1", "attention.stacks=cross/cross,cross/lang")  # both kinds present


def test_attention_stacks_select_a_flow_layers_streams():
    model = build_model(tiny("merged", "attention.name=entmax", "attention.stacks=cross/visn"))
    kinds = {hooks.site_of(n): type(m).__name__ for n, m in model.named_modules() if n.endswith("kernel")}
    assert kinds["cross/0/visn"] == "EntmaxAttention" and kinds["cross/0/lang"] == "SoftmaxAttention"
    mixed = build_model(tiny("mixed", "attention.name=span", "attention.stacks=cross/cross"))
    kinds = {hooks.site_of(n): type(m).__name__ for n, m in mixed.named_modules() if n.endswith("kernel")}
    assert kinds["cross/0/cross"] == "AdaptiveSpanAttention" and kinds["cross/1/lang"] == "SoftmaxAttention"


def test_mixed_puts_lxmert_layers_first_and_prunes_consistently():
    cfg = lxmert_tiny("flow=mixed", "flow_merged_from=2", x_layers=4)
    model = build_model(cfg).eval()
    kinds = [type(layer).__name__ for layer in model.lxmert.encoder.cross_layers]
    assert kinds == ["CrossLayer", "CrossLayer", "FlowLayer", "FlowLayer"]
    small = prune(model, {"cross": [1, 2, 3]})
    assert small.config.x_layers == 3 and small.config.flow_merged_from == 1
    rebuilt = build_model(small.config)
    assert [type(layer).__name__ for layer in rebuilt.lxmert.encoder.cross_layers] == ["CrossLayer", "FlowLayer", "FlowLayer"]
    rebuilt.load_state_dict(small.state_dict())


def test_flow_models_round_trip_natively_and_refuse_lxmert_weights_by_name():
    cfg = tiny("asymmetric_visn", "attention.name=span")
    a, b = build_model(cfg).eval(), build_model(cfg).eval()
    report = load_pretrained(b, a.state_dict(), verbose=False)
    assert report.complete
    batch = make_batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(run_model(a, batch).logits, run_model(b, batch).logits, atol=0, rtol=0)
    from models.checkpoint import to_hf_state_dict

    lxmert_weights = to_hf_state_dict(build_model(lxmert_tiny()))
    with pytest.raises(CheckpointError, match=r"no checkpoint mapping .*cross_layers\.0\.att\.lang"):
        load_pretrained(build_model(cfg), lxmert_weights, verbose=False)


def test_flow_layer_refuses_streams_that_do_not_match_its_flow():
    cfg = lxmert_tiny()
    from models.builders import attention_block, feed_forward

    with pytest.raises(ValueError, match="needs attention streams"):
        FlowLayer(FLOW_LAYERS["single_stream"], torch.nn.ModuleDict({"lang": attention_block(cfg, "cross", "lang", "lang")}),
                  torch.nn.ModuleDict({"shared": feed_forward(cfg)}))  # fmt: skip


@pytest.mark.parametrize("flow", ["modality_specific", "merged"])
def test_contrastive_head_reads_the_single_modality_states(flow):
    cfg = tiny(flow, l_layers=1, r_layers=1, x_layers=1)
    model = lxmert_pretraining(cfg, ("match", "contrastive"), num_object_labels=3, num_attr_labels=3,
                               num_qa_answers=3).eval()  # fmt: skip
    batch = make_batch(cfg, tokens=6, regions=4, visual_pad=True)
    with torch.no_grad():
        out = run_model(model, batch)
        lang, visn = model.lxmert.encode_unimodal(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                                  batch["visual_feats"], batch["visual_pos"],
                                                  batch["visual_attention_mask"])  # fmt: skip
    head = model.heads["contrastive"]
    keep = batch["attention_mask"].float().unsqueeze(-1)  # the mean over real tokens / regions, by hand
    text = torch.nn.functional.normalize(head.text((lang * keep).sum(1) / keep.sum(1)), dim=-1)
    vkeep = batch["visual_attention_mask"].float().unsqueeze(-1)
    image = torch.nn.functional.normalize(head.image((visn * vkeep).sum(1) / vkeep.sum(1)), dim=-1)
    torch.testing.assert_close(out.contrastive["text"], text, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.contrastive["image"], image, atol=1e-6, rtol=0)
    assert torch.allclose(out.contrastive["text"].norm(dim=-1), torch.ones(3))
    assert float(out.contrastive["scale"]) == pytest.approx(1 / 0.07)
    # The text embedding does not depend on the image it was paired with.
    other = dict(batch, visual_feats=batch["visual_feats"].flip(0))
    with torch.no_grad():
        torch.testing.assert_close(run_model(model, other).contrastive["text"], out.contrastive["text"], atol=0, rtol=0)


def test_learned_temperature_is_clamped_after_a_step():
    model = lxmert_pretraining(lxmert_tiny(), ("contrastive",), num_object_labels=3, num_attr_labels=3,
                               num_qa_answers=3, contrastive_temperature=0.05)  # fmt: skip
    head = model.heads["contrastive"]
    with torch.no_grad():
        head.log_scale.fill_(10.0)
    hooks.post_step(model)
    assert float(head.scale().detach()) == pytest.approx(100.0)
    fixed = lxmert_pretraining(lxmert_tiny(), ("contrastive",), num_object_labels=3, num_attr_labels=3,
                               num_qa_answers=3, contrastive_learn_temperature=False)  # fmt: skip
    assert "heads.contrastive.log_scale" not in dict(fixed.named_parameters())
    assert "heads.contrastive.log_scale" in fixed.state_dict()


def test_dataclass_round_trip_keeps_the_flow():
    from models import from_flat_dict, to_flat_dict

    cfg = lxmert_tiny("flow=mixed", "flow_merged_from=1")
    flat = {k: str(v) for k, v in to_flat_dict(cfg).items()}
    assert flat["flow"] == "mixed" and flat["flow_merged_from"] == "1"
    assert from_flat_dict(flat) == cfg
    assert dataclasses.replace(cfg, flow="merged", flow_merged_from=0).flow == "merged"
