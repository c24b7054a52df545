"""What Payper's services observe of the cluster: one pod view, keys of deployments.

The operator's scaler and status, and the billing ledger read pods through ``PodView``
(readiness, scheduling, GPUs, deletion), so they agree on what a pod is. It sits below
both, so that billing never imports the operator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from payper.clock import parse_iso

Key = tuple[str, str]


def parse_time_ms(value: str | None) -> int | None:
    return parse_iso(value) if value else None


@dataclass
class PodView:
    """What the operator needs from one pod."""

    name: str
    uid: str
    created_ms: int
    ready: bool
    unschedulable: str | None
    """The scheduler's message while the pod cannot be placed."""
    scheduled_ms: int | None = None
    """When the pod was bound to a node: from then on it holds its GPUs."""
    deleting_since_ms: int | None = None
    node: str | None = None
    gpus: int = 0

    @property
    def deleting(self) -> bool:
        return self.deleting_since_ms is not None

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
        )
