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


class PidResolver:
    """Host PID -> SeriesIdentity, caching the cgroup parse per PID."""

    def __init__(self, cgroup_of: Callable[[int], str | None], pods: PodIndex) -> None:
        self.cgroup_of = cgroup_of
        self.pods = pods
        self._parsed: dict[int, tuple[str, str | None] | None] = {}

    def __call__(self, pid: int) -> SeriesIdentity | None:
        if pid not in self._parsed:
            text = self.cgroup_of(pid)
            parsed = parse_cgroup(text) if text else None
            self._parsed[pid] = (parsed.pod_uid, parsed.container_id) if parsed else None
            if len(self._parsed) > 65_536:
                self._parsed.clear()
        key = self._parsed[pid]
        return None if key is None else self.pods.identity(*key)

    def forget_pids_except(self, running: set[int]) -> None:
        for pid in [p for p in self._parsed if p not in running]:
            del self._parsed[pid]
