"""Data pipeline benchmark: batch assembly from the memory-mapped store, and TSV conversion.

``python -m benchmarks.tasks`` builds, in a temporary directory, (1) a store of ``--images`` images at
LXMERT's sizes (36 regions x 2,048 features) with ``--questions`` questions carrying sparse soft
labels over 3,129 answers, and times, on ONE thread, ``ArrayDataset.batches`` (vectorised gathers
from the memory maps) against a plain per-sample ``torch.utils.data.Dataset`` over the same arrays
fed through a ``DataLoader`` with its default collate; (2) a feature TSV of ``--tsv-images`` rows in
LXMERT's exact format, and times LXMERT's way of reading it (``csv.DictReader`` + base64 decode per
field, parse only) against ``tasks.vqa.convert.convert_tsv`` (parse + write to memory maps).

Both sides read data that is in the page cache (just written), so the numbers are CPU costs; a
store larger than RAM is bounded by the disk instead.
"""

from __future__ import annotations

import argparse
import base64
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tasks import store as st
from tasks.dataset import ArrayDataset, FeatureStore, QuestionPart
from tasks.questions import write_part
from tasks.tokenization import Tokenizer
from tasks.vqa.convert import convert_tsv
from tasks.vqa.files import FIELDS
from tasks.vqa.synthetic import write_tsv

NUM_ANSWERS = 3129


def build_store(directory: Path, images: int, questions: int, regions: int, dim: int, seed: int = 0) -> ArrayDataset:
    """A synthetic feature store + question part at the given sizes, opened as an `ArrayDataset`."""
    rng = np.random.default_rng(seed)
    fdir, qdir = directory / "features", directory / "questions"
    fdir.mkdir(parents=True)
    qdir.mkdir(parents=True)
    feats = st.create(fdir, "feats", (images, regions, dim), np.float32)
    for i in range(0, images, 256):
        feats[i : i + 256] = rng.random((min(256, images - i), regions, dim), dtype=np.float32)
    feats.flush()
    del feats
    st.save(fdir, "boxes", rng.random((images, regions, 4), dtype=np.float32))
    st.write_json(fdir / st.META, {"image_ids": list(range(images))})
    answers = [f"a{i}" for i in range(NUM_ANSWERS)]
    labels = []
    for _ in range(questions):
        k = int(rng.integers(1, 11))
        labels.append(dict(zip((f"a{j}" for j in rng.choice(NUM_ANSWERS, k, replace=False)), rng.random(k))))
    tok = Tokenizer("bench", "bench", lambda texts: [[101, *range(2000, 2000 + 1 + i % 17), 102] for i in range(len(texts))])
    meta = write_part(
        qdir,
        texts=["q"] * questions,
        image_index=rng.integers(0, images, questions),
        labels=labels,
        question_ids=np.arange(questions),
        answer_types=["other"] * questions,
        question_types=["what"] * questions,
        ans2label={a: i for i, a in enumerate(answers)},
        tokenizer=tok,
        max_seq_len=20,
    )
    st.write_json(qdir / st.META, meta)
    part = QuestionPart.open(qdir, FeatureStore.open(fdir))
    return ArrayDataset.from_parts([part], answers)


class PerSampleDataset(torch.utils.data.Dataset):
    """The plain baseline: one question at a time, tensors per sample, collated by the DataLoader."""

    def __init__(self, ds: ArrayDataset):
        self.a = ds.arrays
        self.feats, self.boxes = ds.stores[0].feats, ds.stores[0].boxes
        self.num_answers = len(ds.answers)

    def __len__(self) -> int:
        return len(self.a["question_id"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a = self.a
        img = int(a["image_index"][i])
        ids = torch.from_numpy(a["input_ids"][i].astype(np.int64))
        target = torch.zeros(self.num_answers)
        li, ls = a["label_idx"][i], a["label_score"][i]
        keep = li >= 0
        target[torch.from_numpy(li[keep].astype(np.int64))] = torch.from_numpy(ls[keep].copy())
        return {
            "input_ids": ids,
            "attention_mask": (torch.arange(len(ids)) < int(a["lengths"][i])).long(),
            "token_type_ids": torch.zeros_like(ids),
            "visual_feats": torch.from_numpy(np.array(self.feats[img])),
            "visual_pos": torch.from_numpy(np.array(self.boxes[img])),
            "targets": target,
            "question_id": torch.tensor(int(a["question_id"][i])),
        }


def _rate(batches, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    for b in batches:
        n += len(b["question_id"])
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def bench_batches(ds: ArrayDataset, batch_sizes: list[int], seconds: float) -> list[tuple[int, float, float]]:
    """(batch size, ArrayDataset samples/s, DataLoader samples/s) per batch size."""
    rows = []
    plain = PerSampleDataset(ds)
    for bs in batch_sizes:
        ours = _rate(_forever(lambda e, bs=bs: ds.batches(bs, shuffle=True, seed=0, epoch=e)), seconds)
        loader = torch.utils.data.DataLoader(plain, batch_size=bs, shuffle=True, num_workers=0)
        theirs = _rate(_forever(lambda e, loader=loader: iter(loader)), seconds)
        rows.append((bs, ours, theirs))
    return rows


def _forever(make):
    epoch = 0
    while True:
        yield from make(epoch)
        epoch += 1


def lxmert_style_parse(path: Path) -> int:
    """Read a feature TSV the way LXMERT's ``load_obj_tsv`` does (parse only); returns rows read."""
    csv.field_size_limit(sys.maxsize)
    n = 0
    with open(path) as fh:
        for item in csv.DictReader(fh, FIELDS, delimiter="\t"):
            for key in ("img_h", "img_w", "num_boxes"):
                item[key] = int(item[key])
            boxes = item["num_boxes"]
            for key, shape, dtype in (
                ("objects_id", (boxes,), np.int64),
                ("objects_conf", (boxes,), np.float32),
                ("attrs_id", (boxes,), np.int64),
                ("attrs_conf", (boxes,), np.float32),
                ("boxes", (boxes, 4), np.float32),
                ("features", (boxes, -1), np.float32),
            ):
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
            n += 1
    return n


def bench_conversion(directory: Path, images: int, regions: int, dim: int) -> tuple[float, float, float]:
    """(MB of TSV, LXMERT-style parse images/s, convert_tsv images/s)."""
    tsv = directory / "bench_obj36.tsv"
    write_tsv(tsv, [f"img{i}" for i in range(images)], regions, dim)
    t0 = time.perf_counter()
    assert lxmert_style_parse(tsv) == images
    parse = images / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    convert_tsv(tsv, directory / "converted", progress=False)
    conv = images / (time.perf_counter() - t0)
    return tsv.stat().st_size / 1e6, parse, conv


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4000, help="images in the batch-assembly store (default 4000: 1.2 GB)")
    p.add_argument("--questions", type=int, default=40000, help="questions (default 40000)")
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--batch-sizes", default="32,64,128,256", help="comma-separated (default 32,64,128,256)")
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3)")
    p.add_argument("--tsv-images", type=int, default=500, help="rows in the conversion benchmark TSV (default 500)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    p.add_argument("--dir", default="", help="work directory (default: a temporary one, removed after)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="tasks-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        ds = build_store(work / "store", a.images, a.questions, a.regions, a.dim)
        gb = a.images * a.regions * a.dim * 4 / 1e9
        print(f"store: {a.images} images x {a.regions} x {a.dim} float32 ({gb:.2f} GB), {a.questions} questions, "
              f"{NUM_ANSWERS} answers (built in {time.perf_counter() - t0:.1f} s); {a.threads} thread(s)")  # fmt: skip
        rows = bench_batches(ds, [int(b) for b in a.batch_sizes.split(",")], a.seconds)
        print(f"\n{'batch':>6} {'ArrayDataset.batches':>22} {'Dataset+DataLoader':>20} {'speed-up':>9}")
        for bs, ours, theirs in rows:
            print(f"{bs:>6} {ours:>16,.0f} /s {theirs:>14,.0f} /s {ours / theirs:>8.1f}x")
        mb, parse, conv = bench_conversion(work, a.tsv_images, a.regions, a.dim)
        print(f"\nTSV conversion: {a.tsv_images} images x {a.regions} x {a.dim} ({mb:.0f} MB of base64 TSV)")
        print(f"  LXMERT-style csv.DictReader parse only : {parse:>8,.0f} images/s")
        print(f"  tasks.vqa.convert (parse + write)      : {conv:>8,.0f} images/s  ({conv / parse:.1f}x)")
        return {"batches": rows, "tsv_mb": mb, "parse_images_per_s": parse, "convert_images_per_s": conv}
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
