"""VQA v2 in LXMERT's files: round trip, conversion safety, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_fixtures import ANSWERS, lxmert_row, write_tsv

from tasks import DataConfig, load, prepare
from tasks.tokenization import bundled_vocab
from tasks.vqa import convert
from tasks.vqa.files import TSVFormatError


def vocab_ids(words: list[str]) -> list[int]:
    """Ids straight from bert-base-uncased's vocab.txt (id = line number), independent of the tokenizer."""
    lines = bundled_vocab().read_text().splitlines()
    return [lines.index(w) for w in words]


def cfg_for(root: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(name="vqa", root=str(root), cache_dir=str(cache), **kw)


def test_round_trip_features_boxes_tokens_targets(lxmert_root, tmp_path):
    root, truth = lxmert_root
    data = load(cfg_for(root, tmp_path / "cache"))
    assert data.num_answers == len(ANSWERS) and data.answers == ANSWERS
    assert (data.num_regions, data.visual_feat_dim, data.max_seq_len) == (4, 16, 20)
    # train = train + nominival: 6 + 3 images, 3 questions each; eval = minival
    assert len(data.train) == 27 and len(data.eval) == 9
    entries = {e["question_id"]: e for s in ("train", "nominival", "minival") for e in truth["questions"][s]}
    expected_tokens = {
        "What color is the dog?": vocab_ids(["[CLS]", "what", "color", "is", "the", "dog", "?", "[SEP]"]),
    }
    seen = set()
    for ds in (data.train, data.eval):
        for batch in ds.batches(4, shuffle=True, seed=3):
            assert batch["visual_feats"].dtype == torch.float32 and batch["input_ids"].dtype == torch.int64
            for i, qid in enumerate(batch["question_id"].tolist()):
                seen.add(qid)
                e = entries[qid]
                h, w, boxes, feats = truth["features"][e["img_id"]]
                np.testing.assert_array_equal(batch["visual_feats"][i].numpy(), feats)
                np.testing.assert_allclose(batch["visual_pos"][i].numpy(), boxes / [w, h, w, h], rtol=1e-6)
                assert batch["visual_pos"][i].min() >= 0 and batch["visual_pos"][i].max() <= 1
                want = {ANSWERS.index(a): s for a, s in e["label"].items() if a in ANSWERS}
                got = batch["targets"][i]
                assert {j: round(float(got[j]), 6) for j in torch.nonzero(got).flatten().tolist()} == want
                n_tok = int(batch["attention_mask"][i].sum())
                if e["sent"] in expected_tokens:
                    assert batch["input_ids"][i, :n_tok].tolist() == expected_tokens[e["sent"]]
                assert batch["input_ids"][i, n_tok:].eq(0).all() and batch["token_type_ids"][i].eq(0).all()
                assert ds.labels(qid) == pytest.approx({a: s for a, s in e["label"].items() if a in ANSWERS})
                assert ds.raw_labels(qid) == e["label"]
                assert ds.question_text(qid) == e["sent"]
                assert ds.answer_type_of([qid]) == [e["answer_type"]]
                assert ds.question_type_of([qid]) == [e["question_type"]]
    assert seen == set(entries)
    # "maybe" is outside the vocabulary: dropped from targets and counted (one per image's 2nd question)
    assert data.summary["train.oov_labels_dropped"] == 9 and data.summary["eval.oov_labels_dropped"] == 3
    assert data.summary["train.images"] == 9 and data.summary["train.truncated"] == 0


def test_load_never_parses_tsv_again(lxmert_root, tmp_path):
    root, _ = lxmert_root
    cfg = cfg_for(root, tmp_path / "cache")
    prepare(cfg)
    for tsv in (root / "mscoco_imgfeat").glob("*.tsv"):
        tsv.unlink()  # converted: the TSVs are no longer needed
    assert len(load(cfg).train) == 27


def test_missing_file_named_before_any_work(lxmert_root, tmp_path):
    root, _ = lxmert_root
    (root / "vqa/minival.json").unlink()
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=r"minival\.json.*wget .*lxmert_data/vqa/minival\.json"):
        prepare(cfg_for(root, cache))
    assert not cache.exists()  # nothing converted before the check
    (root / "mscoco_imgfeat/val2014_obj36.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"val2014_obj36\.tsv.*Faster R-CNN features"):
        prepare(cfg_for(root, cache, eval_split="nominival", train_splits="train"))


def test_malformed_row_names_file_and_line_and_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    tsv = tmp_path / "x_obj36.tsv"
    write_tsv(tsv, [f"img{i}" for i in range(5)], rng)
    lines = tsv.read_text().splitlines(keepends=True)
    fields = lines[3].split("\t")
    fields[9] = fields[9][:-8] + "\n"  # truncated features
    lines[3] = "\t".join(fields)
    tsv.write_text("".join(lines))
    out = tmp_path / "store"
    with pytest.raises(TSVFormatError, match=rf"{tsv}:4: .*features"):
        convert.convert_tsv(tsv, out, progress=False)
    assert not out.exists() and not (tmp_path / "store.partial").exists()
    lines[3] = "img3\t10\t10\n"
    tsv.write_text("".join(lines))
    with pytest.raises(TSVFormatError, match=rf"{tsv}:4: malformed feature row: expected 10 tab-separated fields"):
        convert.convert_tsv(tsv, out, progress=False)
    assert not out.exists()


def test_conversion_resumes_after_interruption(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    tsv = tmp_path / "y_obj36.tsv"
    truth = write_tsv(tsv, [f"img{i}" for i in range(7)], rng)
    monkeypatch.setattr(convert, "CHECKPOINT_ROWS", 2)
    real = convert.parse_row
    calls = {"n": 0}

    def flaky(line, path, line_no):
        calls["n"] += 1
        if calls["n"] == 6:  # interrupted while writing the 5th row (1 call sizes the arrays)
            raise KeyboardInterrupt
        return real(line, path, line_no)

    monkeypatch.setattr(convert, "parse_row", flaky)
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        convert.convert_tsv(tsv, out, progress=False)
    assert not out.exists()
    progress = json.loads((tmp_path / "store.partial/progress.json").read_text())
    assert progress["rows"] == 4
    monkeypatch.setattr(convert, "parse_row", real)
    convert.convert_tsv(tsv, out, progress=False)
    assert not (tmp_path / "store.partial").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["image_ids"] == [f"img{i}" for i in range(7)]
    feats = np.load(out / "feats.npy")
    for r, img in enumerate(meta["image_ids"]):
        np.testing.assert_array_equal(feats[r], truth[img][3])


def test_question_without_features_names_both_ids(lxmert_root, tmp_path):
    root, _ = lxmert_root
    entries = json.loads((root / "vqa/minival.json").read_text())
    entries[1]["img_id"] = "COCO_val2014_999999999999"
    (root / "vqa/minival.json").write_text(json.dumps(entries))
    qid = entries[1]["question_id"]
    with pytest.raises(ValueError, match=rf"question_id {qid} .*COCO_val2014_999999999999"):
        prepare(cfg_for(root, tmp_path / "cache"))


def test_image_limit_subset_like_lxmert_tiny(lxmert_root, tmp_path):
    root, truth = lxmert_root
    data = load(cfg_for(root, tmp_path / "cache", image_limit=2))
    assert data.summary["train.images"] == 2 and len(data.train) == 6  # nominival's images are val2014[3:]
    assert len(data.eval) == 6 and data.summary["outside_image_limit"] > 0
    first = set(truth["ids"]["train2014"][:2]) | set(truth["ids"]["val2014"][:2])
    qimg = {e["question_id"]: e["img_id"] for s in truth["questions"].values() for e in s}
    assert all(qimg[int(q)] in first for q in data.train.question_ids)


def test_limits_and_multi_store_batches(lxmert_root, tmp_path):
    root, truth = lxmert_root
    data = load(cfg_for(root, tmp_path / "cache", train_limit=20, eval_limit=5))
    assert len(data.train) == 20 and len(data.eval) == 5
    # positions 18, 19 come from nominival (val2014 store), the rest from train2014
    b = data.train.get_batch(np.array([19, 0, 18, 1]))
    qimg = {e["question_id"]: e["img_id"] for s in truth["questions"].values() for e in s}
    for i, q in enumerate(b["question_id"].tolist()):
        np.testing.assert_array_equal(b["visual_feats"][i].numpy(), truth["features"][qimg[q]][3])


def test_truncation_is_counted(lxmert_root, tmp_path):
    root, _ = lxmert_root
    data = load(cfg_for(root, tmp_path / "cache", max_seq_len=6))
    assert data.max_seq_len == 6 and data.summary["train.truncated"] == 27
    b = data.train.get_batch(np.arange(3))
    assert (b["input_ids"][:, -1] == 102).all()  # still ends with [SEP]


def test_row_with_other_box_count_is_rejected(tmp_path):
    tsv = tmp_path / "z_obj36.tsv"
    rng = np.random.default_rng(2)
    write_tsv(tsv, ["a", "b"], rng)
    with open(tsv, "a") as fh:
        fh.write(lxmert_row("c", 10, 10, np.zeros((3, 4)), np.zeros((3, 16))))
    with pytest.raises(TSVFormatError, match=r":3: 3 boxes x 16 features, but the first row has 4 x 16"):
        convert.convert_tsv(tsv, tmp_path / "s", progress=False)


def test_convert_cli(tmp_path, capsys):
    tsv = tmp_path / "w_obj36.tsv"
    write_tsv(tsv, ["a", "b", "c"], np.random.default_rng(3))
    assert convert.main(["--tsv", str(tsv), "--out", str(tmp_path / "out"), "--limit", "2"]) == 0
    assert "2 images x 4 boxes x 16" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "out/feats.npy")


def test_concurrent_prepare_builds_each_store_once(lxmert_root, tmp_path):
    """Two processes preparing the same cache (trials starting together) both succeed, one copy each."""
    import subprocess
    import sys

    root, _ = lxmert_root
    cache = tmp_path / "cache"
    code = (
        "import sys; from tasks import DataConfig, load;"
        f"d = load(DataConfig(name='vqa', root={str(root)!r}, cache_dir={str(cache)!r}));"
        "print(len(d.train))"
    )
    repo = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == ["27", "27"]
    leftovers = [p.name for p in cache.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    assert leftovers == []


def test_official_annotations_found_under_root_or_configured(lxmert_root, tmp_path):
    root, truth = lxmert_root
    assert load(cfg_for(root, tmp_path / "cache")).eval.human_answers is None  # LXMERT's files only
    minival = truth["questions"]["minival"]
    anns = [{"question_id": e["question_id"], "question_type": e["question_type"], "answer_type": e["answer_type"],
             "answers": [{"answer": f"answer {e['question_id']}", "answer_confidence": "yes", "answer_id": j + 1}
                         for j in range(10)]} for e in minival]  # fmt: skip
    (root / "vqa/v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    data = load(cfg_for(root, tmp_path / "cache"))
    qids = [e["question_id"] for e in minival]
    assert data.eval.human_answers.of(qids) == [[f"answer {q}"] * 10 for q in qids]
    assert load(cfg_for(root, tmp_path / "cache", annotations="none")).eval.human_answers is None
    # the same file named explicitly (relative to root) reuses the converted store
    stores = sorted((tmp_path / "cache" / "vqa" / "annotations-v1").iterdir())
    data = load(cfg_for(root, tmp_path / "cache", annotations="vqa/v2_mscoco_val2014_annotations.json"))
    assert data.eval.human_answers.of(qids[:1]) == [[f"answer {qids[0]}"] * 10]
    assert sorted((tmp_path / "cache" / "vqa" / "annotations-v1").iterdir()) == stores
    # the training splits' file is not what scores minival
    assert load(cfg_for(root, tmp_path / "cache", eval_split="test")).eval.human_answers is None
