"""GQA in LXMERT's files: round trip, conversion (resumable, shared with pretraining), bad input,
accuracy and the submission file against hand-computed cases, the synthetic data folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_thread
from tasks_fixtures import GQA_ANSWERS, write_json

from tasks import ConfigError, DataConfig, load, prepare
from tasks.gqa import metrics as gqa_metrics
from tasks.gqa import synthetic
from tasks.tokenization import bundled_vocab
from tasks.vqa import convert

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_thread)


def cfg_for(root: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(name="gqa", root=str(root), cache_dir=str(cache), **kw)


def vocab_ids(words: list[str]) -> list[int]:
    lines = bundled_vocab().read_text().splitlines()
    return [lines.index(w) for w in words]


def test_round_trip_features_tokens_targets_and_ids(gqa_root, tmp_path):
    root, truth = gqa_root
    data = load(cfg_for(root, tmp_path / "cache"))
    assert data.answers == GQA_ANSWERS and data.max_seq_len == 20  # LXMERT's MAX_GQA_LENGTH
    # LXMERT's recipe: train on train + valid (vg_gqa_obj36), evaluate on testdev (its own TSV)
    assert len(data.train) == 24 and len(data.eval) == 12
    entries = {e["question_id"]: e for s in ("train", "valid", "testdev") for e in truth["questions"][s]}
    seen = set()
    for ds in (data.train, data.eval):
        for batch in ds.batches(5, shuffle=True, seed=1):
            assert batch["visual_feats"].shape[1:] == (4, 16) and batch["targets"].shape[1] == len(GQA_ANSWERS)
            for i, source_id in enumerate(ds.source_id_of(batch["question_id"])):
                e = entries[source_id]
                seen.add(source_id)
                h, w, boxes, feats = truth["features"][e["img_id"]]
                np.testing.assert_array_equal(batch["visual_feats"][i].numpy(), feats)
                np.testing.assert_allclose(batch["visual_pos"][i].numpy(), boxes / [w, h, w, h], rtol=1e-6)
                (answer,) = e["label"]
                want = {GQA_ANSWERS.index(answer): 1.0} if answer in GQA_ANSWERS else {}  # "giraffe": no target
                got = batch["targets"][i]
                assert {j: float(got[j]) for j in torch.nonzero(got).flatten().tolist()} == want
                if e["sent"] == "Is the cat red?":
                    n_tok = int(batch["attention_mask"][i].sum())
                    assert batch["input_ids"][i, :n_tok].tolist() == vocab_ids(
                        ["[CLS]", "is", "the", "cat", "red", "?", "[SEP]"])  # fmt: skip
    assert seen == set(entries)
    # the question ids of the file, leading zeros kept: "07333401" and "7333402" are different questions
    assert data.train.source_id_of([10000000000, 10000000001]) == ["07333401", "7333402"]
    # integer ids: (split number + 1) * 10**10 + entry index (train 1, valid 2, testdev 3)
    assert sorted(data.eval.question_ids.tolist()) == [3 * 10**10 + i for i in range(12)]
    assert data.summary["train.oov_labels_dropped"] == 8 and data.summary["eval.questions_with_oov"] == 4


def test_vg_features_converted_once_for_gqa_and_pretraining(gqa_root, tmp_path):
    from tasks.pretrain.lxmert import _store_path

    root, _ = gqa_root
    cache = tmp_path / "cache"
    out = prepare(cfg_for(root, cache))
    # the store LXMERT pretraining reads vg_gqa_obj36.tsv from is the one GQA converted
    assert out["features.vg_gqa_obj36"] == str(_store_path(str(cache), root, "vg_gqa_imgfeat/vg_gqa_obj36.tsv", 0))
    for tsv in (root / "vg_gqa_imgfeat").glob("*.tsv"):
        tsv.unlink()  # converted: the TSVs are no longer needed
    assert len(load(cfg_for(root, cache)).train) == 24


def test_missing_files_named_with_their_source_before_any_work(gqa_root, tmp_path):
    root, _ = gqa_root
    cache = tmp_path / "cache"
    (root / "gqa/testdev.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"testdev\.json: .*wget https://nlp\.cs\.unc\.edu/data/lxmert_data/gqa/testdev\.json"):
        prepare(cfg_for(root, cache))
    assert not cache.exists()  # nothing converted before the check
    (root / "vg_gqa_imgfeat/vg_gqa_obj36.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"vg_gqa_obj36\.tsv: .*lxmert_data/vg_gqa_imgfeat/vg_gqa_obj36\.zip"):
        prepare(cfg_for(root, cache, eval_split="valid"))
    (root / "gqa/trainval_ans2label.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"trainval_ans2label\.json: it ships in LXMERT's repository under data/gqa/"):
        prepare(cfg_for(root, cache, eval_split="valid"))


@pytest.mark.parametrize(
    ("index", "entry", "message"),
    [
        (2, {"question_id": "07", "img_id": "2375429", "sent": "Is it?", "label": "yes"}, r"label must be \{answer: score\}"),
        (1, {"question_id": "08", "sent": "Is it?"}, r"lacks 'img_id'"),
        (0, {"question_id": "09", "img_id": "2375429", "sent": ""}, r"sent must be a non-empty string"),
        (3, {"question_id": "10", "img_id": "2375429", "sent": "Is it?", "label": {"yes": 2}}, r"label\['yes'\] must be a number in \[0, 1\]"),
        (1, {"question_id": ["x"], "img_id": "2375429", "sent": "Is it?"}, r"question_id must be a string"),
    ],
)  # fmt: skip
def test_wrong_format_entry_is_refused_naming_file_and_entry(gqa_root, tmp_path, index, entry, message):
    root, truth = gqa_root
    entries = list(truth["questions"]["train"])
    entries[index] = entry
    write_json(root / "gqa/train.json", entries)
    with pytest.raises(ValueError, match=rf"{root / 'gqa/train.json'}: entry {index} \(question_id=.*\): {message}"):
        prepare(cfg_for(root, tmp_path / "cache"))


def test_invalid_json_duplicates_and_unknown_images_are_named(gqa_root, tmp_path):
    root, truth = gqa_root
    path = root / "gqa/valid.json"
    text = path.read_text()
    path.write_text(text.replace('"sent"', '"sent', 1))  # an unterminated key
    line = text[: text.index('"sent"')].count("\n") + 1
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON: .*line {line} column"):
        prepare(cfg_for(root, tmp_path / "cache"))
    entries = list(truth["questions"]["valid"])
    entries[5] = dict(entries[5], question_id=entries[1]["question_id"])
    write_json(path, entries)
    with pytest.raises(ValueError, match=rf"{path}: entry 5: id '{entries[1]['question_id']}' occurs twice \(entries 1 and 5\)"):
        prepare(cfg_for(root, tmp_path / "cache"))
    entries[5] = dict(truth["questions"]["valid"][5], img_id="999")
    write_json(path, entries)
    with pytest.raises(ValueError, match=r"entry 5 \('\d+'\) refers to image '999', which has no features in .*vg_gqa_obj36"):
        prepare(cfg_for(root, tmp_path / "cache"))


def test_conversion_through_prepare_resumes_after_interruption(gqa_root, tmp_path, monkeypatch):
    root, truth = gqa_root
    cache = tmp_path / "cache"
    monkeypatch.setattr(convert, "CHECKPOINT_ROWS", 3)
    real = convert.parse_row
    calls = {"n": 0}

    def interrupted(line, path, line_no):
        calls["n"] += 1
        if calls["n"] == 8:  # 1 call sizes the arrays; killed while converting the 7th image
            raise KeyboardInterrupt
        return real(line, path, line_no)

    monkeypatch.setattr(convert, "parse_row", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg_for(root, cache))
    partial = cache / "vqa/features/vg_gqa_obj36.partial"
    assert json.loads((partial / "progress.json").read_text())["rows"] == 6
    monkeypatch.setattr(convert, "parse_row", real)
    data = load(cfg_for(root, cache))
    assert not partial.exists()
    for batch in data.train.batches(24):
        for i, source_id in enumerate(data.train.source_id_of(batch["question_id"])):
            img = next(e["img_id"] for s in ("train", "valid") for e in truth["questions"][s] if e["question_id"] == source_id)
            np.testing.assert_array_equal(batch["visual_feats"][i].numpy(), truth["features"][img][3])


def test_image_limit_keeps_questions_on_the_first_images(gqa_root, tmp_path):
    root, truth = gqa_root
    data = load(cfg_for(root, tmp_path / "cache", image_limit=2))
    first = set(truth["ids"]["train"][:2]) | set(truth["ids"]["testdev"][:2])  # valid's images come later
    assert len(data.train) == 6 and len(data.eval) == 6 and data.summary["outside_image_limit"] > 0
    imgs = {e["question_id"]: e["img_id"] for s in truth["questions"].values() for e in s}
    assert {imgs[s] for ds in (data.train, data.eval) for s in ds.source_id_of(ds.question_ids)} <= first


def test_accuracy_is_the_label_score_of_the_predicted_answer(gqa_root, tmp_path):
    root, _ = gqa_root
    ev = load(cfg_for(root, tmp_path / "cache")).eval  # testdev: per image "yes", "blue", "giraffe" (not in vocab)
    qids = ev.question_ids
    answers = [next(iter(ev.raw_labels(int(q)))) for q in qids]
    # right on every "yes" question, right on the first "blue" question only, "yes" for every "giraffe"
    blue = [i for i, a in enumerate(answers) if a == "blue"]
    pred = [GQA_ANSWERS.index("yes") if a in ("yes", "giraffe") else GQA_ANSWERS.index("red") for a in answers]
    pred[blue[0]] = GQA_ANSWERS.index("blue")
    report = gqa_metrics.accuracy(ev, qids, torch.tensor(pred))
    assert report.n == 12 and report.overall == pytest.approx(100 * (4 + 1) / 12)
    logits = torch.nn.functional.one_hot(torch.tensor(pred), len(GQA_ANSWERS)).float()  # logits give the same
    assert gqa_metrics.accuracy(ev, qids, logits).overall == pytest.approx(100 * 5 / 12)
    with pytest.raises(ValueError, match="predicted twice"):
        gqa_metrics.accuracy(ev, np.r_[qids, qids[:1]], torch.tensor([*pred, pred[0]]))


def test_submission_file_has_gqa_ids_and_answers(gqa_root, tmp_path):
    root, truth = gqa_root
    data = load(cfg_for(root, tmp_path / "cache", eval_split="submit"))
    ev = data.eval
    assert len(ev) == 6 and gqa_metrics.accuracy(ev, ev.question_ids, np.zeros(6, int)).n == 0  # no labels
    path = gqa_metrics.write_results(tmp_path / "out/submit_predict.json", ev, ev.question_ids, np.arange(6))
    rows = json.loads(path.read_text())
    want = [{"questionId": e["question_id"], "prediction": GQA_ANSWERS[i]} for i, e in enumerate(truth["questions"]["submit"])]
    assert rows == want and rows[0]["questionId"].startswith("0")


def test_config_knows_gqa_splits_and_needs_a_root():
    with pytest.raises(ConfigError, match="name=gqa needs LXMERT's data folder"):
        DataConfig(name="gqa")
    with pytest.raises(ConfigError, match=r"'minival'.* is not a gqa split: expected one of train, valid, testdev, submit"):
        DataConfig(name="gqa", root="/x", eval_split="minival")
    r = DataConfig(name="gqa", root="/x").resolved()
    assert (r.train_splits, r.eval_split, r.max_seq_len) == ("train,valid", "testdev", 20)


def test_convert_cli_prepares_gqa(gqa_root, tmp_path, capsys):
    root, _ = gqa_root
    assert convert.main(["--name", "gqa", "--root", str(root), "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "features.vg_gqa_obj36" in out and "questions.testdev" in out


def test_one_smoke_epoch_trains_and_evaluates(tmp_path):
    """The whole path on the synthetic folder: load, one epoch of LXMERT's GQA loss (BCE x answers on
    the answer head), evaluate, write the submission file."""
    from models import build_model, lxmert_tiny

    root = tmp_path / "syn"
    synthetic.write_dataset(root, train_images=12, valid_images=4, testdev_images=6, submit_images=2,
                            questions_per_image=3, num_boxes=4, feat_dim=32)  # fmt: skip
    data = load(cfg_for(root, tmp_path / "cache"))
    torch.manual_seed(0)
    model = build_model(lxmert_tiny(vocab_size=30522, visual_feat_dim=data.visual_feat_dim, num_answers=data.num_answers))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch in data.train.batches(8, shuffle=True, seed=0, epoch=0):
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                       batch["visual_feats"], batch["visual_pos"]).logits  # fmt: skip
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["targets"]) * data.num_answers
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == data.train.num_batches(8) == 6 and all(np.isfinite(losses))
    model.eval()
    q, logits = [], []
    with torch.no_grad():
        for batch in data.eval.batches(16):
            q.append(batch["question_id"])
            logits.append(model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                batch["visual_feats"], batch["visual_pos"]).logits)  # fmt: skip
    report = gqa_metrics.accuracy(data.eval, torch.cat(q), torch.cat(logits))
    assert report.n == len(data.eval) == 18 and 0 <= report.overall <= 100
    rows = gqa_metrics.results(data.eval, torch.cat(q), torch.cat(logits))
    assert len(rows) == 18 and all(r["prediction"] in synthetic.ANSWERS for r in rows)


def test_synthetic_folder_is_format_exact_and_its_answers_follow_from_the_features(tmp_path):
    root = tmp_path / "syn"
    assert synthetic.main(["--out", str(root), "--train-images", "20", "--valid-images", "5", "--testdev-images", "5",
                           "--submit-images", "2", "--questions-per-image", "4", "--num-boxes", "6"]) == 0  # fmt: skip
    data = load(cfg_for(root, tmp_path / "cache"))
    assert (len(data.train), len(data.eval), data.num_regions, data.visual_feat_dim) == (100, 20, 6, 64)
    assert data.answers == list(synthetic.ANSWERS)
    # Decode each region's object and colour from its features (the projection is orthonormal, so
    # its transpose inverts it) and answer every question from them by rule: the labels agree.
    from tasks.scenes import COLORS, OBJECTS, SceneWriter

    proj = SceneWriter(6, 64, seed=0).projection  # (classes + colours + stuff, 64)
    n_obj, n_col = len(OBJECTS), len(COLORS)
    for ds in (data.train, data.eval):
        b = ds.get_batch(np.arange(len(ds)))
        code = b["visual_feats"].numpy() @ proj.T / np.square(proj).sum(1)  # (N, R, classes + colours + stuff), ~one-hot
        for i, q in enumerate(ds.question_ids):
            regions = [(OBJECTS[c[:n_obj].argmax()], COLORS[c[n_obj : n_obj + n_col].argmax()])
                       for c in code[i] if c[:n_obj].max() > 0.5]  # fmt: skip
            sent, (label,) = ds.question_text(int(q)), ds.raw_labels(int(q))
            assert label == _solve(sent, regions), (sent, regions)


def _solve(sent: str, regions: list[tuple[str, str]]) -> str:
    words = sent.rstrip("?").split()
    color_of = dict(regions)
    if sent.startswith("What color is the"):
        return color_of[words[-1]]
    if sent.startswith("Which object is"):
        return next(o for o, c in regions if c == words[-1])
    if sent.startswith("Is there a"):
        return "yes" if words[3] in color_of else "no"
    return "yes" if color_of.get(words[2]) == words[3] else "no"
