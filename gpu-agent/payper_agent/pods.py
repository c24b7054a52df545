"""From a host PID to its pod: /proc/<pid>/cgroup, then the pods on this node.

The agent watches only the pods bound to its own node (field selector on spec.nodeName)
and keeps, per pod UID, the namespace, name, container names and container IDs (regular,
init, native sidecar and ephemeral containers alike). A PID resolves through the cgroup
path (pod UID and container ID) to one container; a pod with a single container resolves
even when the runtime's container ID is not reported yet, and any other container of a
known pod counts for that pod (as ``unknown-container``). Only a PID of no pod on this
node is unattributed: reported, never billed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from payper.api.inference_deployment import POD_LABEL
from payper.observed import PodView
from payper_agent import metrics
from payper_agent.cgroups import parse_cgroup
from payper_agent.meter import SeriesIdentity

logger = logging.getLogger(__name__)


UNKNOWN_CONTAINER = "unknown-container"
"""The container name reported for GPU time of a known pod's container whose ID the API
has not listed (yet): the time still counts for the pod and its deployment."""


class PodIndex:
    def __init__(self) -> None:
        self.by_uid: dict[str, PodView] = {}

    def upsert(self, obj: Mapping[str, Any]) -> None:
        pod = PodView.from_object(obj)
        if pod.invalid_deployment_label is not None and pod.uid not in self.by_uid:
            metrics.SANITISED_IDENTITIES.inc()
            logger.warning(
                "pod %s/%s: label %s=%r is not a valid name; metered without a deployment",
                pod.namespace,
                pod.name,
                POD_LABEL,
                pod.invalid_deployment_label,
            )
        self.by_uid[pod.uid] = pod

    def remove(self, obj: Mapping[str, Any]) -> None:
        self.by_uid.pop(obj["metadata"]["uid"], None)

    def identity(self, pod_uid: str, container_id: str | None) -> SeriesIdentity | None:
        pod = self.by_uid.get(pod_uid)
        if pod is None:
            return None
        container = pod.container_ids.get(container_id or "")
        if container is None and len(pod.containers) == 1:
            container = pod.containers[0]
        if container is None:
            # A container of this pod whose ID the API has not shown yet: its GPU time is
            # still the pod's (and its deployment's), under a container name of its own.
            container = UNKNOWN_CONTAINER
        return SeriesIdentity(pod.namespace, pod.name, pod.uid, container, pod.deployment)


MAX_CACHED_PIDS = 65_536
"""A safety bound on the resolver's own cache; the meter keeps it far smaller by telling
it which PIDs to keep (``forget_pids_except``)."""


@dataclass
class _Resolved:
    pod_uid: str
    container_id: str | None
    identity: SeriesIdentity | None = None
    """The last identity the pod index gave: kept for a pod the index has dropped since."""


class PidResolver:
    """Host PID -> SeriesIdentity: the cgroup read once per process, at first sight.

    The meter calls ``first_seen`` in the poll a PID first shows up, while its
    ``/proc/<pid>/cgroup`` can still be read, and keeps the PID (``forget_pids_except``)
    for a few polls after it was last seen: a process that lived less than a poll, or a
    sample the driver reports after the process exited, is still billed to its pod.
    """

    def __init__(self, cgroup_of: Callable[[int], str | None], pods: PodIndex) -> None:
        self.cgroup_of = cgroup_of
        self.pods = pods
        self._resolved: dict[int, _Resolved | None] = {}

    def first_seen(self, pid: int) -> None:
        self._resolved.pop(pid, None)
        self._resolve(pid)

    def __call__(self, pid: int) -> SeriesIdentity | None:
        resolved = self._resolved[pid] if pid in self._resolved else self._resolve(pid)
        if resolved is None:
            return None
        identity = self.pods.identity(resolved.pod_uid, resolved.container_id)
        if identity is None:
            return resolved.identity  # the pod is gone from the index: its last identity
        resolved.identity = identity
        return identity

    def _resolve(self, pid: int) -> _Resolved | None:
        text = self.cgroup_of(pid)
        parsed = parse_cgroup(text) if text else None
        resolved = None
        if parsed is not None:
            resolved = _Resolved(parsed.pod_uid, parsed.container_id)
            resolved.identity = self.pods.identity(parsed.pod_uid, parsed.container_id)
        if len(self._resolved) >= MAX_CACHED_PIDS:
            del self._resolved[next(iter(self._resolved))]  # the oldest resolved
        self._resolved[pid] = resolved
        return resolved

    def forget_pids_except(self, kept: set[int]) -> None:
        for pid in [p for p in self._resolved if p not in kept]:
            del self._resolved[pid]
