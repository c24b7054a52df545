"""Pure builders: an InferenceDeployment's spec in, the manifests of its children out.

No I/O here, so the exact shape of every child is unit-tested without a cluster, and
applying the same spec twice produces byte-identical manifests (server-side apply then
changes nothing, and no rollout is triggered by the operator itself).
"""

from __future__ import annotations

from typing import Any

from payper.api.common import API_VERSION
from payper.api.inference_deployment import (
    GPU_PRODUCT_LABEL,
    KIND,
    POD_LABEL,
    InferenceDeploymentSpec,
)

MANAGED_BY = {"app.kubernetes.io/managed-by": "payper"}
GPU_TAINT_KEY = "nvidia.com/gpu"
SERVICE_PORT = 80
DRAIN_DELAY_S = 5
"""A stopping pod's preStop pause: time for every gateway to see it terminating."""


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def selector_labels(name: str) -> dict[str, str]:
    return {POD_LABEL: name}


def _gpu_container_index(spec: InferenceDeploymentSpec) -> int:
    """The container that gets the GPUs: the one serving ``port``, else the first."""
    port = spec.serving_port()
    for index, container in enumerate(spec.template.spec.containers):
        if any(p.container_port == port for p in container.ports):
            return index
    return 0


def pod_template(name: str, spec: InferenceDeploymentSpec) -> dict[str, Any]:
    template = spec.template.to_wire()
    metadata = template.setdefault("metadata", {})
    metadata["labels"] = {**(metadata.get("labels") or {}), **selector_labels(name)}
    pod = template["spec"]

    container = pod["containers"][_gpu_container_index(spec)]
    resources = container.setdefault("resources", {})
    count = str(spec.gpu.count)
    resources["limits"] = {**(resources.get("limits") or {}), spec.gpu.resource: count}
    if spec.gpu.resource in (resources.get("requests") or {}):
        resources["requests"] = {**resources["requests"], spec.gpu.resource: count}

    # Scale-down never cuts a stream: the pod keeps serving for DRAIN_DELAY_S after it
    # is told to stop (the gateway sees it terminating and sends it nothing new), then
    # gets SIGTERM with the deployment's stream drain time to finish what it serves.
    lifecycle = container.setdefault("lifecycle", {})
    lifecycle.setdefault("preStop", {"sleep": {"seconds": DRAIN_DELAY_S}})
    pod.setdefault(
        "terminationGracePeriodSeconds", DRAIN_DELAY_S + spec.scaling.stream_drain_seconds
    )

    tolerations = list(pod.get("tolerations") or [])
    gpu_toleration = {"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
    if gpu_toleration not in tolerations:
        tolerations.append(gpu_toleration)
    pod["tolerations"] = tolerations

    if spec.gpu.product is not None:
        pod["nodeSelector"] = {
            **(pod.get("nodeSelector") or {}),
            GPU_PRODUCT_LABEL: spec.gpu.product,
        }
    return template


def _metadata(name: str, namespace: str, uid: str) -> dict[str, Any]:
    """What every child carries: its name, the selector label, and its owner."""
    return {
        "name": name,
        "namespace": namespace,
        "labels": {**selector_labels(name), **MANAGED_BY},
        "ownerReferences": [owner_reference(name, uid)],
    }


def deployment(
    name: str, namespace: str, uid: str, spec: InferenceDeploymentSpec, replicas: int
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, namespace, uid),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(name)},
            # GPUs are scarce: roll one new replica in before an old one goes.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": pod_template(name, spec),
        },
    }


def service(name: str, namespace: str, uid: str, spec: InferenceDeploymentSpec) -> dict[str, Any]:
    """A ClusterIP Service for in-cluster clients; the gateway itself goes to pod IPs."""
    port = spec.serving_port()
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, uid),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": port, "protocol": "TCP"}
            ],
        },
    }


def network_policy(
    name: str,
    namespace: str,
    uid: str,
    spec: InferenceDeploymentSpec,
    gateway_namespace: str,
    gateway_pod_labels: dict[str, str],
    allow_from: list[dict[str, Any]],
) -> dict[str, Any]:
    """Ingress to the deployment's pods only from the gateway's pods, on the serving
    port (and from the platform's listed peers): every request pays its way through the
    gateway's API keys and metering, never around them."""
    ingress: list[dict[str, Any]] = [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": gateway_namespace}
                    },
                    "podSelector": {"matchLabels": dict(gateway_pod_labels)},
                }
            ],
            "ports": [{"port": spec.serving_port(), "protocol": "TCP"}],
        }
    ]
    if allow_from:
        ingress.append({"from": [dict(peer) for peer in allow_from]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(name, namespace, uid),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
