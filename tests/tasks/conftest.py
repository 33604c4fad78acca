"""Fixtures for tasks/ tests: LXMERT data folders (VQA, GQA, NLVR2) per test, one easy-VQA cache per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tasks_fixtures import make_gqa_root, make_lxmert_root, make_nlvr2_root


@pytest.fixture
def lxmert_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "data"
    return root, make_lxmert_root(root)


@pytest.fixture
def gqa_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "data"
    return root, make_gqa_root(root)


@pytest.fixture
def nlvr2_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "data"
    return root, make_nlvr2_root(root)


@pytest.fixture(scope="session")
def easyvqa_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir with the default easy-VQA arrays prepared once per test session (a few seconds)."""
    from tasks import DataConfig, prepare

    cache = tmp_path_factory.mktemp("easyvqa-cache")
    prepare(DataConfig(name="easyvqa", cache_dir=str(cache)))
    return cache
