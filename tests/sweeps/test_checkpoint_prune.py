"""Orphan checkpoint folders (persisted by a worker lost before it reported them) are removed
after a trial finishes; the checkpoints Ray Train kept, and its own files, stay."""

from pathlib import Path

import pyarrow.fs
from ray.train import Checkpoint, Result

from sweeps.loop import STATE_FILE
from sweeps.tune import prune_unregistered_checkpoints


def _folder(run_dir: Path, name: str) -> Path:
    folder = run_dir / name
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_bytes(b"x")
    return folder


def _result(run_dir: Path, kept: list[Path], fs=None) -> Result:
    return Result(metrics={"epoch": 3}, checkpoint=Checkpoint.from_directory(str(kept[-1])) if kept else None,
                  error=None, path=str(run_dir),
                  best_checkpoints=[(Checkpoint.from_directory(str(k)), {"epoch": i}) for i, k in enumerate(kept)],
                  _storage_filesystem=fs or pyarrow.fs.LocalFileSystem())


def test_orphans_go_and_registered_checkpoints_stay(tmp_path, capsys):
    run_dir = tmp_path / "span-s0"
    orphan = _folder(run_dir, "checkpoint_2026-11-22_10-00-05.000001")
    kept = [_folder(run_dir, "checkpoint_2026-11-22_10-00-09.000002"),
            _folder(run_dir, "checkpoint_2026-11-22_10-00-12.000003")]
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")
    removed = prune_unregistered_checkpoints(_result(run_dir, kept), "span-s0")
    assert removed == [orphan] and not orphan.exists()
    assert all((k / STATE_FILE).exists() for k in kept)
    assert (run_dir / "checkpoint_manager_snapshot.json").exists()
    assert "[span-s0] removed 1 checkpoint folder(s)" in capsys.readouterr().out


def test_nothing_removed_without_registered_checkpoints_or_on_remote_storage(tmp_path):
    run_dir = tmp_path / "softmax-s0"
    folders = [_folder(run_dir, f"checkpoint_{i}") for i in range(3)]
    # No checkpoint registered (nothing to tell orphans from): leave everything.
    assert prune_unregistered_checkpoints(_result(run_dir, []), "softmax-s0") == []
    # Storage that is not a local/shared filesystem is left to its own lifecycle rules.
    sub_fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    assert prune_unregistered_checkpoints(_result(run_dir, folders[1:], fs=sub_fs), "softmax-s0") == []
    assert all(f.exists() for f in folders)
