"""The chart on the real node, and the whole loop through it: the payper image pulled
from the node's registry; the operator, the gateway and the agent Ready through their
real probes, under the chart's real securityContexts; an InferenceDeployment of the
stand-in image scaled from zero by a request through the gateway's Service (kube-proxy),
gated by a real readiness probe; the stand-in's busy time billed within 1 %; ``helm
upgrade`` keeps it serving and ``helm uninstall`` leaves nothing running.

The node has no GPU, so the agent runs its simulated backend (development values,
``chart-values.yaml``): the stand-in containers publish their busy intervals with their
own PID and start time, and the agent, in its real container with hostPID, finds their
host PIDs and resolves them through their real cgroups to pod and container. Its
reports are marked simulated, which the operator accepts only because the values say so.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
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
    """``helm install`` into a namespace that enforces the ``restricted`` Pod Security
    level: the operator and the gateway run under it; the agent (hostPID, root) runs in
    the namespace of its own that the chart creates, ``<namespace>-agent``."""
    handle = node_cluster.handle
    namespace = handle.namespace("payper-system")
    handle.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
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


def _agent_namespace(release: str) -> str:
    return f"{release}-agent"


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


def test_the_agent_is_ready_under_its_security_context(
    node_cluster: NodeCluster, release: str
) -> None:
    handle = node_cluster.handle
    agents = _agent_namespace(release)
    labels = handle.get_json("namespace", agents)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    handle.kubectl(
        "rollout", "status", "-n", agents, "daemonset/payper-agent", "--timeout=180s",
        timeout=190,
    )  # fmt: skip
    pod = _pod(node_cluster, agents, "agent")
    assert pod["spec"]["nodeName"] == real_node.NODE_NAME
    assert pod["spec"]["hostPID"] is True
    context = pod["spec"]["containers"][0]["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True
    # hostPID for real: the agent's container sees the node's processes, the kubelet's too.
    kubelet = node_cluster.node.state().pids["kubelet"]  # type: ignore[union-attr]
    name = pod["metadata"]["name"]
    comm = handle.kubectl("exec", "-n", agents, name, "--", "cat", f"/proc/{kubelet}/comm")
    assert comm.stdout.strip() == "kubelet"


def _field(path: str) -> dict[str, Any]:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def _model(node_cluster: NodeCluster, name: str) -> dict[str, Any]:
    """An InferenceDeployment of the stand-in image on the real node, publishing its busy
    time where the agent's simulated backend reads it."""
    return {
        "apiVersion": "payper.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {
                    "nodeSelector": {real_node.REAL_NODE_LABEL: "true"},
                    "tolerations": [{"key": real_node.REAL_NODE_LABEL, "operator": "Exists"}],
                    "terminationGracePeriodSeconds": 5,
                    "containers": [
                        {
                            "name": "server",
                            "image": node_cluster.model_server_image,
                            "ports": [{"containerPort": 8000, "name": "http"}],
                            "readinessProbe": {
                                "httpGet": {"path": "/healthz", "port": "http"},
                                "periodSeconds": 1,
                            },
                            "env": [
                                {"name": "PAYPER_SIM_GPU_DIR", "value": "/sim"},
                                {"name": "PAYPER_SIM_GPUS", "value": "8"},
                                {"name": "POD_UID", **_field("metadata.uid")},
                                {"name": "POD_NAME", **_field("metadata.name")},
                                {"name": "POD_NAMESPACE", **_field("metadata.namespace")},
                                {"name": "NODE_NAME", **_field("spec.nodeName")},
                            ],
                            "volumeMounts": [{"name": "sim", "mountPath": "/sim"}],
                            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                        }
                    ],
                    "volumes": [
                        {
                            "name": "sim",
                            "hostPath": {"path": real_node.SIM_DIR, "type": "Directory"},
                        }
                    ],
                }
            },
            "gpu": {"count": 1},
            "scaling": {
                "minReplicas": 0,
                "maxReplicas": 1,
                "idleTimeoutSeconds": 600,
                "coldStartTimeoutSeconds": 120,
            },
        },
    }


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=150) as response:
        return response.status, dict(response.headers), response.read()


def _busy_us(namespace: str) -> int:
    """The stand-ins' own busy time in ``namespace``, from what they published."""
    total = 0
    for identity_file in Path(real_node.SIM_DIR).glob("*.json"):
        identity = json.loads(identity_file.read_text())
        if identity["pod"]["namespace"] != namespace:
            continue
        for line in identity_file.with_suffix(".busy").read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                total += (int(parts[1]) - int(parts[0])) * 1000
    return total


def _records(node_cluster: NodeCluster, namespace: str) -> list[dict[str, Any]]:
    return list(node_cluster.handle.get_json("-n", namespace, "billingrecords")["items"])


@pytest.fixture(scope="module")
def served_model(node_cluster: NodeCluster, release: str) -> Iterator[tuple[str, str]]:
    """A tenant namespace with one InferenceDeployment, and the gateway's in-cluster URL."""
    handle = node_cluster.handle
    namespace = handle.namespace("tenant-loop")
    handle.apply_items([_model(node_cluster, "llm")], "-n", namespace)
    service = handle.get_json("-n", release, "service", "payper-gateway")
    gateway = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
    try:
        yield namespace, gateway
    finally:
        handle.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_a_request_scales_from_zero_and_its_busy_time_is_billed(
    node_cluster: NodeCluster, release: str, served_model: tuple[str, str]
) -> None:
    handle = node_cluster.handle
    namespace, gateway = served_model
    handle.kubectl(
        "rollout", "status", "-n", release, "deployment/payper-gateway", "--timeout=180s",
        timeout=190,
    )  # fmt: skip
    url = f"{gateway}/{namespace}/llm/v1/infer"

    # The gateway Service (kube-proxy) answers once its endpoints are programmed; the
    # deployment is at zero until this first request.
    def at_zero() -> bool:
        deployments = handle.get_json("-n", namespace, "deployments")["items"]
        return [d["spec"]["replicas"] for d in deployments] == [0]

    eventually(at_zero, 60, interval_s=0.5, what="the operator's Deployment, at zero")
    status, headers, body = eventually(
        lambda: _try_post(url, {"ms": 1500}), 60, interval_s=0.5, what=f"{url} to answer"
    )
    assert status == 200, body
    total_ms = int(headers["X-Payper-Cold-Start-Ms"])
    assert total_ms > 0, headers

    # The cold start in phases, measured for real: the image pulled from the node's
    # registry (the kubelet's own measurement), the container started by containerd.
    def phases() -> dict[str, int] | None:
        deployment = handle.get_json("-n", namespace, "inferencedeployment", "llm")
        cold = deployment.get("status", {}).get("lastColdStart")
        if not cold or "forward" not in cold["phasesMs"] or "image" not in cold["phasesMs"]:
            return None
        return dict(cold["phasesMs"])

    measured = eventually(phases, 30, interval_s=0.5, what="the cold start's phases")
    assert set(measured) == {"create", "schedule", "image", "start", "ready", "forward"}
    assert all(v >= 0 for v in measured.values()), measured
    assert sum(measured.values()) >= total_ms, (measured, total_ms)
    pods = handle.get_json("-n", namespace, "pods", "-l", "payper.dev/inference-deployment=llm")
    (pod,) = pods["items"]
    assert pod["spec"]["nodeName"] == real_node.NODE_NAME
    assert json.loads(body)["pod"] == pod["metadata"]["name"]
    for ms in (1200, 2000, 800, 1600, 1500, 900):
        status, headers, _ = _post(url, {"ms": ms})
        assert status == 200
        assert "X-Payper-Cold-Start-Ms" not in headers  # warm
    busy_us = _busy_us(namespace)
    assert busy_us >= 9_500_000, busy_us

    def billed_us() -> int | None:
        records = _records(node_cluster, namespace)
        active = sum(int((r.get("status") or {}).get("activeUs", 0)) for r in records)
        return active if abs(active - busy_us) <= 0.01 * busy_us else None

    billed = eventually(billed_us, 90, interval_s=1, what=f"records within 1 % of {busy_us} µs")
    records = _records(node_cluster, namespace)
    assert {r["spec"]["inferenceDeployment"] for r in records} == {"llm"}
    assert {r["spec"]["gpuProduct"] for r in records} == {"NVIDIA-Real-Node-Simulated"}
    assert billed > 0


def _try_post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes] | None:
    try:
        return _post(url, body)
    except ConnectionError:
        return None  # the Service's rules not programmed yet
    except urllib.error.URLError as error:
        if isinstance(error.reason, ConnectionError):
            return None
        raise


def test_upgrade_keeps_the_loop_running(
    node_cluster: NodeCluster, release: str, served_model: tuple[str, str]
) -> None:
    handle = node_cluster.handle
    namespace, gateway = served_model
    registry = node_cluster.payper_image.split("/", 1)[0]
    _helm(
        node_cluster,
        "upgrade", "payper", str(REPO / "charts" / "payper"), "-n", release,
        "-f", str(VALUES), "--set", f"image.registry={registry}",
        "--set", "gateway.logLevel=DEBUG", "--set", "agent.logLevel=DEBUG",
        "--wait", "--timeout", "180s",
    )  # fmt: skip
    for namespace_, kind, name in (
        (release, "deployment", "payper-gateway"),
        (_agent_namespace(release), "daemonset", "payper-agent"),
    ):
        handle.kubectl(
            "rollout", "status", "-n", namespace_, f"{kind}/{name}", "--timeout=180s", timeout=190
        )
        workload = handle.get_json("-n", namespace_, kind, name)
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert "--log-level=DEBUG" in container["args"], (name, container["args"])
    before = _busy_us(namespace)
    status, _, _ = eventually(
        lambda: _try_post(f"{gateway}/{namespace}/llm/v1/infer", {"ms": 1000}),
        60,
        interval_s=0.5,
        what="the upgraded gateway to answer",
    )
    assert status == 200
    busy_us = _busy_us(namespace)
    assert busy_us >= before + 1_000_000

    # The upgraded agent (a new pod: its state on the host) bills the new work too.
    def billed_us() -> int | None:
        records = _records(node_cluster, namespace)
        active = sum(int((r.get("status") or {}).get("activeUs", 0)) for r in records)
        return active if abs(active - busy_us) <= 0.01 * busy_us else None

    eventually(billed_us, 90, interval_s=1, what=f"records within 1 % of {busy_us} µs")


def test_uninstall_leaves_nothing_running(node_cluster: NodeCluster, release: str) -> None:
    handle = node_cluster.handle
    _helm(node_cluster, "uninstall", "payper", "-n", release, "--wait", "--timeout", "120s")

    agents = _agent_namespace(release)

    def gone() -> bool:
        if handle.get_json("-n", release, "pods")["items"]:
            return False
        # The agent's namespace goes with the release (its pods with it).
        return handle.kubectl("get", "namespace", agents, check=False).returncode != 0

    eventually(gone, 120, interval_s=0.5, what="the release's pods and the agent's namespace")
