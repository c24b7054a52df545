"""What Payper's services observe of the cluster: one pod view, keys of deployments.

Every reader of pods parses them once, here, with the same rules: the operator's scaler
and status (readiness, scheduling, deletion), the ledger (GPUs held, node, since when),
the gateway (where to send requests: ``serving``) and the agent (which container a
container ID is). It sits below them all, so billing never imports the operator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from payper.api.common import DNS_LABEL_PATTERN
from payper.api.inference_deployment import POD_LABEL
from payper.clock import parse_iso

Key = tuple[str, str]
"""(namespace, InferenceDeployment name)."""

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
"""The ReplicaSet controller deletes pods with the lowest cost first at a scale-down."""

UNMANAGED = ""
"""The deployment part of the key of GPU pods that belong to no InferenceDeployment: they
are billed to their namespace, in records of their own, never dropped."""


CONTAINER_KINDS = ("containers", "initContainers", "ephemeralContainers")
CONTAINER_STATUS_KINDS = (
    "containerStatuses",
    "initContainerStatuses",
    "ephemeralContainerStatuses",
)


def _is_name(value: str) -> bool:
    return len(value) <= 63 and re.fullmatch(DNS_LABEL_PATTERN, value) is not None


def parse_time_ms(value: str | None) -> int | None:
    return parse_iso(value) if value else None


def _int_or_zero(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


@dataclass(frozen=True)
class Owner:
    """A pod's controller (its ownerReference with ``controller: true``)."""

    kind: str
    name: str
    uid: str


def controller_of(meta: Mapping[str, Any]) -> Owner | None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            return Owner(ref.get("kind", ""), ref.get("name", ""), ref.get("uid", ""))
    return None


@dataclass
class PodView:
    """What Payper needs from one pod."""

    name: str
    uid: str
    created_ms: int
    ready: bool
    """The Ready condition is True and the pod is Running."""
    unschedulable: str | None
    """The scheduler's message while the pod cannot be placed."""
    scheduled_ms: int | None = None
    """When the pod was bound to a node: from then on it holds its GPUs."""
    deleting_since_ms: int | None = None
    node: str | None = None
    gpus: int = 0
    namespace: str = ""
    ip: str | None = None
    deployment: str | None = None
    """The InferenceDeployment its ``payper.dev/inference-deployment`` label names; None
    also when the label holds no valid name (Kubernetes allows label values, such as
    ``Evil_`` or ``a.b``, that no InferenceDeployment can be called)."""
    invalid_deployment_label: str | None = None
    """That label's value when it was not a valid name (for the agent to count)."""
    containers: tuple[str, ...] = ()
    """Every container: regular, init (native sidecars among them) and ephemeral."""
    container_ids: dict[str, str] = field(default_factory=dict)
    """Runtime container ID (without the ``containerd://`` scheme) -> container name."""
    finished: bool = False
    """Its phase is Succeeded or Failed: it holds no GPU any more."""
    started: bool = False
    """Every regular container is running (a cold start's *started* mark)."""
    owner: Owner | None = None
    """Its controller: billing follows this chain (ReplicaSet -> Deployment ->
    InferenceDeployment), never the label, which the tenant can change."""
    deletion_cost: int = 0
    """Its ``controller.kubernetes.io/pod-deletion-cost`` (0 when absent)."""

    @property
    def deleting(self) -> bool:
        return self.deleting_since_ms is not None

    @property
    def serving(self) -> bool:
        """The gateway may send it requests: ready, not being deleted, with an address.
        (A terminating pod can stay Ready for a while; it gets no new requests.)"""
        return self.ready and not self.deleting and bool(self.ip)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> PodView:
        meta, status = obj["metadata"], obj.get("status", {})
        conditions = {c.get("type"): c for c in status.get("conditions", []) or []}
        ready = conditions.get("Ready", {}).get("status") == "True"
        scheduled = conditions.get("PodScheduled", {})
        unschedulable = (
            scheduled.get("message") or "unschedulable"
            if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable"
            else None
        )
        spec = obj.get("spec", {})
        label = (meta.get("labels") or {}).get(POD_LABEL)
        gpus = sum(
            int(limit)
            for container in spec.get("containers", [])
            for name, limit in ((container.get("resources") or {}).get("limits") or {}).items()
            if name.endswith("/gpu") and str(limit).isdigit()
        )
        return cls(
            name=meta["name"],
            uid=meta["uid"],
            created_ms=parse_time_ms(meta.get("creationTimestamp")) or 0,
            ready=ready and status.get("phase") == "Running",
            unschedulable=unschedulable,
            scheduled_ms=(
                parse_time_ms(scheduled.get("lastTransitionTime"))
                if scheduled.get("status") == "True"
                else None
            ),
            deleting_since_ms=parse_time_ms(meta.get("deletionTimestamp")),
            node=spec.get("nodeName"),
            gpus=gpus,
            namespace=meta.get("namespace", ""),
            ip=status.get("podIP") or None,
            deployment=label if label is not None and _is_name(label) else None,
            invalid_deployment_label=label if label is not None and not _is_name(label) else None,
            containers=tuple(
                c["name"] for kind in CONTAINER_KINDS for c in spec.get(kind, []) or []
            ),
            container_ids={
                bare: container["name"]
                for kind in CONTAINER_STATUS_KINDS
                for container in status.get(kind, []) or []
                if (bare := (container.get("containerID") or "").partition("://")[2])
            },
            finished=status.get("phase") in ("Succeeded", "Failed"),
            started=_all_running(spec, status),
            owner=controller_of(meta),
            deletion_cost=_int_or_zero(
                (meta.get("annotations") or {}).get(DELETION_COST_ANNOTATION)
            ),
        )


def _all_running(spec: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    names = {c.get("name") for c in spec.get("containers", []) or []}
    running = {
        c.get("name")
        for c in status.get("containerStatuses", []) or []
        if "running" in (c.get("state") or {})
    }
    return bool(names) and names <= running
