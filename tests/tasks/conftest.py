"""Fixtures for tasks/ tests: an LXMERT data folder per test, one easy-VQA cache per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tasks_fixtures import make_lxmert_root


@pytest.fixture
def lxmert_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "data"
    return root, make_lxmert_root(root)


@pytest.fixture(scope="session")
def easyvqa_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir with the default easy-VQA arrays prepared once per test session (a few seconds)."""
    from tasks import DataConfig, prepare

    cache = tmp_path_factory.mktemp("easyvqa-cache")
    prepare(DataConfig(name="easyvqa", cache_dir=str(cache)))
    return cache
