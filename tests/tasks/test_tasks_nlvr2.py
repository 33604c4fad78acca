"""NLVR2 in LXMERT's files: pair batches, bad input, accuracy / consistency / results against
hand-computed cases, the pair encoding (one batched forward, symmetric under swapping the images
and the head's halves), one smoke epoch, the synthetic data folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_thread
from tasks_fixtures import write_json

from tasks import DataConfig, load, prepare
from tasks.nlvr2 import metrics as nlvr2_metrics
from tasks.nlvr2 import synthetic
from tasks.nlvr2.model import pair_forward, pair_loss, swap_images
from tasks.vqa import convert

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_thread)


def cfg_for(root: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(name="nlvr2", root=str(root), cache_dir=str(cache), **kw)


def test_pair_batches_carry_both_images(nlvr2_root, tmp_path):
    root, truth = nlvr2_root
    data = load(cfg_for(root, tmp_path / "cache", train_splits="train,valid", eval_split="test"))
    assert data.answers == ["False", "True"] and data.num_regions == 4 and data.visual_feat_dim == 16
    assert len(data.train) == 20 and len(data.eval) == 10
    examples = {e["identifier"]: e for s in truth["examples"].values() for e in s}
    seen = set()
    for ds in (data.train, data.eval):
        # train spans two feature stores (train, valid): the gather handles pairs from both
        for batch in ds.batches(6, shuffle=True, seed=2):
            assert batch["visual_feats"].shape[1:] == (2, 4, 16) and batch["visual_pos"].shape[1:] == (2, 4, 4)
            for i, ident in enumerate(ds.source_id_of(batch["question_id"])):
                e = examples[ident]
                seen.add(ident)
                for k, img in enumerate((e["img0"], e["img1"])):
                    h, w, boxes, feats = truth["features"][img]
                    np.testing.assert_array_equal(batch["visual_feats"][i, k].numpy(), feats)
                    np.testing.assert_allclose(batch["visual_pos"][i, k].numpy(), boxes / [w, h, w, h], rtol=1e-6)
                assert batch["targets"][i].tolist() == ([0.0, 1.0] if e["label"] == 1 else [1.0, 0.0])
                assert ds.question_text(int(batch["question_id"][i])) == e["sent"]
    assert seen == set(examples)
    assert data.summary["train.images"] == 24  # 12 images per split file, pairs counted by image
    stores = sorted(p.name for p in (tmp_path / "cache/vqa/features").iterdir() if not p.name.endswith(".lock"))
    assert stores == ["nlvr2_imgfeat.test_obj36", "nlvr2_imgfeat.train_obj36", "nlvr2_imgfeat.valid_obj36"]


def test_missing_files_named_with_their_source(nlvr2_root, tmp_path):
    root, _ = nlvr2_root
    (root / "nlvr2/valid.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"nlvr2/valid\.json: .*nlvr2/data/dev\.json of https://github\.com/lil-lab/nlvr.*process_dataset\.py"):
        prepare(cfg_for(root, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()
    (root / "nlvr2_imgfeat/test_obj36.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_obj36\.tsv: .*lxmert_data/nlvr2_imgfeat/test_obj36\.zip"):
        prepare(cfg_for(root, tmp_path / "cache", eval_split="test"))


@pytest.mark.parametrize(
    ("index", "change", "message"),
    [
        (3, {"label": 2}, r"label must be 0 \(False\) or 1 \(True\), got 2"),
        (1, {"label": "True"}, r"label must be 0 \(False\) or 1 \(True\), got 'True'"),
        (4, {"img1": None}, r"img1 must be a non-empty string, got None"),
        (0, {"uid": 7}, r"uid must be a string"),
    ],
)
def test_wrong_format_entry_is_refused_naming_file_and_entry(nlvr2_root, tmp_path, index, change, message):
    root, truth = nlvr2_root
    entries = [dict(e) for e in truth["examples"]["train"]]
    entries[index].update(change)
    write_json(root / "nlvr2/train.json", entries)
    path = root / "nlvr2/train.json"
    with pytest.raises(ValueError, match=rf"{path}: entry {index} \(identifier='{entries[index]['identifier']}'\): {message}"):
        prepare(cfg_for(root, tmp_path / "cache"))
    del entries[index]["identifier"]
    write_json(path, entries)
    with pytest.raises(ValueError, match=rf"{path}: entry {index} \(identifier=None\): lacks 'identifier'"):
        prepare(cfg_for(root, tmp_path / "cache"))


def test_conversion_through_prepare_resumes_after_interruption(nlvr2_root, tmp_path, monkeypatch):
    root, truth = nlvr2_root
    cache = tmp_path / "cache"
    monkeypatch.setattr(convert, "CHECKPOINT_ROWS", 4)
    real = convert.parse_row
    calls = {"n": 0}

    def interrupted(line, path, line_no):
        calls["n"] += 1
        if calls["n"] == 11:  # 1 call sizes the arrays; killed while converting image 10 of train_obj36
            raise KeyboardInterrupt
        return real(line, path, line_no)

    monkeypatch.setattr(convert, "parse_row", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg_for(root, cache))
    partial = cache / "vqa/features/nlvr2_imgfeat.train_obj36.partial"
    assert json.loads((partial / "progress.json").read_text())["rows"] == 8
    monkeypatch.setattr(convert, "parse_row", real)
    data = load(cfg_for(root, cache))
    assert not partial.exists()
    examples = {e["identifier"]: e for e in truth["examples"]["train"]}
    batch = data.train.get_batch(np.arange(len(data.train)))
    for i, ident in enumerate(data.train.source_id_of(batch["question_id"])):
        for k, img in enumerate((examples[ident]["img0"], examples[ident]["img1"])):
            np.testing.assert_array_equal(batch["visual_feats"][i, k].numpy(), truth["features"][img][3])


def test_image_limit_keeps_pairs_whose_both_images_are_loaded(nlvr2_root, tmp_path):
    root, _ = nlvr2_root
    data = load(cfg_for(root, tmp_path / "cache", image_limit=4))  # images of pairs 0 and 1 of set 100
    assert sorted(data.train.source_id_of(data.train.question_ids)) == [
        "train-100-0-0", "train-100-0-1", "train-100-1-0", "train-100-1-1"]  # fmt: skip
    assert data.summary["outside_image_limit"] == 12


def test_consistency_groups_by_sentence_as_the_official_script():
    assert nlvr2_metrics.sentence_key("dev-850-0-0") == nlvr2_metrics.sentence_key("dev-850-2-0") == "dev-850--0"
    assert nlvr2_metrics.sentence_key("dev-850-0-1") == "dev-850--1"  # another sentence of set 850
    assert nlvr2_metrics.sentence_key("test1-12-3-1") == "test1-12--1"
    assert nlvr2_metrics.sentence_key("nlvr2_dev_7") is None
    # set 850: sentence 0 on pairs 0, 2, 3 (all right), sentence 1 on pairs 0, 1 (one wrong);
    # set 851: sentence 0 on pair 0 (wrong)
    ids = ["dev-850-0-0", "dev-850-2-0", "dev-850-3-0", "dev-850-0-1", "dev-850-1-1", "dev-851-0-0"]
    report = nlvr2_metrics.score(ids, [True, True, True, True, False, False])
    assert report.accuracy == pytest.approx(100 * 4 / 6)
    assert report.consistency == pytest.approx(100 * 1 / 3) and report.sentences == 3
    assert report.to_flat("eval/") == {"eval/acc": pytest.approx(66.6667, abs=1e-3), "eval/consistency": pytest.approx(33.3333, abs=1e-3)}
    no_sentences = nlvr2_metrics.score(["a", "b"], [True, False])
    assert no_sentences.consistency is None and no_sentences.to_flat() == {"acc": 50.0}


def test_evaluate_and_results_file_on_a_dataset(nlvr2_root, tmp_path):
    root, truth = nlvr2_root
    ev = load(cfg_for(root, tmp_path / "cache")).eval  # valid = NLVR2 dev
    entries = truth["examples"]["valid"]
    labels = {e["identifier"]: e["label"] for e in entries}
    qids = ev.question_ids
    idents = ev.source_id_of(qids)
    # right everywhere except the example dev-100-1-1: accuracy 9/10; sentences: (100, 0), (100, 1),
    # (101, 0), (101, 1): only (100, 1) has a wrong example -> 3/4 consistent
    pred = [labels[i] if i != "dev-100-1-1" else 1 - labels[i] for i in idents]
    report = nlvr2_metrics.evaluate(ev, qids, torch.tensor(pred))
    assert (report.accuracy, report.consistency, report.n, report.sentences) == (90.0, 75.0, 10, 4)
    logits = torch.nn.functional.one_hot(torch.tensor(pred), 2).float() * 3 - 1
    assert nlvr2_metrics.evaluate(ev, qids, logits).accuracy == 90.0
    path = nlvr2_metrics.write_results(tmp_path / "out/valid_predict.csv", ev, qids, logits)
    want = "".join(f"{i},{'True' if p == 1 else 'False'}\n" for i, p in zip(idents, pred))
    assert path.read_text() == want and path.read_text().splitlines()[0] in ("dev-100-0-0,False", "dev-100-0-0,True")
    with pytest.raises(ValueError, match="predicted twice"):
        nlvr2_metrics.results_lines(ev, np.r_[qids, qids[:1]], [*pred, pred[0]])


# ------------------------------------------------------------------------------ pair encoding
@pytest.fixture
def tiny_pair_model():
    from models import build_model, lxmert_tiny
    from models.builders import pair_head

    torch.manual_seed(0)
    cfg = lxmert_tiny(vocab_size=30522, max_position_embeddings=32, visual_feat_dim=16)
    encoder = build_model(cfg).lxmert.eval()
    return encoder, pair_head(cfg).eval(), cfg


def _batch(nlvr2_root, tmp_path, n=6):
    root, _ = nlvr2_root
    return load(cfg_for(root, tmp_path / "cache")).train.get_batch(np.arange(n))


def test_pair_forward_is_one_batched_forward_of_each_image_with_the_sentence(nlvr2_root, tmp_path, tiny_pair_model):
    encoder, head, _ = tiny_pair_model
    batch = _batch(nlvr2_root, tmp_path)
    calls = []
    handle = encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        out = pair_forward(encoder, head, batch)
    handle.remove()
    assert calls == [12] and out["logits"].shape == (6, 2) and out["pooled"].shape == (6, 2, 32)
    with torch.no_grad():  # the same as encoding (sentence, img_k) on its own, for each k
        for k in range(2):
            alone = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                            batch["visual_feats"][:, k], batch["visual_pos"][:, k]).pooled  # fmt: skip
            torch.testing.assert_close(out["pooled"][:, k], alone, rtol=1e-5, atol=1e-6)


def test_swapping_images_and_head_halves_gives_the_same_logits(nlvr2_root, tmp_path, tiny_pair_model):
    encoder, head, cfg = tiny_pair_model
    batch = _batch(nlvr2_root, tmp_path)
    h = cfg.hidden_size
    swapped_head = type(head)(h, 2, 2, cfg.layer_norm_eps).eval()
    swapped_head.load_state_dict(head.state_dict())
    with torch.no_grad():
        w = head.fc1.weight  # (2H, 2H): input columns [0, H) read img0, [H, 2H) img1
        swapped_head.fc1.weight.copy_(torch.cat([w[:, h:], w[:, :h]], 1))
        logits = pair_forward(encoder, head, batch)["logits"]
        again = pair_forward(encoder, swapped_head, swap_images(batch))["logits"]
        plain_swap = pair_forward(encoder, head, swap_images(batch))["logits"]
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain_swap, logits, atol=1e-4)  # the head does tell left from right


def test_pair_loss_is_cross_entropy_over_labelled_examples(nlvr2_root, tmp_path, tiny_pair_model):
    encoder, head, _ = tiny_pair_model
    batch = _batch(nlvr2_root, tmp_path)
    out = pair_forward(encoder, head, batch)
    loss, logged = pair_loss(out, batch)
    labels = batch["targets"].argmax(1)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(out["logits"], labels))
    batch["targets"][:2] = 0  # two unlabelled examples are left out
    loss2, logged2 = pair_loss(out, batch)
    torch.testing.assert_close(loss2, torch.nn.functional.cross_entropy(out["logits"][2:], labels[2:]))
    assert logged["labelled"] == 6 and logged2["labelled"] == 4


def test_one_smoke_epoch_trains_and_evaluates(tmp_path):
    """The whole path on the synthetic folder: load, one epoch of pair_forward + pair_loss, evaluate."""
    from models import build_model, lxmert_tiny
    from models.builders import pair_head

    root = tmp_path / "syn"
    synthetic.write_dataset(root, train_sets=8, valid_sets=4, test_sets=1, num_boxes=4, feat_dim=32)
    data = load(cfg_for(root, tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = lxmert_tiny(vocab_size=30522, visual_feat_dim=data.visual_feat_dim)
    encoder, head = build_model(cfg).lxmert, pair_head(cfg)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = [p.detach().clone() for p in params]
    losses = []
    for batch in data.train.batches(8, shuffle=True, seed=0, epoch=0):
        loss, _ = pair_loss(pair_forward(encoder, head, batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == data.train.num_batches(8) and all(np.isfinite(losses))
    # every parameter that reaches the logits moved (the last cross layer's vision branch does not)
    assert all(not torch.equal(a, b) for a, b in zip(before, params) if b.grad is not None)
    q, logits = [], []
    with torch.no_grad():
        for batch in data.eval.batches(16):
            q.append(batch["question_id"])
            logits.append(pair_forward(encoder.eval(), head.eval(), batch)["logits"])
    report = nlvr2_metrics.evaluate(data.eval, torch.cat(q), torch.cat(logits))
    assert report.n == len(data.eval) == 24 and report.sentences == 8 and 0 <= report.accuracy <= 100


def test_synthetic_folder_is_format_exact_and_its_labels_follow_from_the_features(tmp_path):
    root = tmp_path / "syn"
    assert synthetic.main(["--out", str(root), "--train-sets", "6", "--valid-sets", "3", "--test-sets", "2",
                           "--num-boxes", "5", "--feat-dim", "32"]) == 0  # fmt: skip
    entries = json.loads((root / "nlvr2/train.json").read_text())
    assert set(entries[0]) == {"identifier", "img0", "img1", "label", "sent", "uid"}
    data = load(cfg_for(root, tmp_path / "cache"))
    assert (len(data.train), len(data.eval), data.num_regions, data.visual_feat_dim) == (36, 18, 5, 32)
    from tasks.scenes import OBJECTS, SceneWriter

    proj = SceneWriter(5, 32, seed=0).projection
    n_obj = len(OBJECTS)
    for ds in (data.train, data.eval):
        b = ds.get_batch(np.arange(len(ds)))
        code = b["visual_feats"].numpy() @ proj.T / np.square(proj).sum(1)  # (N, 2, R, code)
        for i, q in enumerate(ds.question_ids):
            has = [{OBJECTS[c[:n_obj].argmax()] for c in code[i, k] if c[:n_obj].max() > 0.5} for k in range(2)]
            sent = ds.question_text(int(q))
            obj = sent.rstrip(".").split()[-1]
            a, b2, n0, n1 = obj in has[0], obj in has[1], len(has[0]), len(has[1])
            expected = {"The left image contains": a, "The right image contains": b2, "Both images contain a": a and b2,
                        "Exactly one image contains": a != b2, "The left image shows": n0 > n1,
                        "Both images show the": n0 == n1}[" ".join(sent.split()[:4])]  # fmt: skip
            assert ds.raw_labels(int(q)) == {"True" if expected else "False": 1.0}, (sent, has)
