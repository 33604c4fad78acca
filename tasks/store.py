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
