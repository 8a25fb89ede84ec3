"""The multi-node Ray cluster (head and two workers in network namespaces, SeaweedFS on their
bridge), started once per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.multinode.cluster import Cluster, namespaces_usable, ray_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, session_env: None) -> Iterator[Cluster]:
    """Head (no CPUs: it runs only the driver) and workers ``w1``, ``w2`` (1 CPU each);
    skipped only where network namespaces cannot be created."""
    reason = namespaces_usable()
    if reason:
        pytest.skip(f"multi-node Ray test: {reason}")
    with ray_cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started
