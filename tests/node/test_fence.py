"""The tenant fence, enforced: the NetworkPolicy the operator writes for every
InferenceDeployment (``builders.network_policy``) on the real node, whose kube-router
network policy controller enforces NetworkPolicy on the pod bridge.

Three namespaces: tenant B runs a model pod behind the Service the operator makes for it
(``builders.service``); tenant A runs a pod of its own, labelled even with the gateway's
labels (a tenant labels its own pods as it likes); a third namespace plays the gateway's,
with a pod carrying the gateway's labels. Without the fence A reaches B's pod and its
Service (so the fenced test can fail); with it A is turned away from both while the
gateway still gets through, and taking the fence away lets A in again.

Every probe is a bounded TCP connect plus one HTTP request from inside a pod (kubectl
exec); every wait is on an outcome, never a timer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from payper.api.inference_deployment import InferenceDeploymentSpec
from payper.operator import builders
from payper.operator.config import TenantFenceConfig
from payper_dev.testing.cluster import NodeCluster, eventually

MODEL = "model"
"""Tenant B's InferenceDeployment: its pod's labels, its Service, its fence."""
OWNER_UID = "00000000-0000-4000-8000-00000000fe1c"
"""The UID the builders stamp into the owner reference (dropped below: no operator runs
here, and the garbage collector would take objects whose owner does not exist)."""
CONNECT_TIMEOUT_S = 3
BLOCKED = ("refused", "timed out", "unreachable")

PROBE = """
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(b"GET /healthz HTTP/1.0\\r\\nHost: probe\\r\\n\\r\\n")
        print("answered" if conn.recv(16).startswith(b"HTTP/") else "silent")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timed out")
except OSError as error:
    print(f"unreachable (errno {error.errno})")
"""
"""Run in a pod: one TCP connection and one request, bounded; prints what happened."""


@dataclass
class Tenants:
    node_cluster: NodeCluster
    a: str
    b: str
    gateway_ns: str
    b_pod_ip: str
    b_service_ip: str
    fence: TenantFenceConfig
    spec: InferenceDeploymentSpec

    def probe(self, namespace: str, pod: str, host: str, port: int) -> str:
        """What ``pod`` gets when it connects to ``host:port`` and asks for /healthz."""
        result = self.node_cluster.handle.kubectl(
            "exec",
            "-n",
            namespace,
            pod,
            "--",
            "python",
            "-c",
            PROBE,
            host,
            str(port),
            str(CONNECT_TIMEOUT_S),
            timeout=CONNECT_TIMEOUT_S + 30,
        )
        return result.stdout.strip()

    def from_a(self, host: str, port: int) -> str:
        return self.probe(self.a, "client", host, port)

    def from_gateway(self, host: str, port: int) -> str:
        return self.probe(self.gateway_ns, "gateway", host, port)

    def policy(self) -> dict[str, Any]:
        """Tenant B's fence, as the operator's controller renders it."""
        policy = builders.network_policy(
            MODEL,
            self.b,
            OWNER_UID,
            self.spec,
            self.fence.gateway_namespace,
            self.fence.gateway_pod_labels,
            self.fence.allow_from,
        )
        del policy["metadata"]["ownerReferences"]
        return policy

    def remove_fence(self) -> None:
        self.node_cluster.handle.kubectl(
            "delete", "networkpolicy", MODEL, "-n", self.b, "--ignore-not-found"
        )


def _wait_ready(node_cluster: NodeCluster, namespace: str, pod: str) -> dict[str, Any]:
    handle = node_cluster.handle
    handle.kubectl(
        "wait",
        "-n",
        namespace,
        f"pod/{pod}",
        "--for=condition=Ready",
        "--timeout=120s",
        timeout=130,
    )
    return dict(handle.get_json("-n", namespace, "pod", pod))


@pytest.fixture(scope="module")
def tenants(
    node_cluster: NodeCluster,
    pod_manifest: Callable[[str, str, dict[str, str]], dict[str, Any]],
) -> Iterator[Tenants]:
    handle = node_cluster.handle
    image = node_cluster.model_server_image
    a, b, gateway_ns = (handle.namespace(p) for p in ("fence-a", "fence-b", "fence-gateway"))
    try:
        fence = TenantFenceConfig(gateway_namespace=gateway_ns)
        gateway_labels = dict(fence.gateway_pod_labels)
        model_pod = pod_manifest("server", image, builders.selector_labels(MODEL))
        spec = InferenceDeploymentSpec.model_validate(
            {"template": {"spec": {"containers": model_pod["spec"]["containers"]}}}
        )
        assert spec.serving_port() == 8000
        service = builders.service(MODEL, b, OWNER_UID, spec)
        del service["metadata"]["ownerReferences"]
        handle.apply_items([model_pod, service], "-n", b)
        handle.apply_items(
            [pod_manifest("client", image, {**builders.selector_labels("a"), **gateway_labels})],
            "-n",
            a,
        )
        handle.apply_items([pod_manifest("gateway", image, gateway_labels)], "-n", gateway_ns)
        b_pod = _wait_ready(node_cluster, b, "server")
        _wait_ready(node_cluster, a, "client")
        _wait_ready(node_cluster, gateway_ns, "gateway")
        b_service_ip = handle.get_json("-n", b, "service", MODEL)["spec"]["clusterIP"]
        yield Tenants(
            node_cluster,
            a,
            b,
            gateway_ns,
            b_pod["status"]["podIP"],
            b_service_ip,
            fence,
            spec,
        )
    finally:
        for namespace in (a, b, gateway_ns):
            handle.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_without_the_fence_one_tenant_reaches_another(tenants: Tenants) -> None:
    """The control: the network itself lets A in, so only the fence can keep it out."""
    tenants.remove_fence()
    port = tenants.spec.serving_port()
    assert port is not None
    eventually(
        lambda: tenants.from_a(tenants.b_pod_ip, port) == "answered",
        60,
        what="tenant A to reach tenant B's pod without a fence",
    )
    eventually(
        lambda: tenants.from_a(tenants.b_service_ip, builders.SERVICE_PORT) == "answered",
        60,
        what="tenant A to reach tenant B's Service without a fence",
    )


def test_the_fence_admits_only_the_gateway(tenants: Tenants) -> None:
    handle = tenants.node_cluster.handle
    port = tenants.spec.serving_port()
    assert port is not None
    policy = tenants.policy()
    handle.apply_items([policy], "-n", tenants.b)
    try:
        # kube-router applies it within a sync of the policy event.
        def a_turned_away() -> str | None:
            outcome = tenants.from_a(tenants.b_pod_ip, port)
            return outcome if outcome.startswith(BLOCKED) else None

        eventually(a_turned_away, 60, what="tenant A to be turned away from tenant B's pod")
        via_service = tenants.from_a(tenants.b_service_ip, builders.SERVICE_PORT)
        assert via_service.startswith(BLOCKED), via_service
        # The gateway's pods, in the gateway's namespace, get through on the serving
        # port, directly and through the Service.
        assert tenants.from_gateway(tenants.b_pod_ip, port) == "answered"
        assert tenants.from_gateway(tenants.b_service_ip, builders.SERVICE_PORT) == "answered"
        # B's pod is still Ready: the kubelet's probes come from the node, not a tenant.
        pod = handle.get_json("-n", tenants.b, "pod", "server")
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"]
        assert ready == "True", json.dumps(pod["status"])
    finally:
        tenants.remove_fence()
    # And it was the fence: without it A gets in again.
    eventually(
        lambda: tenants.from_a(tenants.b_pod_ip, port) == "answered",
        60,
        what="tenant A to reach tenant B's pod once the fence is gone",
    )
