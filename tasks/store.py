"""Prepared arrays on disk: one directory per artefact, built once, atomically, then memory-mapped.

A store directory holds ``.npy`` files (opened with ``mmap_mode="r"``, so loading costs
milliseconds and the page cache is shared by every trial on a machine) and a ``meta.json``.
It is built under a temporary name and renamed into place only when complete, so a reader
never sees a half-written store: the rename is atomic on one filesystem, and a process that
loses a race (the final name already exists) discards its own copy. A lock file next to the
store keeps concurrent `prepare` calls from doing the same work twice; the rename alone keeps
them correct where locks do not work (some network filesystems).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

META = "meta.json"


def is_complete(path: Path) -> bool:
    """A store is complete once its directory exists under the final name with a ``meta.json``."""
    return (path / META).is_file()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if absent), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_once(path: Path, build: Callable[[Path], dict]) -> Path:
    """Build the store at ``path`` unless it exists; safe under concurrent callers.

    Args:
        path: final directory of the store.
        build: ``build(tmp_dir) -> meta`` writes the arrays into ``tmp_dir`` (an empty directory
            beside ``path``) and returns the JSON-able metadata written as ``meta.json`` last.

    Returns:
        ``path``, complete.
    """
    if is_complete(path):
        return path
    with file_lock(path.with_name(path.name + ".lock")):
        if is_complete(path):  # another process finished it while we waited for the lock
            return path
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            meta = build(tmp)
            write_json(tmp / META, meta)
            publish(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return path


def publish(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` directory to ``path``; if ``path`` already exists, drop ``tmp``."""
    for f in tmp.iterdir():  # data must be on disk before the name says "complete"
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        os.rename(tmp, path)
    except OSError:
        if not is_complete(path):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # lost the race: the winner's copy is identical


def replace(tmp: Path, path: Path) -> None:
    """Put the finished store ``tmp`` in place of the (stale) store at ``path``.

    The old directory is renamed aside first and removed after: readers that already opened its
    files keep them (POSIX), new readers see either the old store or the new one, never a mix.
    """
    if not path.exists():
        publish(tmp, path)
        return
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(path, aside)
    os.rename(tmp, path)
    shutil.rmtree(aside, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# what a store was built from
# ------------------------------------------------------------------------------------------------

#: Files up to this size are hashed whole; larger ones by their first and last HEAD_TAIL bytes.
FULL_HASH_MAX = 64 << 20
HEAD_TAIL = 1 << 20
_HASHES: dict[tuple, tuple[str, str]] = {}


def source_signature(path: str | Path) -> dict:
    """What identifies the content of the source file ``path``: its size, modification time and a
    SHA-256 (of the whole file up to 64 MiB, else of its first and last MiB with the size).

    Stores record the signatures of their sources (``meta.json``) and are rebuilt when a source's
    signature changes. A change that keeps size and modification time and touches only the middle
    of a big file goes unseen; anything that rewrites the file (a copy, a download, an edit) does
    not. Hashes are remembered per process for an unchanged (path, inode, size, mtime).
    """
    path = Path(path).resolve()
    stat = path.stat()
    ident = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if ident not in _HASHES:
        import hashlib

        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            if stat.st_size <= FULL_HASH_MAX:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
                how = "full"
            else:
                digest.update(str(stat.st_size).encode())
                digest.update(fh.read(HEAD_TAIL))
                fh.seek(stat.st_size - HEAD_TAIL)
                digest.update(fh.read(HEAD_TAIL))
                how = "head+tail"
        _HASHES[ident] = (digest.hexdigest(), how)
    sha, how = _HASHES[ident]
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha, "hashed": how}


def same_source(a: dict | None, b: dict | None) -> bool:
    """Whether two signatures describe the same content (wherever the files live)."""
    keys = ("size", "mtime_ns", "sha256")
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in keys)


def describe_source(sig: dict | None) -> str:
    """``path (N bytes, modified <time>, sha256 <12 hex>)`` for messages."""
    if not sig:
        return "an unrecorded source (a store from an older converter)"
    import time

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sig.get("mtime_ns", 0) / 1e9))
    return f"{sig.get('path')} ({sig.get('size')} bytes, modified {when}, sha256 {str(sig.get('sha256', '?'))[:12]})"


def content_key(*parts: object) -> str:
    """A short key for a store's directory name from what it is built from: source signatures
    (their size, mtime and hash, not their path: a copied data folder reuses the store) and
    settings such as a format version."""
    import hashlib

    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict) and "sha256" in part:
            part = (part.get("size"), part.get("mtime_ns"), part.get("sha256"))
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def read_json(path: Path) -> object:
    with open(path) as fh:
        return json.load(fh)


def save(directory: Path, name: str, array: np.ndarray) -> None:
    """Save ``array`` as ``directory/name.npy``."""
    np.save(directory / f"{name}.npy", np.ascontiguousarray(array))


def create(directory: Path, name: str, shape: tuple[int, ...], dtype: np.dtype | str) -> np.memmap:
    """A writable ``.npy`` memory map of ``shape`` (filled in place, e.g. chunk by chunk)."""
    return np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def open_array(directory: Path, name: str) -> np.ndarray:
    """Memory-map ``directory/name.npy`` read-only."""
    return np.load(directory / f"{name}.npy", mmap_mode="r")
