"""easy-VQA: offline loading with the package's counts, the region features, load speed."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tasks import DataConfig, easyvqa, load


@pytest.fixture(scope="module")
def data(easyvqa_cache):
    return load(DataConfig(name="easyvqa", cache_dir=str(easyvqa_cache)))


def test_counts_equal_the_package(data):
    import easy_vqa

    assert len(data.train) == len(easy_vqa.get_train_questions()[0]) == 38_575
    assert len(data.eval) == len(easy_vqa.get_test_questions()[0]) == 9_673
    assert data.answers == easy_vqa.get_answers() and data.num_answers == 13
    s = data.summary
    assert (s["train.images"], s["eval.images"]) == (4000, 1000)
    assert s["train.truncated"] == s["eval.truncated"] == 0 and s["train.longest"] == 13
    assert s["train.oov_labels_dropped"] == 0
    assert (data.num_regions, data.visual_feat_dim, data.max_seq_len) == (5, 40, 13)


def test_labels_types_and_texts_match_the_package(data):
    import easy_vqa

    texts, answers, _ = easy_vqa.get_test_questions()
    ds = data.eval
    b = ds.get_batch(np.arange(len(ds)))
    assert [data.answers[i] for i in b["targets"].argmax(1).tolist()] == answers
    assert (b["targets"].sum(1) == 1).all()
    for qid in (0, 17, 9672):
        assert ds.question_text(qid) == texts[qid]
        assert ds.labels(qid) == {answers[qid]: 1.0}
    at = ds.answer_type_of(ds.question_ids)
    assert {a for a, t in zip(answers, at) if t == "yes/no"} == {"yes", "no"}
    assert sum(t == "yes/no" for t in at) == 7136  # the package README's count
    qt = dict(zip(texts, ds.question_type_of(ds.question_ids)))
    assert qt["what color is the shape?"] == "what color"
    assert qt["is there not a red shape?"] == "has not color"
    assert qt["does the image contain a circle?"] == "has shape"
    # the official accuracy's human answers: the package's answer, ten times (all annotators agree)
    assert ds.human_answers.of([0, 17, 9672]) == [[answers[q]] * 10 for q in (0, 17, 9672)]
    assert data.train.human_answers is None  # only evaluation is scored


def test_features_encode_colour_and_shape(data, easyvqa_cache):
    """The object region's palette bins name the colour; its descriptors separate the shapes."""
    ds = data.eval
    fdir = easyvqa._feature_dir(DataConfig(cache_dir=str(easyvqa_cache)).resolved())
    meta = json.loads((fdir / "meta.json").read_text())
    mean, std = np.array(meta["feature_mean"]), np.array(meta["feature_std"])
    feats = np.asarray(ds.stores[0].feats) * std + mean  # back to the raw descriptors
    names = easyvqa.FEATURE_NAMES
    texts, answers = zip(*[(ds.question_text(int(q)), ds.labels(int(q))) for q in ds.question_ids[:3000]])
    rows = np.asarray(ds.arrays["image_index"])[:3000]
    pal = feats[:, 0, names.index("palette_red") : names.index("palette_gray") + 1]
    fill = feats[:, 0, names.index("fg_fraction")]
    match = feats[:, 0, names.index("match_rectangle") : names.index("match_triangle") + 1]
    shape_hits = []
    for (ans,), row in zip((tuple(a) for a in answers), rows):
        if ans in easyvqa.PALETTE_NAMES:
            assert easyvqa.PALETTE_NAMES[pal[row].argmax()] == ans
        elif ans == "rectangle":
            assert fill[row] > 0.85
        elif ans == "triangle":
            assert fill[row] < 0.7
        if ans in easyvqa.SHAPES:
            shape_hits.append(easyvqa.SHAPES[match[row].argmax()] == ans)
    assert len(shape_hits) > 100 and np.mean(shape_hits) > 0.95  # template scores alone name the shape
    boxes = np.asarray(ds.stores[0].boxes)
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert (boxes[:, 0, 2] > boxes[:, 0, 0]).all()  # every image has an object box


def test_vqa_like_mode_shapes():
    images, _ = easyvqa.load_images("test", limit=8)
    desc, boxes = easyvqa.featurize(images, "vqa_like")
    assert desc.shape == (8, 36, easyvqa.FEATURE_DIM) == (8, 36, 40) and boxes.shape == (8, 36, 4)
    p = easyvqa.projection()
    assert p.shape == (40, 2048)
    np.testing.assert_allclose(p @ p.T, np.eye(40) * 2048 / 40, atol=1e-3)  # lossless: orthogonal rows


def test_load_is_fast(easyvqa_cache):
    cfg = DataConfig(name="easyvqa", cache_dir=str(easyvqa_cache), train_limit=1000, eval_limit=100)
    t0 = time.perf_counter()
    d = load(cfg)
    assert time.perf_counter() - t0 < 1.0
    assert len(d.train) == 1000 and len(d.eval) == 100
