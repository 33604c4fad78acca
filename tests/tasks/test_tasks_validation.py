"""Nothing wrong gets through conversion (issue 13, items 2, 4, 8), through ``python -m tasks.vqa.convert``.

* caches are keyed by what they were built from: a replaced feature TSV, or another data folder
  with the same cache dir, rebuilds the converted arrays and the question stores that index them;
* values are validated: non-finite features, boxes or scores are refused naming file:line;
  duplicate question ids, ill-typed entries and label scores are refused naming the file, the
  entry and the key; a split whose answers are mostly outside the vocabulary is refused above a
  share the user sets;
* every refusal is one ``error:`` line, no traceback.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tasks_fixtures import lxmert_row, make_lxmert_root, write_tsv

from tasks import store as st
from tasks.vqa import convert

ROOT = Path(__file__).resolve().parents[2]
TRAIN_TSV = "mscoco_imgfeat/train2014_obj36.tsv"


def run_cli(*args: str) -> tuple[int, str]:
    """``python -m tasks.vqa.convert ARGS`` in a fresh process (the user's view: exit code, output)."""
    proc = subprocess.run([sys.executable, "-m", "tasks.vqa.convert", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return proc.returncode, proc.stdout + proc.stderr


def convert_root(root: Path, cache: Path, capsys, *extra: str) -> tuple[int, str]:
    """The same command, in this process (faster; same ``main``)."""
    code = convert.main(["--root", str(root), "--cache-dir", str(cache), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def train_store(cache: Path) -> Path:
    return cache / "vqa" / "features" / "train2014_obj36"


def test_a_replaced_tsv_rebuilds_its_store_and_the_questions_that_index_it(tmp_path, caplog):
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_lxmert_root(root)
    code, out = run_cli("--root", str(root), "--cache-dir", str(cache))
    assert code == 0, out
    before = np.load(train_store(cache) / "feats.npy")
    question_dirs = {p.name for p in (cache / "vqa").glob("questions-*/train-*") if p.is_dir()}

    # The same image ids in another order with other features: serving the old arrays would give
    # every question another image's features.
    ids = json.loads((root / "vqa/train.json").read_text())
    img_ids = list(dict.fromkeys(e["img_id"] for e in ids))[::-1]
    truth = write_tsv(root / TRAIN_TSV, img_ids, np.random.default_rng(7))
    code, out = run_cli("--root", str(root), "--cache-dir", str(cache))
    assert code == 0, out
    assert "rebuilding" in out and str(root / TRAIN_TSV) in out and "was converted from" in out
    after = np.load(train_store(cache) / "feats.npy")
    meta = st.read_json(train_store(cache) / st.META)
    assert meta["image_ids"] == img_ids
    for row, img in enumerate(img_ids):
        np.testing.assert_array_equal(after[row], truth[img][3])
    assert not np.array_equal(before, after)
    # the train questions were re-indexed into the new store (a new store, keyed by its content)
    new_dirs = {p.name for p in (cache / "vqa").glob("questions-*/train-*") if p.is_dir()} - question_dirs
    assert len(new_dirs) == 1

    # another data folder (same file names, other content) with the same cache dir: rebuilt again
    other = tmp_path / "other"
    make_lxmert_root(other, seed=3)
    code, out = run_cli("--root", str(other), "--cache-dir", str(cache))
    assert code == 0, out
    assert "rebuilding" in out and str(other / TRAIN_TSV) in out
    assert st.read_json(train_store(cache) / st.META)["source"]["path"] == str((other / TRAIN_TSV).resolve())


def test_an_unchanged_tsv_is_not_converted_again(tmp_path, capsys):
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_lxmert_root(root)
    assert convert_root(root, cache, capsys)[0] == 0
    stamp = (train_store(cache) / "feats.npy").stat().st_mtime_ns
    # a copy of the data folder keeps the files' content and times (cp -p): the store is reused
    shutil.copytree(root, tmp_path / "copy", copy_function=shutil.copy2)
    code, out = convert_root(tmp_path / "copy", cache, capsys)
    assert code == 0 and "rebuilding" not in out
    assert (train_store(cache) / "feats.npy").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("field", ["features", "boxes", "objects_conf"])
def test_non_finite_values_are_refused_naming_file_and_line(tmp_path, field):
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_lxmert_root(root)
    lines = (root / TRAIN_TSV).read_text().splitlines(keepends=True)
    boxes = np.array([[1, 1, 20, 20]] * 4, np.float32)
    feats = np.ones((4, 16), np.float32)
    if field == "features":
        feats[2, 5] = np.nan
    elif field == "boxes":
        boxes[1, 2] = np.inf
    img = lines[2].split("\t", 1)[0]
    row = lxmert_row(img, 100, 100, boxes, feats)
    if field == "objects_conf":  # the fixture writes 0.5 for every box: put a NaN in its place
        parts = row.split("\t")
        parts[4] = base64.b64encode(np.array([0.5, np.nan, 0.5, 0.5], np.float32).tobytes()).decode()
        row = "\t".join(parts)
    lines[2] = row
    (root / TRAIN_TSV).write_text("".join(lines))
    code, out = run_cli("--root", str(root), "--cache-dir", str(cache))
    assert code == 2, out
    assert f"{root / TRAIN_TSV}:3:" in out and field in out and "non-finite" in out
    assert "Traceback" not in out
    assert not st.is_complete(train_store(cache)) and not (cache / "vqa/features/train2014_obj36.partial").exists()


def _edit_questions(root: Path, split: str, edit) -> None:
    path = root / f"vqa/{split}.json"
    entries = json.loads(path.read_text())
    edit(entries)
    path.write_text(json.dumps(entries))


@pytest.mark.parametrize("case, expected", [
    ("duplicate_id", ["question_id 102 occurs twice", "entries 0 and 1"]),
    ("sent_null", ["entry 2 (question_id=103)", "sent must be a non-empty string", "None"]),
    ("not_a_dict", ["entry 1 is a list", "not a question object"]),
    ("score_text", ["entry 0 (question_id=101)", "label['red']", "'high'"]),
    ("score_nan", ["entry 0 (question_id=101)", "label['red']", "nan"]),
    ("label_list", ["entry 0 (question_id=101)", "label must be an object"]),
])
def test_bad_question_entries_are_refused_naming_file_entry_and_key(tmp_path, capsys, case, expected):
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_lxmert_root(root)

    def edit(entries):
        if case == "duplicate_id":
            entries[0]["question_id"] = entries[1]["question_id"]
        elif case == "sent_null":
            entries[2]["sent"] = None
        elif case == "not_a_dict":
            entries[1] = ["not", "an", "entry"]
        elif case == "score_text":
            entries[0]["label"]["red"] = "high"
        elif case == "score_nan":
            entries[0]["label"]["red"] = float("nan")
        elif case == "label_list":
            entries[0]["label"] = ["red"]

    _edit_questions(root, "train", edit)
    code, out = convert_root(root, cache, capsys)
    assert code == 2, out
    assert f"error: {root / 'vqa/train.json'}" in out and "Traceback" not in out, out
    for text in expected:
        assert text in out, (text, out)


def test_answers_outside_the_vocabulary_are_refused_above_the_share_the_user_sets(tmp_path, capsys):
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_lxmert_root(root)
    # another data set's vocabulary: no answer of the question files is in it
    vocab = ["cat", "tree", "blue", "7", "maybe not"]
    (root / "vqa/trainval_label2ans.json").write_text(json.dumps(vocab))
    (root / "vqa/trainval_ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(vocab)}))
    code, out = convert_root(root, cache, capsys)
    assert code == 2, out
    assert str(root / "vqa/train.json") in out and "18 of 18 labelled questions (100.0%)" in out
    assert "data.max_unanswerable=0.25" in out and "--max-unanswerable" in out
    # the user accepts it explicitly
    code, out = convert_root(root, cache, capsys, "--max-unanswerable", "1")
    assert code == 0, out
    # one question of three without an answer in the real vocabulary passes the default
    make_lxmert_root(root)
    _edit_questions(root, "train", lambda entries: entries[0].update(label={"purple": 1.0}))
    code, out = convert_root(root, cache, capsys)
    assert code == 0, out
