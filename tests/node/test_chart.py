"""The chart on the real node: the payper image pulled from the node's registry, the
operator and the gateway Ready through their real probes, under the chart's real
securityContexts; ``helm uninstall`` leaves nothing running.

The agent needs NVML: on a machine without an NVIDIA driver its real container starts
(hostPID, hostPath, root with no capabilities, read-only root filesystem) and stops at
NVML's initialisation, which is what the last test pins down until a simulated backend
can be selected through development values (issue 9, section 3).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from payper_dev.cluster import binaries
from payper_dev.cluster import node as real_node
from payper_dev.testing.cluster import NodeCluster, eventually

REPO = Path(__file__).resolve().parents[2]
VALUES = Path(__file__).with_name("chart-values.yaml")


def _helm(node_cluster: NodeCluster, *args: str) -> str:
    result = subprocess.run(
        [binaries.binary("helm"), *args],
        capture_output=True,
        text=True,
        env=node_cluster.handle.env(),
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}: {result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def release(node_cluster: NodeCluster) -> Iterator[str]:
    """``helm install`` into a privileged namespace (the agent needs hostPID)."""
    handle = node_cluster.handle
    namespace = handle.namespace("payper-system")
    handle.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=privileged")
    registry = node_cluster.payper_image.split("/", 1)[0]
    _helm(
        node_cluster,
        "install", "payper", str(REPO / "charts" / "payper"), "-n", namespace,
        "-f", str(VALUES), "--set", f"image.registry={registry}",
    )  # fmt: skip
    try:
        yield namespace
    finally:
        subprocess.run(
            [binaries.binary("helm"), "uninstall", "payper", "-n", namespace, "--wait"],
            capture_output=True,
            env=handle.env(),
            timeout=120,
            check=False,
        )
        handle.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _pod(node_cluster: NodeCluster, namespace: str, component: str) -> dict[str, Any]:
    pods = node_cluster.handle.get_json(
        "-n", namespace, "pods", "-l", f"app.kubernetes.io/component={component}"
    )["items"]
    assert pods, f"no {component} pod"
    return dict(pods[0])


def test_operator_and_gateway_are_ready_through_their_probes(
    node_cluster: NodeCluster, release: str
) -> None:
    handle = node_cluster.handle
    for deployment in ("payper-operator", "payper-gateway"):
        handle.kubectl(
            "rollout", "status", "-n", release, f"deployment/{deployment}", "--timeout=180s",
            timeout=190,
        )  # fmt: skip
    for component in ("operator", "gateway"):
        pod = _pod(node_cluster, release, component)
        assert pod["spec"]["nodeName"] == real_node.NODE_NAME
        assert pod["status"]["containerStatuses"][0]["imageID"]
        container = pod["spec"]["containers"][0]
        assert container["readinessProbe"], f"{component} has a real readiness probe"
        name = pod["metadata"]["name"]
        # The chart's securityContext holds in the real container: not root, and the root
        # filesystem is read-only.
        uid = handle.kubectl("exec", "-n", release, name, "--", "id", "-u").stdout.strip()
        assert uid == "65532"
        touch = handle.kubectl(
            "exec", "-n", release, name, "--", "touch", "/opt/payper/x", check=False
        )
        assert touch.returncode != 0
        assert "Read-only file system" in touch.stderr


def test_the_agent_runs_under_its_security_context_until_nvml(
    node_cluster: NodeCluster, release: str
) -> None:
    handle = node_cluster.handle

    def agent_log() -> str | None:
        pods = handle.get_json("-n", release, "pods", "-l", "app.kubernetes.io/component=agent")[
            "items"
        ]
        if not pods or not pods[0]["status"].get("containerStatuses"):
            return None
        status = pods[0]["status"]["containerStatuses"][0]
        name = pods[0]["metadata"]["name"]
        if "terminated" in status.get("state", {}):  # the run that just ended
            return handle.kubectl("logs", "-n", release, name, check=False).stdout or None
        if status["restartCount"] >= 1 and "terminated" in status.get("lastState", {}):
            log = handle.kubectl("logs", "-n", release, name, "--previous", check=False).stdout
            return log if "Traceback" in log else None
        return None

    log = eventually(agent_log, 180, interval_s=1, what="the agent's first run to end")
    assert "NVMLError_LibraryNotFound" in log, log
    pod = _pod(node_cluster, release, "agent")
    assert pod["spec"]["nodeName"] == real_node.NODE_NAME
    assert pod["spec"]["hostPID"] is True


def test_uninstall_leaves_nothing_running(node_cluster: NodeCluster, release: str) -> None:
    handle = node_cluster.handle
    _helm(node_cluster, "uninstall", "payper", "-n", release, "--wait", "--timeout", "120s")

    def gone() -> bool:
        return not handle.get_json("-n", release, "pods")["items"]

    eventually(gone, 120, interval_s=0.5, what="the release's pods to be deleted")
