"""Fixtures for the cluster tests (multi-node and fault tolerance; see docs/cluster.md)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cluster_data_cache(tmp_path_factory):
    """One easy-VQA cache for every sweep of these tests (``data.cache_dir=``): the first driver
    builds it, the others reuse it instead of spending seconds on it each."""
    return tmp_path_factory.mktemp("cluster-data-cache")
