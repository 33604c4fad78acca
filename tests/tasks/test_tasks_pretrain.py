"""tasks/pretrain: the synthetic corpus (deterministic, correct), LXMERT-style masking, LXMERT's
real pretraining files (tiny copies in the exact format), the config and its schedule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tasks_fixtures import write_tsv

from tasks import ConfigError, DataConfig
from tasks import prepare as prepare_task
from tasks import store as st
from tasks.pretrain import Masking, PretrainConfig, active_tasks, load, parse_schedule, prepare, synthetic
from tasks.pretrain.corpus import ImageStore


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory) -> str:
    return str(synthetic.write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


@pytest.fixture(scope="module")
def corpus(easyvqa_cache, small_vocab):
    return load(PretrainConfig(corpus_images=200, corpus_eval_images=20, corpus_seed=3),
                DataConfig(cache_dir=str(easyvqa_cache), tokenizer=small_vocab))  # fmt: skip


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.load(p) for p in sorted(folder.rglob("*.npy"))}


def test_same_seed_gives_identical_arrays_and_another_seed_does_not(easyvqa_cache, tmp_path):
    data = DataConfig(cache_dir=str(easyvqa_cache)).resolved()
    features = Path(prepare_task(data)["features"])
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        (tmp_path / name).mkdir()
        meta = synthetic.build(tmp_path / name, data, features, 40, 8, seed, 13)
        runs[name] = _arrays(tmp_path / name)
        assert meta["splits"] == {"train": {"images": 40, "sentences": 160}, "eval": {"images": 8, "sentences": 32}}
    assert runs["a"].keys() == runs["b"].keys() and len(runs["a"]) == 2 * (7 + 7)
    for key, value in runs["a"].items():
        np.testing.assert_array_equal(value, runs["b"][key], err_msg=key)
    assert not np.array_equal(runs["a"]["images/train/feats.npy"], runs["c"]["images/train/feats.npy"])
    assert json.loads((tmp_path / "a/train/texts.json").read_text()) == json.loads((tmp_path / "b/train/texts.json").read_text())


def test_scenes_sentences_and_region_labels_agree(corpus):
    ds = corpus.train
    scenes = st.read_json(ds.stores[0].path / st.META)["scenes"]
    shape, color = np.array(scenes["shape"]), np.array(scenes["color"])
    texts = json.loads((ds.path / "texts.json").read_text())
    answers = corpus.answers
    assert answers[:13] == __import__("tasks").easyvqa.answers() and answers[13:] == ["small", "medium", "large"]
    for i in range(0, len(texts), 7):
        img = int(ds.arrays["image_index"][i])
        words = texts[i].rstrip("?").split()
        label = int(ds.arrays["label_idx"][i, 0])
        if ds.arrays["kind"][i] == 0:  # every caption names the image's shape, and no other shape
            assert synthetic.SHAPES[shape[img]] in words and label == -1
            assert not (set(words) & set(synthetic.SHAPES) - {synthetic.SHAPES[shape[img]]})
        elif texts[i].startswith("what shape"):
            assert answers[label] == synthetic.SHAPES[shape[img]]
        elif texts[i].startswith("what color"):
            assert answers[label] == synthetic.COLORS[color[img]]
    # The object region (0) carries the detected shape and colour; easy-VQA's extractor agrees.
    obj = np.asarray(ds.stores[0].arrays["objects_id"])
    attr = np.asarray(ds.stores[0].arrays["attrs_id"])
    assert (obj[:, 0] == shape + 1).all() and (attr[:, 0] == color + 1).all()
    assert ((obj == 0) == (attr == 0)).all() and (obj == 0).any()  # some grid cells hold no shape
    from tasks.easyvqa import FEATURE_NAMES

    # easy-VQA's extractor (same standardisation as easy-VQA's store) reads the drawn shape and colour
    fmeta = st.read_json(Path(corpus.meta["feature_store"]) / st.META)
    raw = np.asarray(ds.stores[0].arrays["feats"])[:, 0] * fmeta["feature_std"] + fmeta["feature_mean"]
    match = [FEATURE_NAMES.index(f"match_{s}") for s in synthetic.SHAPES]
    palette = [FEATURE_NAMES.index(f"palette_{c}") for c in synthetic.COLORS]
    assert (raw[:, match].argmax(1) == shape).mean() > 0.95
    assert (raw[:, palette].argmax(1) == color).mean() > 0.99
    assert ds.visual_feat_dim == 40 and ds.num_regions == 5


def test_batches_corrupt_like_lxmert_and_are_reproducible(corpus):
    ds = corpus.train
    words = 0
    stats = {"chosen": 0, "mask": 0, "kept": 0, "regions": 0, "zeroed": 0, "pairs": 0, "mismatched": 0}
    for epoch in range(3):
        for b in ds.batches(128, Masking(), shuffle=True, seed=1, epoch=epoch):
            ids, labels, att = b["input_ids"], b["mlm_labels"], b["attention_mask"]
            lengths = att.sum(1)
            chosen = labels >= 0
            # never [CLS] (position 0), [SEP] (length - 1) or padding
            assert not chosen[:, 0].any()
            assert not chosen[torch_arange(ids.shape[0]), lengths - 1].any() and not chosen[att == 0].any()
            words += int((lengths - 2).sum())
            stats["chosen"] += int(chosen.sum())
            stats["mask"] += int((ids[chosen] == corpus.meta["mask_id"]).sum())
            stats["kept"] += int((ids[chosen] == labels[chosen]).sum())
            rm = b["region_mask"]
            stats["regions"] += rm.numel()
            stats["zeroed"] += int((b["visual_feats"][rm].abs().sum(-1) == 0).sum())
            assert (b["visual_feats"][~rm] == b["feat_targets"][~rm]).all()
            stats["pairs"] += int((b["match_labels"] >= 0).sum())  # the captions
            stats["mismatched"] += int((b["match_labels"] == 0).sum())
            # a mismatched sentence comes from an image of another shape (key); QA only on matched questions
            keys, sid, tid = ds.image_keys(), b["sentence_id"].numpy(), b["text_id"].numpy()
            mism = (b["match_labels"] == 0).numpy()
            assert (keys[tid[mism]] != keys[sid[mism]]).all() and (tid[~mism] == sid[~mism]).all()
            kinds = np.asarray(ds.arrays["kind"])
            assert (kinds[tid[mism]] == 0).all() and ((b["match_labels"].numpy() == -1) == (kinds[sid] == 1)).all()
            assert ((b["qa_labels"] >= 0).numpy() <= (~mism & (ds.arrays["kind"][sid] == 1))).all()
    assert 0.13 < stats["chosen"] / words < 0.17
    assert 0.75 < stats["mask"] / stats["chosen"] < 0.85 and 0.07 < stats["kept"] / stats["chosen"] < 0.16
    assert 0.10 < stats["zeroed"] / stats["regions"] < 0.14  # 15% masked, 80% of them zeroed
    assert 0.45 < stats["mismatched"] / stats["pairs"] < 0.55
    # the same (seed, epoch) rebuilds the same batches; another epoch differs
    a = next(ds.batches(64, Masking(), shuffle=True, seed=1, epoch=0))
    b = next(ds.batches(64, Masking(), shuffle=True, seed=1, epoch=0))
    c = next(ds.batches(64, Masking(), shuffle=True, seed=1, epoch=1))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert not np.array_equal(a["input_ids"].numpy(), c["input_ids"].numpy())
    # only the tasks asked for corrupt the batch
    clean = next(ds.batches(64, Masking(tasks=("qa",)), shuffle=True, seed=1, epoch=0))
    assert (clean["mlm_labels"] < 0).all() and not clean["region_mask"].any() and (clean["match_labels"] != 0).all()


def torch_arange(n: int):
    import torch

    return torch.arange(n)


# ------------------------------------------------------------------------------ LXMERT's files
def write_lxmert_pretraining(root: Path) -> dict:
    """LXMERT's pretraining folder in its exact formats: two source JSONs, all_ans.json, two TSVs."""
    rng = np.random.default_rng(0)
    train_ids = [f"COCO_train2014_{i:012d}" for i in range(4)]
    val_ids = [f"COCO_val2014_{i:012d}" for i in range(3)]
    feats = write_tsv(root / "mscoco_imgfeat/train2014_obj36.tsv", train_ids, rng)
    feats.update(write_tsv(root / "mscoco_imgfeat/val2014_obj36.tsv", val_ids, rng))
    (root / "lxmert").mkdir(parents=True)
    answers = [{"ans": a, "dsets": ["vqa"]} for a in ("man", "2", "red", "yes")]
    (root / "lxmert/all_ans.json").write_text(json.dumps(answers))
    train = [
        {"img_id": train_ids[0], "sentf": {"mscoco": ["A man riding a horse.", "A horse and a man."],
                                           "vqa": ["Who rides?", "How many legs?"]},
         "labelf": {"vqa": [{"A Man.": 1.0}, {"two": 0.6, "giraffe": 1.0}]}},
        {"img_id": train_ids[1], "sentf": {"vg": ["red car"]}, "labelf": {}},
        {"img_id": train_ids[2], "sentf": {"mscoco": ["a dog"], "gqa": ["Is it red?"]},
         "labelf": {"gqa": [{"red": 0.3, "yes": 0.9}]}},
        {"img_id": "COCO_train2014_000000099999", "sentf": {"mscoco": ["no features for this one"]}, "labelf": {}},
    ]  # fmt: skip
    minival = [{"img_id": val_ids[1], "sentf": {"mscoco": ["two men"]}, "labelf": {}}]
    (root / "lxmert/mscoco_train.json").write_text(json.dumps(train))
    (root / "lxmert/mscoco_minival.json").write_text(json.dumps(minival))
    return {"features": feats, "train_ids": train_ids, "val_ids": val_ids}


def test_lxmert_pretraining_files_load_as_a_corpus(tmp_path, small_vocab):
    root = tmp_path / "data"
    truth = write_lxmert_pretraining(root)
    pcfg = PretrainConfig(corpus="lxmert", root=str(root), sources="mscoco_train", eval_source="mscoco_minival",
                          max_seq_len=12)  # fmt: skip
    data = DataConfig(cache_dir=str(tmp_path / "cache"))
    corpus = load(pcfg, data)
    ds = corpus.train
    texts = json.loads((ds.path / "texts.json").read_text())
    assert texts == ["A man riding a horse.", "A horse and a man.", "Who rides?", "How many legs?", "red car",
                     "a dog", "Is it red?"]  # fmt: skip
    assert ds.meta["splits"]["train"] == {"sentences": 7, "without_features": 1}
    assert list(ds.arrays["kind"]) == [0, 0, 1, 1, 0, 0, 1]
    ans = corpus.answers
    labels = [{ans[i]: float(s) for i, s in zip(li, ls) if i >= 0}
              for li, ls in zip(ds.arrays["label_idx"], ds.arrays["label_score"])]  # fmt: skip
    # LXMERT's answer normalisation ("A Man." -> "man", "two" -> "2"); answers outside all_ans.json dropped
    assert labels[2] == {"man": 1.0} and labels[3] == {"2": pytest.approx(0.6)} and labels[6] == {"red": pytest.approx(0.3), "yes": pytest.approx(0.9)}
    assert labels[0] == {} and corpus.num_object_labels == 1600 and corpus.num_attr_labels == 400
    ev = corpus.eval
    assert len(ev) == 1 and ev.stores[int(ev.arrays["store_id"][0])].path.name == "val2014_obj36"
    # batches carry the TSV's features, boxes and detected labels (unmasked regions)
    b = next(ds.batches(7, Masking(mismatch_prob=0.0), seed=0))
    h, w, boxes, feats = truth["features"][truth["train_ids"][0]]
    keep = ~b["region_mask"][0]
    np.testing.assert_allclose(b["feat_targets"][0].numpy(), feats, rtol=0, atol=0)
    np.testing.assert_allclose(b["visual_feats"][0][keep].numpy(), feats[keep.numpy()], rtol=0, atol=0)
    np.testing.assert_allclose(b["visual_pos"][0].numpy(), np.clip(boxes / [w, h, w, h], 0, 1), atol=1e-6)
    assert b["obj_labels"][0].tolist() == [0, 1, 2, 3] and b["obj_conf"][0].tolist() == [0.5] * 4
    assert b["qa_labels"][2] == ans.index("man") and b["qa_labels"][0] == -1
    assert b["qa_labels"][6] in (ans.index("red"), ans.index("yes"))
    # every other image is a valid mismatch (keys are image identities)
    assert len(set(ds.image_keys().tolist())) == 3
    # LXMERT's tiny subsets: the first N images of each feature file (a full store serves it too)
    tiny = load(PretrainConfig(corpus="lxmert", root=str(root), sources="mscoco_train", eval_source="mscoco_minival",
                               max_seq_len=12, image_limit=2), data)  # fmt: skip
    assert json.loads((tiny.train.path / "texts.json").read_text()) == texts[:5]
    assert all(len(s) == 2 for s in tiny.train.stores) and int(tiny.train.arrays["image_index"].max()) == 1
    assert len(tiny.eval) == 1  # minival's image 1 is within the first 2


def test_missing_lxmert_file_is_named_before_any_work(tmp_path):
    root = tmp_path / "data"
    write_lxmert_pretraining(root)
    (root / "lxmert/all_ans.json").unlink()
    pcfg = PretrainConfig(corpus="lxmert", root=str(root), sources="mscoco_train", eval_source="mscoco_minival")
    with pytest.raises(FileNotFoundError, match="all_ans.json"):
        prepare(pcfg, DataConfig(cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache" / "vqa").exists()
    with pytest.raises(ConfigError, match="unknown LXMERT source"):
        prepare(PretrainConfig(corpus="lxmert", root=str(root), sources="coco"), DataConfig(cache_dir=str(tmp_path)))


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("field,value,match", [
    ("weighting", "gradstd", "pretrain.weighting='gradstd': expected one of equal, grad_std, uncertainty, gradnorm"),
    ("tasks", "mlm,caption", "pretrain.tasks='mlm,caption'"),
    ("tasks", "mlm,mlm", "names a task twice"),
    ("schedule", "qa@epoch=>3", "pretrain.schedule: rule 'qa@epoch=>3'"),
    ("schedule", "itm@epoch>=2", "names task 'itm'"),
    ("mlm_prob", 1.5, "pretrain.mlm_prob=1.5"),
    ("grad_std_floor", 0.0, "pretrain.grad_std_floor"),
    ("weight_every", 0, "pretrain.weight_every=0"),
    ("corpus", "coco", "pretrain.corpus='coco'"),
    ("shared", "all", "pretrain.shared='all'"),
])  # fmt: skip
def test_bad_values_name_the_key(field, value, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace("[", r"\[")):
        PretrainConfig(**{field: value}).validate()


def test_schedule_switches_tasks_by_epoch_and_learning_rate():
    rules = parse_schedule("qa@epoch>=2, mlm@lr>=1e-4", ["mlm", "match", "qa"])
    tasks = ["mlm", "match", "qa"]
    assert active_tasks(tasks, rules, epoch=1, lr=1e-3) == ["mlm", "match"]
    assert active_tasks(tasks, rules, epoch=2, lr=1e-3) == ["mlm", "match", "qa"]
    assert active_tasks(tasks, rules, epoch=3, lr=5e-5) == ["match", "qa"]
    with pytest.raises(ConfigError, match="which pretrain.tasks does not run"):
        parse_schedule("qa@epoch>=2", ["mlm"])
    assert [str(r) for r in rules] == ["qa@epoch>=2", "mlm@lr>=0.0001"]


def test_experiment_config_checks_pretraining_against_the_data():
    from sweeps.config import ConfigError as SweepConfigError
    from sweeps.config import ExperimentConfig, apply_overrides

    cfg = apply_overrides(ExperimentConfig(), {"pretrain.enabled": True, "data.name": "vqa", "data.root": "/x"})
    with pytest.raises(SweepConfigError, match="pretrain.corpus=synthetic needs data.name=easyvqa"):
        cfg.validate()
    cfg = apply_overrides(cfg, {"pretrain.corpus": "lxmert"})
    cfg.validate()  # LXMERT's pretraining files live beside vqa/ in data.root
    assert cfg.pretrain.lxmert_root(cfg.data.root) == "/x"
    cfg = apply_overrides(ExperimentConfig(), {"pretrain.enabled": True, "pretrain.corpus": "lxmert"})
    with pytest.raises(SweepConfigError, match="pretrain.root is empty"):
        cfg.validate()
    with pytest.raises(SweepConfigError, match="pretrain.weighting"):
        apply_overrides(ExperimentConfig(), {"pretrain.weighting": "max"}).validate()


def test_image_store_limit(tmp_path):
    for name, arr in (("feats", np.zeros((5, 2, 3), np.float32)), ("boxes", np.zeros((5, 2, 4), np.float32)),
                      ("objects_id", np.zeros((5, 2), np.int64)), ("attrs_id", np.zeros((5, 2), np.int64)),
                      ("objects_conf", np.ones((5, 2), np.float32)), ("attrs_conf", np.ones((5, 2), np.float32))):  # fmt: skip
        st.save(tmp_path, name, arr)
    assert len(ImageStore.open(tmp_path, limit=3)) == 3 and ImageStore.open(tmp_path).image_key is None
