"""One-time conversion of LXMERT ``*_obj36.tsv`` feature files into memory-mapped arrays.

Parsing base64 TSV costs milliseconds per image (LXMERT's loader manages about 180 images/s), so
it is done once; afterwards loading is an ``np.load(mmap_mode="r")``. The output store holds:

==================  ================  ===================================================
``feats.npy``       (M, R, F) f32     region features
``boxes.npy``       (M, R, 4) f32     (x1, y1, x2, y2) / (w, h, w, h), clipped to [0, 1]
``img_h/img_w.npy`` (M,) int32        image size in pixels
``objects_id.npy``  (M, R) int32      detector object class, ``objects_conf`` its confidence
``attrs_id.npy``    (M, R) int32      detector attribute class, ``attrs_conf`` its confidence
``meta.json``       image ids (row order = TSV order), source file, counts
==================  ================  ===================================================

Writes are **atomic**: rows go into ``<store>.partial/`` and the directory is renamed to its final
name only when every row is in. They are **resumable**: every few thousand rows the arrays are
flushed and ``progress.json`` records the rows done and the byte offset reached, so an interrupted
run (Ctrl-C, a killed job) continues from there. A **malformed row** stops the conversion with an
error naming the file and line and removes the partial output (the input must be fixed first).

Command line (converts what ``prepare`` needs, then tokenises the questions; ``--name`` picks the
task whose files under ``--root`` are prepared: ``vqa``, ``gqa`` or ``nlvr2``)::

    python -m tasks.vqa.convert --root data --cache-dir ~/.cache/adaptive-ablation
    python -m tasks.vqa.convert --name gqa --root data
    python -m tasks.vqa.convert --tsv data/mscoco_imgfeat/val2014_obj36.tsv --out /tmp/val2014
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from tasks import store as st
from tasks.config import DataConfig
from tasks.vqa.files import TSVFormatError, parse_row

log = logging.getLogger(__name__)
# 2: meta.json's source records a content hash; rows with non-finite values are refused.
FORMAT_VERSION = 2
CHECKPOINT_ROWS = 2000
PROGRESS = "progress.json"
ARRAYS = ("feats", "boxes", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf")


def _source_sig(tsv: Path) -> dict:
    return st.source_signature(tsv)


def store_state(out: Path, tsv: Path, limit: int) -> tuple[bool, str]:
    """Whether the store at ``out`` is complete and up to date for ``tsv`` (its first ``limit``
    images; a store of the whole file serves any limit), and if not, why (naming both sources).

    A store whose TSV is gone is kept (it is all there is); one converted from other content than
    the TSV now holds, or by another converter version, is not.
    """
    if not st.is_complete(out):
        return False, ""
    meta = st.read_json(out / st.META)
    if meta.get("format_version") == 1 and tsv.is_file():
        meta = _upgrade_v1(out, meta, tsv)
    if meta.get("format_version") != FORMAT_VERSION:
        return False, (f"{out} was converted by converter version {meta.get('format_version')}, this is version "
                       f"{FORMAT_VERSION}")
    if meta.get("limit", 0) not in (0, limit):
        return False, f"{out} holds the first {meta.get('limit')} images, not the first {limit or 'all'}"
    if not tsv.is_file():
        return True, ""
    now = _source_sig(tsv)
    if not st.same_source(meta.get("source"), now):
        return False, (f"{out} was converted from {st.describe_source(meta.get('source'))}, but the feature file "
                       f"is now {st.describe_source(now)}")
    return True, ""


def _upgrade_v1(out: Path, meta: dict, tsv: Path) -> dict:
    """Bring a version-1 store (no content hash, values never checked) to version 2 without
    reconverting hours of TSV: when its recorded size and mtime still match the TSV and every value
    is finite, record the TSV's hash and the new version in its ``meta.json``. Otherwise it is left
    as it is, and so rebuilt (a NaN then fails the conversion, naming its line)."""
    old, now = meta.get("source") or {}, _source_sig(tsv)
    if (old.get("size"), old.get("mtime_ns")) != (now["size"], now["mtime_ns"]):
        return meta
    for name in ("feats", "boxes", "objects_conf", "attrs_conf"):
        array = st.open_array(out, name)
        for i in range(0, len(array), CHECKPOINT_ROWS):
            if not np.isfinite(array[i : i + CHECKPOINT_ROWS]).all():
                log.warning("%s: %s holds non-finite values; reconverting %s", out, name, tsv)
                return meta
    meta = {**meta, "source": now, "format_version": FORMAT_VERSION}
    st.write_json(out / st.META, meta)
    log.info("%s: checked (all values finite) and upgraded to format version %d", out, FORMAT_VERSION)
    return meta


def _count_rows(tsv: Path, limit: int) -> int:
    """Non-empty lines in the file (up to ``limit`` if > 0): the number of images."""
    n = 0
    with open(tsv, "rb") as fh:
        for line in fh:
            if line.strip():
                n += 1
                if limit and n >= limit:
                    break
    return n


def convert_tsv(tsv: Path | str, out: Path | str, limit: int = 0, progress: bool = True) -> Path:
    """Convert one feature TSV (its first ``limit`` images if > 0) into a store at ``out``.

    Idempotent (returns at once if ``out`` is complete), atomic, resumable, and serialised between
    processes by a lock file ``<out>.lock``.

    Args:
        tsv: an LXMERT ``*_obj36.tsv`` file.
        out: the store directory to create.
        limit: convert only the first N images (LXMERT's tiny / fast subsets); 0 = all.
        progress: show a tqdm progress bar (images/s).

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: ``tsv`` does not exist.
        TSVFormatError: a malformed row (file and line named); no output is left behind.
    """
    tsv, out = Path(tsv), Path(out)
    if store_state(out, tsv, limit)[0]:
        return out
    if not tsv.is_file():
        raise FileNotFoundError(f"missing feature file {tsv}")
    with st.file_lock(out.with_name(out.name + ".lock")):
        fresh, why = store_state(out, tsv, limit)
        if fresh:
            return out
        if why:
            log.warning("rebuilding: %s", why)
        partial = out.with_name(out.name + ".partial")
        try:
            _convert_locked(tsv, out, partial, limit, progress)
        except TSVFormatError:
            shutil.rmtree(partial, ignore_errors=True)  # bad input: resuming would fail again
            raise
    return out


def _convert_locked(tsv: Path, out: Path, partial: Path, limit: int, progress: bool) -> None:
    sig = _source_sig(tsv)
    state = None
    if (partial / PROGRESS).is_file():
        state = st.read_json(partial / PROGRESS)
        if state.get("source") != sig or state.get("limit") != limit or state.get("format_version") != FORMAT_VERSION:
            log.warning("discarding %s: it was started from a different source or limit", partial)
            state = None
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        state = _start(tsv, partial, limit, sig)
    else:
        log.info("resuming %s at row %d of %d", partial, state["rows"], state["total"])

    n_total, r, f = state["total"], state["num_boxes"], state["feat_dim"]
    mm = {k: np.load(partial / f"{k}.npy", mmap_mode="r+") for k in ARRAYS}
    ids_path = partial / "img_ids.txt"
    with open(ids_path, "rb") as fh:  # keep exactly the ids of the checkpointed rows
        ids = fh.read().decode().splitlines()[: state["rows"]]
    with open(ids_path, "w") as fh:
        fh.write("".join(i + "\n" for i in ids))

    row, offset, line_no, clipped = state["rows"], state["offset"], state["line"], state["clipped"]
    bar = _bar(n_total, row, tsv.name, progress)
    t0 = time.perf_counter()
    with open(tsv, "rb") as src, open(ids_path, "a") as ids_fh:
        src.seek(offset)
        while row < n_total:
            line = src.readline()
            if not line:
                raise TSVFormatError(f"{tsv}:{line_no + 1}: file ended after {row} of {n_total} images")
            offset += len(line)
            line_no += 1
            if not line.strip():
                continue
            x = parse_row(line, tsv, line_no)
            if x.boxes.shape[0] != r or x.features.shape[1] != f:
                raise TSVFormatError(
                    f"{tsv}:{line_no}: {x.boxes.shape[0]} boxes x {x.features.shape[1]} features, but the "
                    f"first row has {r} x {f}; all rows of a file must agree"
                )
            scale = np.array([x.img_w, x.img_h, x.img_w, x.img_h], np.float32)
            b = x.boxes / scale
            clipped += int(((b < 0) | (b > 1)).sum())
            mm["boxes"][row] = np.clip(b, 0, 1)
            mm["feats"][row] = x.features
            mm["img_h"][row], mm["img_w"][row] = x.img_h, x.img_w
            mm["objects_id"][row], mm["objects_conf"][row] = x.objects_id, x.objects_conf
            mm["attrs_id"][row], mm["attrs_conf"][row] = x.attrs_id, x.attrs_conf
            ids_fh.write(x.img_id + "\n")
            row += 1
            if bar is not None:
                bar.update(1)
            if row % CHECKPOINT_ROWS == 0 and row < n_total:
                _checkpoint(partial, mm, ids_fh, state, row, offset, line_no, clipped)
        _checkpoint(partial, mm, ids_fh, state, row, offset, line_no, clipped)
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t0
    with open(ids_path) as fh:
        image_ids = fh.read().splitlines()
    if len(set(image_ids)) != len(image_ids):
        seen: set[str] = set()
        dup = next(i for i in image_ids if i in seen or seen.add(i))
        shutil.rmtree(partial, ignore_errors=True)
        raise TSVFormatError(f"{tsv}: image id {dup!r} occurs on more than one line")
    del mm
    meta = {
        "image_ids": image_ids,
        "source": sig,
        "limit": limit,
        "num_boxes": r,
        "feat_dim": f,
        "boxes_clipped": clipped,
        "format_version": FORMAT_VERSION,
        "seconds": secs,
    }
    (partial / PROGRESS).unlink()
    ids_path.unlink()
    st.write_json(partial / st.META, meta)
    st.replace(partial, out)  # a stale store (other source, other converter) is replaced whole
    if clipped:
        log.warning("%s: %d box coordinates fell outside the image and were clipped to [0, 1]", tsv, clipped)


def _start(tsv: Path, partial: Path, limit: int, sig: dict) -> dict:
    """Size the arrays from a row count and the first row; create them; write progress 0."""
    n_total = _count_rows(tsv, limit)
    if n_total == 0:
        raise TSVFormatError(f"{tsv}:1: the file holds no feature rows")
    with open(tsv, "rb") as fh:
        line_no = 0
        for line in fh:
            line_no += 1
            if line.strip():
                first = parse_row(line, tsv, line_no)
                break
    r, f = first.features.shape
    shapes = {
        "feats": ((n_total, r, f), np.float32),
        "boxes": ((n_total, r, 4), np.float32),
        "img_h": ((n_total,), np.int32),
        "img_w": ((n_total,), np.int32),
        "objects_id": ((n_total, r), np.int32),
        "objects_conf": ((n_total, r), np.float32),
        "attrs_id": ((n_total, r), np.int32),
        "attrs_conf": ((n_total, r), np.float32),
    }
    for k, (shape, dtype) in shapes.items():
        st.create(partial, k, shape, dtype).flush()
    (partial / "img_ids.txt").write_text("")
    state = {
        "source": sig,
        "limit": limit,
        "format_version": FORMAT_VERSION,
        "total": n_total,
        "num_boxes": r,
        "feat_dim": f,
        "rows": 0,
        "offset": 0,
        "line": 0,
        "clipped": 0,
    }
    st.write_json(partial / PROGRESS, state)
    return state


def _checkpoint(partial: Path, mm: dict, ids_fh, state: dict, row: int, offset: int, line: int, clipped: int) -> None:
    # Data first, then the record that says it is there: a crash between the two only loses work.
    for a in mm.values():
        a.flush()
    ids_fh.flush()
    os.fsync(ids_fh.fileno())
    state.update(rows=row, offset=offset, line=line, clipped=clipped)
    st.write_json(partial / PROGRESS, state)


def _bar(total: int, initial: int, name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"converting {name}", unit="img", file=sys.stderr, smoothing=0.1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tasks.vqa.convert",
        description="Convert LXMERT's *_obj36.tsv features to memory-mapped arrays (once; resumable, atomic) "
        "and tokenise the question files. Without --tsv it prepares what DataConfig(name=NAME, ...) needs.",
    )
    p.add_argument("--name", default="vqa", choices=("vqa", "gqa", "nlvr2"), help="the task (default: vqa)")
    p.add_argument("--root", help="LXMERT's data folder (vqa/, gqa/, nlvr2/ and the *_imgfeat/ folders)")
    p.add_argument("--cache-dir", default="", help="where the arrays go (default: $ADAPTIVE_ABLATION_CACHE or ~/.cache/adaptive-ablation)")
    p.add_argument("--train-splits", default="", help="comma-separated (default: the task's, e.g. train,nominival for vqa)")
    p.add_argument("--eval-split", default="", help="default: the task's (vqa: minival; 'test' for a test-server submission)")
    p.add_argument("--image-limit", type=int, default=0, help="only the first N images per feature file (LXMERT tiny=512, fast=5000)")
    p.add_argument("--max-seq-len", type=int, default=0, help="tokens per question (default 20)")
    p.add_argument("--tokenizer", default="", help="vocab.txt, tokenizer directory or hub name (default: offline bert-base-uncased)")
    p.add_argument("--tsv", help="convert just this TSV file (with --out)")
    p.add_argument("--out", help="output store directory for --tsv")
    p.add_argument("--limit", type=int, default=0, help="with --tsv: only the first N images")
    p.add_argument("--max-unanswerable", type=float, default=DataConfig.max_unanswerable,
                   help="largest share of a split's labelled questions with no answer in the vocabulary "
                   "(default %(default)s; above it the split is refused)")
    p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return _main(p, a)
    except (TSVFormatError, FileNotFoundError, ValueError) as err:  # bad input: one line names it
        if a.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    if a.tsv:
        if not a.out:
            p.error("--tsv needs --out")
        t0 = time.perf_counter()
        convert_tsv(a.tsv, a.out, a.limit)
        meta = st.read_json(Path(a.out) / st.META)
        n = len(meta["image_ids"])
        print(f"{a.out}: {n} images x {meta['num_boxes']} boxes x {meta['feat_dim']} in {time.perf_counter() - t0:.1f} s")
        return 0
    if not a.root:
        p.error("give --root (LXMERT's data folder) or --tsv/--out")
    from tasks import prepare

    cfg = DataConfig(
        name=a.name,
        root=a.root,
        cache_dir=a.cache_dir,
        train_splits=a.train_splits,
        eval_split=a.eval_split,
        image_limit=a.image_limit,
        max_seq_len=a.max_seq_len,
        tokenizer=a.tokenizer,
        max_unanswerable=a.max_unanswerable,
    )
    for k, v in prepare(cfg).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
