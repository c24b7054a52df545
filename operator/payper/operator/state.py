"""The operator's in-memory view: tracked InferenceDeployments, their pods, and demand.

Everything here is rebuilt from the cluster after a restart (kopf resumes every object,
the pod watch lists every pod, gateways keep reporting), so it is a cache, never the
source of truth. Mutated only from the operator's event loop.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from payper.api.demand import DemandSnapshot, DeploymentDemand
from payper.api.inference_deployment import InferenceDeploymentSpec, InferenceDeploymentStatus
from payper.observed import Key, PodView
from payper.operator.apikeys import KeyCheck
from payper.operator.autoscaler import Decision, History, Policy
from payper.operator.coldstart import ColdStart, FinishedColdStart


@dataclass
class Tracked:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: InferenceDeploymentSpec | None = None
    policy: Policy | None = None
    invalid: str | None = None
    """Why the spec cannot be served (InvalidSpec), or None."""
    replicas: int | None = None
    """The Deployment's spec.replicas as last applied or read; None until known."""
    history: History = field(default_factory=History)
    last_request_ms: int | None = None
    scale_from_zero_ms: int | None = None
    """When the current scale-up from zero was decided; cleared once a pod is ready."""
    last_cold_start_ms: int | None = None
    cold_start: ColdStart | None = None
    """The scale-up from zero in progress, followed phase by phase."""
    last_cold_start: FinishedColdStart | None = None
    last_decision: Decision | None = None
    written_status: InferenceDeploymentStatus | None = None
    """The status as last written; conditions keep its transition times until they flip."""
    dirty: bool = True
    """Something changed since status was last written (pods, spec, demand)."""
    scale_down_deferred: bool = False
    """The last evaluation put off a scale-down by a tick: it had just set pod deletion
    costs, which the ReplicaSet controller must see before it picks the pods to delete."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def cold_start_timeout_ms(self) -> int:
        """How long a pod may take to become ready (the spec's default while unknown)."""
        return (self.spec.scaling.cold_start_timeout_seconds if self.spec else 300) * 1000


MAX_ENDING_NAMESPACES = 10_000
MAX_SEEN_DEPLOYMENTS = 100_000
MAX_GONE_PODS = 10_000
"""Pods deleted lately, kept so that their late usage reports (an agent delivers up to
a report interval and its retries later) are still attributed by their owner chain."""


class Registry:
    def __init__(self, max_gone_pods: int = MAX_GONE_PODS) -> None:
        self.tracked: dict[Key, Tracked] = {}
        self.pods: dict[Key, dict[str, PodView]] = {}
        """Each InferenceDeployment's pods, by its selector label: what it scales and serves."""
        self.all_pods: dict[str, PodView] = {}
        """Every pod in the cluster by UID: what billing attributes GPU time to."""
        self.gone_pods: OrderedDict[str, PodView] = OrderedDict()
        """The latest deleted pods by UID, oldest first, at most ``max_gone_pods``."""
        self.max_gone_pods = max_gone_pods
        self.namespace_labels: dict[str, dict[str, str]] = {}
        """Labels of every namespace: plan grants may select namespaces by label."""
        self.ending_namespaces: OrderedDict[str, None] = OrderedDict()
        """Namespaces being deleted or gone, latest last, at most ``MAX_ENDING_NAMESPACES``:
        the ledger moves their open records into its own namespace."""
        self.seen_deployments: OrderedDict[Key, None] = OrderedDict()
        """Every InferenceDeployment a watch event delivered (those being deleted too, which
        are never tracked), the latest last, at most ``MAX_SEEN_DEPLOYMENTS``: what tells
        the operator's view caught up (``payper.operator.synced``)."""
        self.key_secrets: dict[Key, KeyCheck] = {}
        """The check of every API key Secret by (namespace, name): digests only, never the
        keys, and at most MAX_API_KEYS of them per Secret."""

    def __iter__(self) -> Iterator[Tracked]:
        return iter(list(self.tracked.values()))

    def get(self, key: Key) -> Tracked | None:
        return self.tracked.get(key)

    def observe_namespace(self, name: str, labels: dict[str, str] | None) -> bool:
        """Note a namespace's labels, or None when it is being deleted or gone; whether its
        labels changed (plan grants select namespaces by label)."""
        if labels is None:
            self.ending_namespaces[name] = None
            self.ending_namespaces.move_to_end(name)
            while len(self.ending_namespaces) > MAX_ENDING_NAMESPACES:
                self.ending_namespaces.popitem(last=False)
            return self.namespace_labels.pop(name, None) is not None
        self.ending_namespaces.pop(name, None)  # created again
        changed = self.namespace_labels.get(name) != labels
        self.namespace_labels[name] = labels
        return changed

    def saw_deployment(self, key: Key) -> None:
        self.seen_deployments[key] = None
        self.seen_deployments.move_to_end(key)
        while len(self.seen_deployments) > MAX_SEEN_DEPLOYMENTS:
            self.seen_deployments.popitem(last=False)

    def namespace_ending(self, namespace: str) -> bool:
        return namespace in self.ending_namespaces

    def ending_namespaces_now(self) -> list[str]:
        return list(self.ending_namespaces)

    def labels_of(self, namespace: str) -> Mapping[str, str]:
        return self.namespace_labels.get(namespace, {})

    def spec_of(self, key: Key) -> InferenceDeploymentSpec | None:
        tracked = self.tracked.get(key)
        return tracked.spec if tracked is not None else None

    def pods_of(self, key: Key) -> list[PodView]:
        return list(self.pods.get(key, {}).values())

    def observe_pod(self, pod: PodView, label_key: Key | None, deleted: bool) -> None:
        """Note a pod (or its deletion). ``label_key``: the deployment its selector label
        names, if any; a pod relabelled away leaves its former deployment's pods."""
        previous = self.all_pods.pop(pod.uid, None)
        if previous is not None and previous.deployment is not None:
            former = (previous.namespace, previous.deployment)
            if former != label_key or deleted:
                self._forget_deployment_pod(former, previous.name)
        if deleted:
            self.gone_pods[pod.uid] = pod
            self.gone_pods.move_to_end(pod.uid)
            while len(self.gone_pods) > self.max_gone_pods:
                self.gone_pods.popitem(last=False)
            return
        self.all_pods[pod.uid] = pod
        if label_key is not None:
            self.pods.setdefault(label_key, {})[pod.name] = pod

    def _forget_deployment_pod(self, key: Key, name: str) -> None:
        pods = self.pods.get(key, {})
        pods.pop(name, None)
        if not pods:
            self.pods.pop(key, None)


@dataclass
class DemandTotals:
    in_flight: int = 0
    queued: int = 0
    last_request_ms: int | None = None
    in_flight_by_pod: dict[str, int] = field(default_factory=dict)
    """Requests in flight per pod (those with any), summed over the gateways."""

    def add(self, entry: DeploymentDemand, received_ms: int) -> None:
        self.in_flight += entry.in_flight
        self.queued += entry.queued
        for pod, count in entry.in_flight_by_pod.items():
            self.in_flight_by_pod[pod] = self.in_flight_by_pod.get(pod, 0) + count
        if entry.ms_since_last_request is not None:
            self.seen_request(received_ms - entry.ms_since_last_request)

    def add_poke(self, at_ms: int) -> None:
        self.queued = max(self.queued, 1)
        self.seen_request(at_ms)

    def seen_request(self, at_ms: int) -> None:
        self.last_request_ms = max(self.last_request_ms or at_ms, at_ms)


class DemandStore:
    """The latest snapshot of each gateway, plus pokes not yet covered by a snapshot.

    Snapshots are kept indexed by deployment, so a poke totals one deployment's demand
    without walking every gateway's whole fleet.
    """

    def __init__(self, expiry_ms: int) -> None:
        self.expiry_ms = expiry_ms
        self._snapshots: dict[str, tuple[int, dict[Key, DeploymentDemand]]] = {}
        self._pokes: dict[tuple[str, Key], int] = {}

    def record(self, snapshot: DemandSnapshot, now_ms: int) -> None:
        entries = {(e.namespace, e.name): e for e in snapshot.deployments}
        self._snapshots[snapshot.gateway] = (now_ms, entries)
        for poke_key in [k for k in self._pokes if k[0] == snapshot.gateway]:
            del self._pokes[poke_key]

    def poke(self, gateway: str, key: Key, now_ms: int) -> None:
        self._pokes[(gateway, key)] = now_ms

    def _fresh(self, now_ms: int) -> None:
        """Forget snapshots and pokes older than the expiry."""
        for gateway, (received, _) in list(self._snapshots.items()):
            if now_ms - received > self.expiry_ms:
                del self._snapshots[gateway]
        for poke_key, at in list(self._pokes.items()):
            if now_ms - at > self.expiry_ms:
                del self._pokes[poke_key]

    def aggregate(self, now_ms: int) -> dict[Key, DemandTotals]:
        """Every deployment's demand, summed over the gateways (for a tick)."""
        self._fresh(now_ms)
        totals: dict[Key, DemandTotals] = {}
        for received, entries in self._snapshots.values():
            for key, entry in entries.items():
                totals.setdefault(key, DemandTotals()).add(entry, received)
        for (_, key), at in self._pokes.items():
            totals.setdefault(key, DemandTotals()).add_poke(at)
        return totals

    def totals_for(self, key: Key, now_ms: int) -> DemandTotals:
        """One deployment's demand, summed over the gateways (for a poke)."""
        self._fresh(now_ms)
        total = DemandTotals()
        for received, entries in self._snapshots.values():
            entry = entries.get(key)
            if entry is not None:
                total.add(entry, received)
        for (_, poked), at in self._pokes.items():
            if poked == key:
                total.add_poke(at)
        return total
