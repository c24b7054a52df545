"""The integration tier: one real local cluster per test session.

The cluster lives in a directory of its own, with pod IPs in 127.2.0.0/16 (or the next
loopback range no other test run here holds), so a developer's cluster (``make
cluster-up``, 127.1.0.0/16), the demo's and a second test run keep running undisturbed.
Set PAYPER_TEST_KUBECONFIG to run against a cluster that is already up instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from payper_dev.cluster.local import ClusterConfig
from payper_dev.loopback import claimed_pod_range
from payper_dev.testing.cluster import ClusterHandle, local_cluster

TEST_POD_RANGE = 2
"""Pod IPs from 127.2.0.0/16, or the next loopback range no other cluster here holds."""
TEST_POD_CIDR = "127.2.0.0/16"
"""The range a cluster given by PAYPER_TEST_KUBECONFIG is assumed to use."""
TEST_COLD_START_MS = 1500
CRDS = Path(__file__).resolve().parents[2] / "crds"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHandle]:
    external = os.environ.get("PAYPER_TEST_KUBECONFIG")
    if external:
        yield ClusterHandle(Path(external), TEST_POD_CIDR, TEST_COLD_START_MS)
        return
    # Payper's CRDs are served before the controller-manager starts, so its garbage
    # collector cascades their deletion from the first test on (see payper_dev.cluster.local).
    with own_cluster(tmp_path_factory.mktemp("cluster"), CRDS) as handle:
        yield handle


@contextmanager
def own_cluster(directory: Path, crds_dir: Path) -> Iterator[ClusterHandle]:
    """A local cluster of a module's own, serving ``crds_dir`` from the start, on a
    loopback pod range no other cluster here holds: for a module whose assertions cover
    cluster-wide state (every record, the shared system namespace) or old CRDs."""
    with claimed_pod_range(preferred=TEST_POD_RANGE) as pod_cidr:
        config = ClusterConfig(
            pod_cidr=pod_cidr, cold_start_ms=TEST_COLD_START_MS, crds_dir=str(crds_dir)
        )
        with local_cluster(directory, config) as handle:
            yield handle


@pytest.fixture(scope="session")
def crds_installed(cluster: ClusterHandle, repo: Path) -> ClusterHandle:
    cluster.install_crds(repo / "crds")
    return cluster


@pytest.fixture
def namespace(cluster: ClusterHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    name = cluster.namespace(re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-"))
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client without a connection limit (tests open hundreds of requests at once)."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        yield session
