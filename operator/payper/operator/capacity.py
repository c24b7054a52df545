"""Unmetered capacity: GPU nodes that run GPU pods but send no usage reports.

An agent runs only where its DaemonSet's nodeSelector and tolerations let it; a GPU node
they miss (a new pool, a different taint) runs pods whose GPU time nobody meters, and no
report ever says so. The operator sees every pod (its pod watch), and the ledger knows
when each node last reported: a node whose running pods hold GPUs, from which no report
arrived for ``unmeteredAfterSeconds`` (several report intervals; agents with GPUs report
every interval), is unmetered capacity. It is a gauge per node (the GPUs those pods
hold; the series is removed when the node reports again or its GPU pods are gone) and
one Warning event on the Node per episode.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from payper.billing import metrics
from payper.clock import iso, now_ms
from payper.kube import Kube
from payper.observed import PodView

logger = logging.getLogger(__name__)
EVENT_REASON = "UnmeteredGpuCapacity"
EVENT_NAMESPACE = "default"
"""Where Node events go (Nodes are cluster-scoped; kubectl describe node finds them)."""


@dataclass(frozen=True)
class GpuPod:
    node: str
    gpus: int
    since_ms: int
    """When it was bound to its node (or first seen there)."""


def unmetered(
    pods: Mapping[str, GpuPod],
    reported_at: Mapping[str, int],
    watching_since_ms: int,
    now_ms: int,
    after_ms: int,
) -> dict[str, int]:
    """Per node with GPU pods bound for at least ``after_ms`` and no report for as long
    (never: counted from when the operator started watching), the GPUs they hold."""
    found: dict[str, int] = {}
    for pod in pods.values():
        if pod.since_ms > now_ms - after_ms:
            continue  # just placed: its node's agent may not have reported yet
        if reported_at.get(pod.node, watching_since_ms) > now_ms - after_ms:
            continue
        found[pod.node] = found.get(pod.node, 0) + pod.gpus
    return found


class UnmeteredCapacity:
    def __init__(
        self,
        kube: Kube,
        reported_at: Mapping[str, int],
        pods: Mapping[str, PodView],
        after_ms: int,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.kube = kube
        self.reported_at = reported_at
        self.all_pods = pods
        """Every pod, by UID, as the operator's pod watch keeps them."""
        self.after_ms = after_ms
        self.clock = clock
        self.watching_since_ms = clock()
        self.episodes: dict[str, int] = {}
        """Nodes now reported as unmetered, and the GPUs last reported for each."""

    @property
    def pods(self) -> dict[str, GpuPod]:
        """Running pods that hold GPUs, by UID."""
        return {
            pod.uid: GpuPod(pod.node, pod.gpus, pod.scheduled_ms or self.watching_since_ms)
            for pod in self.all_pods.values()
            if pod.node is not None and pod.gpus > 0 and not pod.finished
        }

    async def check(self) -> dict[str, int]:
        """Update the gauge; one event per node when its episode starts."""
        found = unmetered(
            self.pods, self.reported_at, self.watching_since_ms, self.clock(), self.after_ms
        )
        for node in set(self.episodes) - set(found):
            metrics.UNMETERED_CAPACITY.remove(node)
            logger.info("node %s: GPU time is metered again (or its GPU pods are gone)", node)
            del self.episodes[node]
        for node, gpus in found.items():
            metrics.UNMETERED_CAPACITY.labels(node).set(gpus)
            if node not in self.episodes:
                logger.warning(
                    "node %s runs pods holding %d GPUs but sent no usage report for %d s: "
                    "unmetered capacity (no payper-agent there?)",
                    node,
                    gpus,
                    self.after_ms // 1000,
                )
                await self._event(node, gpus)
            self.episodes[node] = gpus
        return found

    async def _event(self, node: str, gpus: int) -> None:
        await self.kube.post_event(
            {"apiVersion": "v1", "kind": "Node", "name": node},
            EVENT_NAMESPACE,
            EVENT_REASON,
            f"Pods on this node hold {gpus} GPUs, but no payper-agent usage report arrived "
            f"for {self.after_ms // 1000} s: their GPU time is not metered (does the "
            "agent's nodeSelector or tolerations miss this node?)",
            iso(self.clock()),
        )

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check()
            except Exception:
                logger.exception("checking for unmetered GPU capacity failed")
