"""The real-node tier: a local cluster with one real node (kubelet, containerd, runc,
CNI, kube-proxy, CoreDNS, kube-router's policy controller, a loopback registry), and
tests of what only a real node shows: probes, pod IPs on a bridge, Services through
kube-proxy, cluster DNS, NetworkPolicy enforced, container cgroups, and a teardown that
leaves nothing behind.

A machine that cannot run the tier (not root, missing packages, no overlayfs) fails it
with the reason. Set PAYPER_SKIP_NODE_TESTS=1 to skip it on purpose: the skip is
reported as a warning, never silently.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from payper_dev.cluster import node as real_node
from payper_dev.cluster.local import ClusterConfig, LocalCluster
from payper_dev.cluster.node import RealNode, cannot_run
from payper_dev.testing.cluster import ClusterHandle, NodeCluster

SKIP_ENV = "PAYPER_SKIP_NODE_TESTS"
REPO = Path(__file__).resolve().parents[2]
TEST_POD_CIDR = "127.3.0.0/16"


def _version() -> str:
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get(SKIP_ENV):
        return
    message = (
        f"{SKIP_ENV} is set: the real-node tier ({len(items)} tests) is SKIPPED; "
        "nothing about the real node was tested"
    )
    warnings.warn(message, pytest.PytestWarning, stacklevel=1)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"WARNING: {message}", yellow=True, bold=True)
    for item in items:
        item.add_marker(pytest.mark.skip(reason=message))


@pytest.fixture(scope="session")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    reason = cannot_run()
    if reason:
        pytest.fail(
            f"this machine cannot run the real-node tier: {reason}. "
            f"Set {SKIP_ENV}=1 to skip it explicitly.",
            pytrace=False,
        )
    version = _version()
    archives = {
        "payper": REPO / "build" / "images" / f"payper-{version}.tar",
        "model-server": REPO / "build" / "images" / f"payper-model-server-{version}.tar",
    }
    missing = [str(p) for p in archives.values() if not p.is_file()]
    if missing:
        pytest.fail(
            f"image archives missing: {', '.join(missing)} (`make test-node` builds them)",
            pytrace=False,
        )
    directory = tmp_path_factory.mktemp("node-cluster")
    config = ClusterConfig(
        gpu_nodes=1,
        pod_cidr=TEST_POD_CIDR,
        crds_dir=str(REPO / "crds"),
        real_node=True,
    )
    cluster = LocalCluster(directory)
    try:
        kubeconfig = cluster.up(config)
        node = RealNode(directory)
        images = {
            name: node.push(path, f"payper/{name}:{version}") for name, path in archives.items()
        }
        yield NodeCluster(
            ClusterHandle(kubeconfig, config.pod_cidr, config.cold_start_ms),
            node,
            model_server_image=images["model-server"],
            payper_image=images["payper"],
        )
    finally:
        cluster.down()


def _pod(name: str, image: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeSelector": {real_node.REAL_NODE_LABEL: "true"},
            "tolerations": [{"key": real_node.REAL_NODE_LABEL, "operator": "Exists"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "server",
                    "image": image,
                    "ports": [{"containerPort": 8000, "name": "http"}],
                    "readinessProbe": {
                        "httpGet": {"path": "/healthz", "port": "http"},
                        "periodSeconds": 1,
                    },
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                }
            ],
        },
    }


@pytest.fixture(scope="session")
def pod_manifest() -> Callable[[str, str, dict[str, str]], dict[str, Any]]:
    """How this tier makes a pod on the real node (name, image, labels), for tests that
    make several."""
    return _pod


@pytest.fixture
def namespace(node_cluster: NodeCluster, request: pytest.FixtureRequest) -> Any:
    name = node_cluster.handle.namespace(request.node.name.replace("_", "-")[:40].strip("-"))
    yield name
    node_cluster.handle.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def served_pod(node_cluster: NodeCluster, namespace: str) -> dict[str, Any]:
    """A stand-in model server pod on the real node, Ready through its readiness probe."""
    handle = node_cluster.handle
    pod = _pod("server", node_cluster.model_server_image, {"app": "server"})
    handle.apply_items([pod], "-n", namespace)
    handle.kubectl(
        "wait",
        "-n",
        namespace,
        "pod/server",
        "--for=condition=Ready",
        "--timeout=120s",
        timeout=130,
    )
    return dict(handle.get_json("-n", namespace, "pod", "server"))
