"""Zero-shot retrieval: metrics on a hand-ranked case (ties included), pair / embedding scoring,
the synthetic caption set and the COCO / Flickr30k file loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tasks_fixtures import write_tsv

from tasks import DataConfig
from tasks.retrieval import (
    CaptionFormatError,
    MissingImagesError,
    RetrievalSet,
    embedding_scores,
    evaluate,
    image_to_text_ranks,
    prepare_files,
    prepare_synthetic,
    read_captions,
    retrieval_metrics,
    score_pairs,
    text_to_image_ranks,
    write_lxmert_captions,
    write_volta_captions,
)
from tasks.vqa.files import TSVFormatError

# 3 images, 5 texts; texts 0, 1 describe image 0, text 2 image 1, texts 3, 4 image 2.
SCORES = np.array([
    [0.9, 0.2, 0.5, 0.1, 0.9],
    [0.3, 0.8, 0.7, 0.4, 0.2],
    [0.1, 0.6, 0.7, 0.9, 0.3],
], np.float32)  # fmt: skip
TEXT_IMAGE = np.array([0, 0, 1, 2, 2])


def test_text_to_image_ranks_by_hand():
    # Columns: t0 [.9 .3 .1] own .9 -> 1; t1 [.2 .8 .6] own .2 -> 3; t2 [.5 .7 .7] own .7 ties image 2;
    # t3 [.1 .4 .9] -> 1; t4 [.9 .2 .3] own .3, image 0 above -> 2.
    ranks, tied = text_to_image_ranks(SCORES, TEXT_IMAGE)
    assert ranks.tolist() == [1, 3, 2, 1, 2] and tied.tolist() == [False, False, True, False, False]
    ranks, _ = text_to_image_ranks(SCORES, TEXT_IMAGE, ties="optimistic")
    assert ranks.tolist() == [1, 3, 1, 1, 2]


def test_image_to_text_ranks_by_hand():
    # Image 0: best own text .9 (t0) tied by t4 (image 2's) -> 2 pessimistic / 1 optimistic;
    # image 1: own t2 .7, t1 .8 above -> 2; image 2: best own t3 .9 -> 1.
    ranks, tied = image_to_text_ranks(SCORES, TEXT_IMAGE)
    assert ranks.tolist() == [2, 2, 1] and tied.tolist() == [True, False, False]
    assert image_to_text_ranks(SCORES, TEXT_IMAGE, ties="optimistic")[0].tolist() == [1, 2, 1]


def test_retrieval_metrics_by_hand():
    m = retrieval_metrics(SCORES, TEXT_IMAGE)
    assert m["t2i_r1"] == pytest.approx(40.0) and m["t2i_r5"] == 100.0 and m["t2i_r10"] == 100.0
    assert m["t2i_medr"] == 2.0 and m["t2i_meanr"] == pytest.approx(1.8) and m["t2i_tied"] == 1.0
    assert m["i2t_r1"] == pytest.approx(100 / 3) and m["i2t_medr"] == 2.0 and m["i2t_meanr"] == pytest.approx(5 / 3)
    assert m["rsum"] == pytest.approx(40 + 100 + 100 + 100 / 3 + 100 + 100)
    assert m["n_images"] == 3.0 and m["n_texts"] == 5.0
    opt = retrieval_metrics(torch.from_numpy(SCORES), torch.from_numpy(TEXT_IMAGE), ties="optimistic")
    assert opt["t2i_r1"] == pytest.approx(60.0) and opt["i2t_r1"] == pytest.approx(200 / 3)


def test_ties_between_own_texts_are_not_ties_and_a_constant_scorer_ranks_last():
    scores = np.array([[0.9, 0.9, 0.1], [0.2, 0.3, 0.8]], np.float32)
    ranks, tied = image_to_text_ranks(scores, np.array([0, 0, 1]))
    assert ranks.tolist() == [1, 1] and not tied.any()
    flat = np.zeros((4, 8), np.float32)
    owner = np.repeat(np.arange(4), 2)
    m = retrieval_metrics(flat, owner)
    assert m["t2i_r1"] == 0.0 and m["t2i_medr"] == 4.0  # every other image ties: last of 4
    assert m["i2t_r1"] == 0.0 and m["i2t_medr"] == 7.0  # 6 other texts tie: 7th of 8
    assert retrieval_metrics(flat, owner, ties="optimistic")["t2i_r1"] == 100.0


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="images \\[2\\] have no text"):
        retrieval_metrics(SCORES, np.array([0, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(SCORES, np.array([0, 0, 1, 2, 3]))
    bad = SCORES.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN, first at image 1, text 3"):
        retrieval_metrics(bad, TEXT_IMAGE)
    with pytest.raises(ValueError, match="ties='random'"):
        retrieval_metrics(SCORES, TEXT_IMAGE, ties="random")


def test_blocks_of_queries_give_the_same_ranks(monkeypatch):
    from tasks.retrieval import metrics

    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(30, 70)), 1).astype(np.float32)  # rounding makes ties
    owner = np.concatenate([np.arange(30), rng.integers(0, 30, 40)])
    whole = retrieval_metrics(scores, owner)
    monkeypatch.setattr(metrics, "_BLOCK", 7)
    assert retrieval_metrics(scores, owner) == whole
    # Against a direct count per query.
    t2i, _ = text_to_image_ranks(scores, owner)
    for t in range(70):
        own = scores[owner[t], t]
        assert t2i[t] == 1 + int((np.delete(scores[:, t], owner[t]) >= own).sum())


def test_score_pairs_fills_the_matrix_batch_by_batch_and_states_the_size():
    calls, messages = [], []

    def score_fn(img, txt):
        calls.append(len(img))
        return torch.from_numpy(SCORES)[img, txt]

    scores, info = score_pairs(score_fn, 3, 5, batch_size=4, log=messages.append)
    np.testing.assert_array_equal(scores, SCORES)
    assert calls == [4, 4, 4, 3] and info["pairs"] == 15.0
    assert "3 images x 5 texts = 15 pairs" in messages[-1]


def test_embedding_scores_are_cosines():
    img = np.array([[2.0, 0.0], [0.0, 1.0]])
    txt = np.array([[1.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    s = embedding_scores(img, txt)
    np.testing.assert_allclose(s, [[2**-0.5, 0, 1], [2**-0.5, 1, 0]], atol=1e-6)


# ------------------------------------------------------------------------------------- data sets
@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    from tasks.pretrain import synthetic

    return synthetic.write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


def test_synthetic_set_has_one_unambiguous_image_per_caption(easyvqa_cache, vocab):
    data = DataConfig(cache_dir=str(easyvqa_cache), tokenizer=str(vocab))
    path = prepare_synthetic(data, n_images=40, per_image=2, seed=0)
    rset = RetrievalSet.open(path)
    assert rset.n_images == 40 and rset.n_texts == 80 and rset.text_image.tolist() == np.repeat(np.arange(40), 2).tolist()
    scenes = rset.meta["scenes"]
    from tasks.pretrain import synthetic

    words = synthetic.attributes({k: np.asarray(v) for k, v in scenes.items()})
    keys = list(zip(words["shape"], words["color"], words["size"], words["place"]))
    assert len(set(keys)) == 40  # distinct descriptions: each caption is true of one image only
    for t, text in enumerate(rset.texts):
        shape, color, size, place = keys[rset.text_image[t]]
        assert all(w in text for w in (shape, color, size, place)), text
    # Drawn from a stream the pretraining corpus does not use; same arguments, same set.
    assert rset.meta["truncated"] == 0  # the set is tokenised to its longest caption: no place word cut off
    assert rset.meta["stream"] == 3 and prepare_synthetic(data, n_images=40, per_image=2, seed=0) == path
    b = rset.pair_batch(np.array([0, 1]), np.array([3, 4]))
    assert b["input_ids"].shape == (2, rset.max_seq_len) and b["visual_feats"].shape[:2] == (2, rset.feats.shape[1])
    small = rset.subset(10)
    assert small.n_images == 10 and small.n_texts == 20 and small.text_image.max() == 9


@pytest.fixture
def coco_files(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"COCO_val2014_{i:012d}" for i in (42, 7, 391895, 5)]
    write_tsv(tmp_path / "val2014_obj36.tsv", ids, rng)
    captions = {"COCO_val2014_000000000042": ["a dog on a sofa", "a brown dog"],
                "COCO_val2014_000000391895": ["a man riding a bike", "a cyclist", "a person on a bicycle"]}  # fmt: skip
    return tmp_path, ids, captions


def test_lxmert_captions_with_obj36_features(coco_files):
    root, ids, captions = coco_files
    write_lxmert_captions(root / "mscoco_minival.json", captions)
    path = prepare_files(root / "mscoco_minival.json", root / "val2014_obj36.tsv", root / "cache", max_seq_len=12,
                         progress=False)  # fmt: skip
    rset = RetrievalSet.open(path)
    assert rset.image_ids == list(captions) and rset.n_texts == 5
    assert rset.text_image.tolist() == [0, 0, 1, 1, 1] and rset.texts[2] == "a man riding a bike"
    assert rset.image_rows.tolist() == [0, 2]  # rows of the TSV
    store = root / "val2014_obj36.tsv"
    from tasks.vqa.files import parse_row

    lines = store.read_bytes().splitlines()
    np.testing.assert_array_equal(rset.image_batch([1])["visual_feats"][0].numpy(), parse_row(lines[2], store, 3).features)


def test_volta_jsonl_matches_ids_by_number(coco_files):
    root, ids, captions = coco_files
    numeric = {"42": captions["COCO_val2014_000000000042"], "391895": captions["COCO_val2014_000000391895"]}
    write_volta_captions(root / "test_ann.jsonl", numeric, dataset="coco")
    lines = (root / "test_ann.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"id": 42, "sentences": ["a dog on a sofa", "a brown dog"]}
    rset = RetrievalSet.open(prepare_files(root / "test_ann.jsonl", root / "val2014_obj36.tsv", root / "cache",
                                           progress=False))  # fmt: skip
    assert rset.image_rows.tolist() == [0, 2] and rset.n_texts == 5
    write_volta_captions(root / "flickr.jsonl", {"1007129816": ["a man"]}, dataset="flickr30k")
    assert read_captions(root / "flickr.jsonl") == {"1007129816": ["a man"]}
    assert json.loads((root / "flickr.jsonl").read_text())["img_path"] == "1007129816.jpg"


def test_file_errors_name_the_file_and_line(coco_files):
    root, ids, captions = coco_files
    with pytest.raises(FileNotFoundError, match="missing caption file .*nothing.json.*lxmert"):
        prepare_files(root / "nothing.json", root / "val2014_obj36.tsv", root / "cache")
    write_lxmert_captions(root / "caps.json", captions)
    with pytest.raises(FileNotFoundError, match="missing feature file .*absent_obj36.tsv"):
        prepare_files(root / "caps.json", root / "absent_obj36.tsv", root / "cache")
    (root / "bad.jsonl").write_text('{"id": 1, "sentences": ["a"]}\n{"id": 2, "sentences": \n')
    with pytest.raises(CaptionFormatError, match="bad.jsonl:2: not JSON"):
        read_captions(root / "bad.jsonl")
    (root / "noid.jsonl").write_text('{"sentences": ["a"]}\n')
    with pytest.raises(CaptionFormatError, match="noid.jsonl:1: no image id"):
        read_captions(root / "noid.jsonl")
    write_lxmert_captions(root / "other.json", {"COCO_val2014_000000999999": ["a cat"]})
    with pytest.raises(MissingImagesError, match="not in the feature file .*val2014_obj36.tsv.*000000999999"):
        prepare_files(root / "other.json", root / "val2014_obj36.tsv", root / "cache", progress=False)
    (root / "broken_obj36.tsv").write_text("COCO_val2014_000000000042\t1\t2\n")
    write_lxmert_captions(root / "one.json", {"COCO_val2014_000000000042": ["a dog"]})
    with pytest.raises(TSVFormatError, match="broken_obj36.tsv:1"):
        prepare_files(root / "one.json", root / "broken_obj36.tsv", root / "cache", progress=False)


# ------------------------------------------------------------------------------------ with a model
def test_evaluate_scores_every_pair_with_the_matching_head_and_by_embedding(easyvqa_cache, vocab):
    from models import lxmert_pretraining, lxmert_tiny

    data = DataConfig(cache_dir=str(easyvqa_cache), tokenizer=str(vocab))
    rset = RetrievalSet.open(prepare_synthetic(data, n_images=12, per_image=2, seed=0)).subset(6)
    vocab_size = len(vocab.read_text().splitlines())
    cfg = lxmert_tiny("flow=merged", vocab_size=vocab_size, visual_feat_dim=rset.visual_feat_dim,
                      max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    model = lxmert_pretraining(cfg, ("match", "contrastive"), num_object_labels=3, num_attr_labels=3, num_qa_answers=3)
    messages = []
    metrics, scores = evaluate(model, rset, "itm", batch_size=5, log=messages.append)
    assert scores.shape == (6, 12) and "6 images x 12 texts = 72 pairs" in messages[-1]
    # The matrix holds each pair's own log-odds.
    model.eval()
    with torch.no_grad():
        one = model(**rset.pair_batch(np.array([4]), np.array([7])), heads=("match",)).match[0]
    assert scores[4, 7] == pytest.approx(float(one[1] - one[0]), abs=1e-5)
    assert set(metrics) >= {"i2t_r1", "t2i_r10", "rsum", "seconds", "pairs_per_s"}
    metrics, scores = evaluate(model, rset, "embedding", log=None)
    assert scores.shape == (6, 12) and np.abs(scores).max() <= 1.0 + 1e-5
    with pytest.raises(ValueError, match="contrastive head"):
        evaluate(lxmert_pretraining(cfg, ("match",), num_object_labels=3, num_attr_labels=3, num_qa_answers=3), rset,
                 "embedding", log=None)  # fmt: skip


def test_retrieval_benchmark_command_runs(easyvqa_cache, capsys):
    from benchmarks import retrieval as bench

    assert bench.main(["--images", "6", "--per-image", "1", "--hidden", "16", "--heads", "2", "--layers", "0,1,0",
                       "--cache-dir", str(easyvqa_cache)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "6 images x 6 texts = 36 pairs" in out and "ratio itm / embedding time" in out
