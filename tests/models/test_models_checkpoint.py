"""Weight import: strict, reported, never silent; exact HuggingFace round trips; original LXMERT files."""

import pytest
import torch
from models_testutils import hf_qa_model, make_batch, run_model

from models import build_model, lxmert_tiny
from models.checkpoint import (
    CheckpointError,
    answer_map_from_labels,
    config_from_hf,
    load_pretrained,
    save_hf,
    to_hf_state_dict,
)


@pytest.fixture(scope="module")
def hf():
    """A random HF LxmertForQuestionAnswering at the tiny 2-2-2 config (12 answers)."""
    return hf_qa_model(lxmert_tiny(num_answers=12), seed=3)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_round_trip_through_the_huggingface_format_is_exact(tmp_path):
    import transformers

    ours = build_model(lxmert_tiny(num_answers=12)).eval()
    # ours -> HF state dict -> HF model (strict) -> save_pretrained -> ours again
    hf = transformers.LxmertForQuestionAnswering(transformers.LxmertConfig(**_hf_kwargs(ours.config))).eval()
    hf.load_state_dict(to_hf_state_dict(ours, task_model=True), strict=True)
    hf.save_pretrained(tmp_path / "hf")
    back = build_model(config_from_hf(tmp_path / "hf")).eval()
    report = load_pretrained(back, tmp_path / "hf", verbose=False)
    assert report.complete and report.format == "hf"
    original = params(ours)
    assert all(torch.equal(p, original[n]) for n, p in back.named_parameters())
    # and our own writer produces a directory HF loads without missing or unexpected keys
    save_hf(ours, tmp_path / "ours")
    hf2, info = transformers.LxmertForQuestionAnswering.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = make_batch(ours.config)
    with torch.no_grad():
        ref = hf2.eval()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            visual_feats=batch["visual_feats"], visual_pos=batch["visual_pos"],
        ).question_answering_score  # fmt: skip
        assert torch.equal(run_model(back, batch).logits, run_model(ours, batch).logits)
    torch.testing.assert_close(ref, run_model(ours, batch).logits, atol=1e-5, rtol=0)


def _hf_kwargs(cfg):
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, l_layers=cfg.l_layers, x_layers=cfg.x_layers,
        r_layers=cfg.r_layers, visual_feat_dim=cfg.visual_feat_dim,
        max_position_embeddings=cfg.max_position_embeddings, num_qa_labels=cfg.num_answers,
    )  # fmt: skip


def test_missing_layer_is_refused_naming_the_keys_and_the_model_is_untouched(hf):
    state = {k: v for k, v in hf.state_dict().items() if ".encoder.layer.0." not in k}
    ours = build_model(lxmert_tiny(num_answers=12))
    before = params(ours)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(ours, state, allow_fresh=True)
    msg = str(err.value)
    assert "lxmert.encoder.lang_layers.0.self_att.attention.qkv.weight" in msg
    assert "encoder.layer.0.attention.self.query.weight" in msg  # the key it looked for
    assert set(err.value.report.missing) == {n for n in before if ".lang_layers.0." in n}
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())


def test_missing_last_layer_of_a_directory_is_missing_not_fresh(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".x_layers.1." not in k}, tmp_path / "model.safetensors")
    ours = build_model(lxmert_tiny(num_answers=12))
    with pytest.raises(CheckpointError, match="cross_layers.1.cross_att.attention.qkv.weight") as err:
        load_pretrained(ours, tmp_path, allow_fresh=True)  # config.json says x_layers=2
    assert err.value.report.missing and not err.value.report.fresh
    # A bare state dict cannot tell a missing last layer from a shallower checkpoint: it is fresh,
    # which strict mode refuses unless allow_fresh=True.
    with pytest.raises(CheckpointError, match="cross_layers.1"):
        load_pretrained(ours, {k: v for k, v in hf.state_dict().items() if ".x_layers.1." not in k})


def test_renamed_layers_like_the_papers_layerdrop_wrapper_are_refused(hf):
    # The paper's LayerDrop wrapper renamed encoder.layer.N.* to encoder.layer.N.layer.*: every key of
    # the encoder stacks goes unused and every layer is missing. Even allow_fresh does not accept it.
    state = {k.replace(".layer.0.", ".layer.0.layer."): v for k, v in hf.state_dict().items()}
    ours = build_model(lxmert_tiny(num_answers=12))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(ours, state, allow_fresh=True)
    assert "lxmert.encoder.layer.0.layer.attention.self.query.weight" in str(err.value)  # unexpected
    assert "lxmert.encoder.lang_layers.0.ffn.fc1.weight" in str(err.value)  # missing
    report = load_pretrained(ours, state, strict=False, verbose=False)  # explicit: apply what matches
    assert report.applied and len(report.missing) == 12 and len(report.unexpected) == 16


def test_import_into_a_deeper_model_loads_every_counterpart_and_reports_fresh_layers(hf):
    deeper = build_model(lxmert_tiny(num_answers=12, l_layers=3, x_layers=3, r_layers=3))
    with pytest.raises(CheckpointError, match="lang_layers.2"):
        load_pretrained(deeper, hf.state_dict())
    before = params(deeper)
    report = load_pretrained(deeper, hf.state_dict(), allow_fresh=True, verbose=False)
    assert report.fresh_components() == ["cross.2", "lang.2", "visn.2"]
    assert not report.missing and not report.unexpected and not report.shape_mismatch
    source = hf.state_dict()
    got = dict(deeper.named_parameters())
    assert torch.equal(got["lxmert.encoder.cross_layers.1.cross_att.attention.out.weight"],
                       source["lxmert.encoder.x_layers.1.visual_attention.output.dense.weight"])  # fmt: skip
    assert torch.equal(got["lxmert.encoder.visn_layers.2.ffn.fc1.weight"], before["lxmert.encoder.visn_layers.2.ffn.fc1.weight"])
    assert "fresh (no counterpart, initialised anew): cross.2, lang.2, visn.2" in str(report)


def test_layerdrop_and_adaptive_models_import_every_tensor(hf):
    for overrides in (["layerdrop.mode=fixed"], ["attention.name=span_entmax", "layerdrop.mode=prob", "layerdrop.p=0.2"]):
        model = build_model(lxmert_tiny(*overrides, num_answers=12))
        report = load_pretrained(model, hf.state_dict(), verbose=False)
        assert report.complete and not report.fresh
        assert len(report.loaded) + len(report.kernel) == len(list(model.parameters()))


def test_encoder_only_checkpoint_needs_allow_fresh_for_the_head(hf):
    encoder = {k.removeprefix("lxmert."): v for k, v in hf.state_dict().items() if k.startswith("lxmert.")}
    model = build_model(lxmert_tiny(num_answers=5))
    with pytest.raises(CheckpointError, match="head.fc1.weight"):
        load_pretrained(model, encoder)
    report = load_pretrained(model, encoder, allow_fresh=True, verbose=False)
    assert report.fresh_components() == ["head"]


def test_original_lxmert_pth_files(hf, tmp_path):
    # The original pretraining checkpoint: DataParallel 'module.' + 'bert.' encoder, pretraining heads.
    state = {}
    for key, value in hf.state_dict().items():
        key = key.replace("lxmert.", "bert.", 1) if key.startswith("lxmert.") else key
        state["module." + key] = value
    state["module.bert.embeddings.LayerNorm.gamma"] = state.pop("module.bert.embeddings.LayerNorm.weight")
    state["module.cls.predictions.bias"] = torch.zeros(64)
    state["module.obj_predict_head.decoder_dict.obj.weight"] = torch.zeros(3, 32)
    state["module.bert.embeddings.position_ids"] = torch.arange(32)[None]  # a buffer older HF versions saved
    path = tmp_path / "Epoch20_LXRT.pth"
    torch.save(state, path)
    model = build_model(lxmert_tiny(num_answers=12))
    report = load_pretrained(model, path, verbose=False)
    assert report.format == "original" and report.complete
    assert sorted(report.ignored) == [
        "module.bert.embeddings.position_ids", "module.cls.predictions.bias", "module.obj_predict_head.decoder_dict.obj.weight"
    ]  # fmt: skip
    # The fine-tuned VQA model of the original code: lxrt_encoder.model.bert.* and logit_fc.*
    vqa = {("lxrt_encoder.model.bert." + k[7:] if k.startswith("lxmert.") else k.replace("answer_head.", "")): v
           for k, v in hf.state_dict().items()}  # fmt: skip
    model2 = build_model(lxmert_tiny(num_answers=12))
    assert load_pretrained(model2, vqa, verbose=False).complete
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_answer_head_from_the_pretraining_qa_head_through_an_answer_map(hf):
    old = [f"a{i}" for i in range(12)]
    new = ["a3", "a7", "a0", "zebra", "a11"]
    amap = answer_map_from_labels(new, old)
    assert amap == {0: 3, 1: 7, 2: 0, 4: 11}
    model = build_model(lxmert_tiny(num_answers=5))
    with pytest.raises(CheckpointError, match=r"head.fc2.weight: checkpoint \(12, 64\) vs model \(5, 64\)"):
        load_pretrained(model, hf.state_dict())
    fresh_row = model.head.fc2.weight[3].detach().clone()
    report = load_pretrained(model, hf.state_dict(), answer_map=amap, verbose=False)
    assert report.partial == {"head.fc2.weight": "4/5 rows", "head.fc2.bias": "4/5 rows"}
    src_w = hf.state_dict()["answer_head.logit_fc.3.weight"]
    for ours, theirs in amap.items():
        assert torch.equal(model.head.fc2.weight[ours], src_w[theirs])
    assert torch.equal(model.head.fc2.weight[3], fresh_row)
    assert torch.equal(model.head.fc1.weight, hf.state_dict()["answer_head.logit_fc.0.weight"])


def test_unexpected_keys_and_head_count_mismatch_are_refused(hf, tmp_path):
    state = dict(hf.state_dict())
    state["lxmert.encoder.extra.weight"] = torch.zeros(1)
    model = build_model(lxmert_tiny(num_answers=12))
    with pytest.raises(CheckpointError, match="unexpected: lxmert.encoder.extra.weight"):
        load_pretrained(model, state)
    assert load_pretrained(model, state, allow=["*.extra.*"], verbose=False).applied
    hf.save_pretrained(tmp_path)
    two_heads = build_model(lxmert_tiny(num_answers=12, num_heads=2))  # same shapes, different heads
    with pytest.raises(CheckpointError, match="num_attention_heads=4"):
        load_pretrained(two_heads, tmp_path)


def test_native_state_dicts_restore_kernel_parameters_across_layerdrop_settings():
    src = build_model(lxmert_tiny("attention.name=span", "attention.span_init=0.3"))
    dst = build_model(lxmert_tiny("attention.name=span", "layerdrop.mode=fixed"))
    report = load_pretrained(dst, src.state_dict(), verbose=False)
    assert report.format == "native" and report.complete and not report.kernel
    assert all(torch.equal(a, b) for a, b in zip(src.parameters(), dst.parameters()))
    # A span checkpoint into a softmax model: the z values would be lost, so they are unexpected.
    with pytest.raises(CheckpointError, match="kernel.span.z"):
        load_pretrained(build_model(lxmert_tiny()), src.state_dict())
