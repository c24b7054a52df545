"""The ledger's inputs besides usage reports: what the operator observes for billing.

Request and cold-start counts and the pods that went away since the last flush are
collected by the operator (its API and pod watch) and drained by the ledger; the
deployments and pods it currently sees reach the ledger through ``Observed``. Both are
defined here, in billing, so that the operator depends on billing and never the reverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from payper.api.inference_deployment import InferenceDeploymentSpec
from payper.observed import Key, PodView


class Observed(Protocol):
    """The deployments and pods the operator currently sees."""

    @property
    def all_pods(self) -> Mapping[str, PodView]:
        """Every pod in the cluster, by UID."""
        ...

    @property
    def gone_pods(self) -> Mapping[str, PodView]:
        """Pods deleted lately, by UID (bounded)."""
        ...

    def spec_of(self, key: Key) -> InferenceDeploymentSpec | None: ...

    def labels_of(self, namespace: str) -> Mapping[str, str]: ...

    def namespace_ending(self, namespace: str) -> bool:
        """It is being deleted, or is gone."""
        ...

    def ending_namespaces_now(self) -> list[str]:
        """The namespaces being deleted or gone (the latest, bounded)."""
        ...


@dataclass
class BillingEvents:
    """What the operator itself observed for the ledger since its last flush."""

    requests: dict[Key, int] = field(default_factory=dict)
    cold_starts: dict[Key, int] = field(default_factory=dict)
    ended_pods: list[tuple[PodView, int]] = field(default_factory=list)
    """GPU pods that went away: (pod, end ms)."""
    _last_requests: dict[tuple[str, Key], int] = field(default_factory=dict)
    _gateways: set[str] = field(default_factory=set)

    def saw_gateway(self, gateway: str) -> None:
        self._gateways.add(gateway)

    def count_requests(self, gateway: str, key: Key, requests_total: int) -> None:
        """Requests since the gateway's previous snapshot (its counters are cumulative)."""
        previous = self._last_requests.get((gateway, key))
        self._last_requests[(gateway, key)] = requests_total
        if previous is None:
            if gateway not in self._gateways:
                return  # a gateway this operator has not heard from: a baseline only
            previous = 0  # a deployment new to a known gateway: all of it is new
        delta = requests_total - previous if requests_total >= previous else requests_total
        if delta:
            self.requests[key] = self.requests.get(key, 0) + delta

    def drain(self) -> BillingEvents:
        drained = BillingEvents(self.requests, self.cold_starts, self.ended_pods)
        self.requests, self.cold_starts, self.ended_pods = {}, {}, []
        return drained
