"""LXMERT's pretraining heads: HuggingFace parity, strict import both ways, encoder transfer to VQA."""

import pytest
import torch
from models_testutils import hf_config, make_batch, run_model

from models import LXMERT_PRETRAIN_HEADS, ConfigError, build_model, lxmert_pretraining, lxmert_tiny
from models.checkpoint import CheckpointError, load_pretrained, to_hf_state_dict

LABELS = dict(num_object_labels=5, num_attr_labels=7, num_qa_answers=12)


def hf_pretraining(cfg, seed: int = 0):
    import transformers

    transformers.logging.set_verbosity_error()
    hc = hf_config(cfg)
    hc.num_object_labels, hc.num_attr_labels, hc.num_qa_labels = 5, 7, 12
    torch.manual_seed(seed)
    return transformers.LxmertForPreTraining(hc).eval()


@pytest.fixture(scope="module")
def hf():
    return hf_pretraining(lxmert_tiny(num_answers=12), seed=1)


def test_builder_makes_the_heads_asked_for_and_refuses_unknown_ones():
    cfg = lxmert_tiny()
    model = lxmert_pretraining(cfg, ("mlm", "match"), **LABELS)
    assert list(model.heads) == ["mlm", "match"]
    assert not any(n.startswith("heads.mor") for n, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="unknown"):
        lxmert_pretraining(cfg, ("mlm", "caption"), **LABELS)
    batch = make_batch(cfg)
    with pytest.raises(ValueError, match="no pretraining head"):
        run_model(model, batch, heads=("qa",))
    # the encoder is named exactly as in the VQA model, so state dicts line up
    vqa_names = {n for n in build_model(cfg).state_dict() if n.startswith("lxmert.")}
    assert vqa_names == {n for n in model.state_dict() if n.startswith("lxmert.")}


def test_outputs_equal_huggingface_lxmert_for_pretraining(hf):
    cfg = lxmert_tiny(num_answers=12)
    ours = lxmert_pretraining(cfg, **LABELS).eval()
    report = load_pretrained(ours, hf.state_dict(), verbose=False)
    assert report.complete and report.ignored == ["cls.predictions.decoder.weight"]  # the tie
    batch = make_batch(cfg)
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch["token_type_ids"], visual_feats=batch["visual_feats"],
                 visual_pos=batch["visual_pos"])  # fmt: skip
        visn = hf.lxmert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         visual_feats=batch["visual_feats"], visual_pos=batch["visual_pos"]).vision_output  # fmt: skip
        ref_obj = hf.obj_predict_head(visn)
        out = run_model(ours, batch)
    torch.testing.assert_close(out.mlm, ref.prediction_logits.reshape(-1, cfg.vocab_size), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.match, ref.cross_relationship_score, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.qa, ref.question_answering_score, atol=1e-5, rtol=0)
    for key in ("obj", "attr", "feat"):
        torch.testing.assert_close(out.mor[key], ref_obj[key].reshape(-1, ref_obj[key].shape[-1]), atol=1e-5, rtol=0)
    # masks select the positions the losses read, in row-major order (GEMM rounding differs by row count)
    mlm_mask = batch["attention_mask"].bool() & (torch.arange(7) % 2 == 0)
    region_mask = torch.zeros(3, 5, dtype=torch.bool)
    region_mask[1, 2] = region_mask[2, 0] = True
    with torch.no_grad():
        part = run_model(ours, batch, mlm_mask=mlm_mask, region_mask=region_mask)
    torch.testing.assert_close(part.mlm, out.mlm.reshape(3, 7, -1)[mlm_mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(part.mor["feat"], out.mor["feat"].reshape(3, 5, -1)[region_mask], atol=1e-6, rtol=0)


def test_export_loads_into_huggingface_strictly_and_back_exactly():
    import transformers

    cfg = lxmert_tiny(num_answers=12)
    ours = lxmert_pretraining(cfg, **LABELS)
    hf = hf_pretraining(cfg)
    assert isinstance(hf, transformers.LxmertForPreTraining)
    hf.load_state_dict(to_hf_state_dict(ours, task_model=True), strict=True)
    back = lxmert_pretraining(cfg, **LABELS)
    assert load_pretrained(back, hf.state_dict(), verbose=False).complete
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), back.parameters()))


def test_original_lxrt_pretraining_file_loads_every_head(hf, tmp_path):
    state = {}
    for key, value in hf.state_dict().items():
        key = "bert." + key[len("lxmert."):] if key.startswith("lxmert.") else key
        state["module." + key] = value
    path = tmp_path / "Epoch20_LXRT.pth"
    torch.save(state, path)
    ours = lxmert_pretraining(lxmert_tiny(num_answers=12), **LABELS)
    report = load_pretrained(ours, path, verbose=False)
    assert report.format == "original" and report.complete
    assert torch.equal(ours.heads["mor"].attr.weight, hf.obj_predict_head.decoder_dict["attr"].weight)
    assert torch.equal(ours.heads["qa"].fc2.bias, hf.answer_head.logit_fc[3].bias)


def test_an_untied_mlm_decoder_is_refused_not_dropped(hf):
    state = dict(hf.state_dict())
    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1.0
    ours = lxmert_pretraining(lxmert_tiny(num_answers=12), **LABELS)
    with pytest.raises(CheckpointError, match="unexpected: cls.predictions.decoder.weight"):
        load_pretrained(ours, state)


def test_a_checkpoint_without_some_heads_reports_them_fresh(hf):
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("obj_predict_head.")}
    ours = lxmert_pretraining(lxmert_tiny(num_answers=12), **LABELS)
    with pytest.raises(CheckpointError, match="heads.mor.feat.weight"):
        load_pretrained(ours, state)
    report = load_pretrained(ours, state, allow=["heads.mor.*"], verbose=False)
    assert report.fresh_components() == ["heads.mor"] and not report.missing


def test_pretrained_encoder_transfers_to_vqa_strictly_with_a_report():
    cfg = lxmert_tiny(num_answers=6)
    pre = lxmert_pretraining(cfg, **LABELS).eval()
    vqa = build_model(cfg).eval()
    with pytest.raises(CheckpointError, match="head.fc1.weight"):
        load_pretrained(vqa, pre.state_dict())  # the fresh answer head must be allowed explicitly
    report = load_pretrained(vqa, pre.state_dict(), allow=["head.*"], verbose=False)
    assert report.fresh_components() == ["head"]
    assert not report.missing and not report.unexpected and not report.shape_mismatch
    assert {k.split(".")[1] for k in report.ignored} == set(LXMERT_PRETRAIN_HEADS)
    assert "ignored pretraining heads: heads.match, heads.mlm, heads.mor, heads.qa" in str(report)
    assert len(report.loaded) == sum(1 for n, _ in vqa.named_parameters() if n.startswith("lxmert."))
    batch = make_batch(cfg)
    with torch.no_grad():
        a, b = run_model(pre, batch, heads=()), run_model(vqa, batch)
    assert torch.equal(a.lang, b.lang) and torch.equal(a.pooled, b.pooled)
    # HF pretraining weights into a VQA model: the heads are ignored, the QA head maps to the answer head
    hf = hf_pretraining(lxmert_tiny(num_answers=12))
    report = load_pretrained(build_model(lxmert_tiny(num_answers=12)), hf.state_dict(), verbose=False)
    assert report.complete and all(k.startswith(("cls.", "obj_predict_head.")) for k in report.ignored)


def test_every_parameter_gets_a_gradient_when_every_head_runs():
    cfg = lxmert_tiny()
    model = lxmert_pretraining(cfg, **LABELS)
    out = run_model(model, make_batch(cfg))
    total = out.mlm.sum() + out.match.sum() + out.qa.sum() + sum(v.sum() for v in out.mor.values())
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # as in LXMERT, the last cross layer's vision branch feeds only the object head, which reads visn: all used
    assert no_grad == [], no_grad
