"""What gateways tell the operator about demand: snapshots every second, pokes at once.

Several gateway replicas may run; each sends its own view and the operator sums them.
Times are relative (milliseconds since the last request) so gateway and operator clocks
need not agree. Per-pod counts (pods with requests in flight only, at most
``MAX_REPORTED_PODS`` per deployment) let the operator tell the ReplicaSet controller
which pods are idle before a scale-down; a snapshot leaves them out when empty, so a
gateway stays understood by an operator from before them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from payper.api.common import ApiModel, DnsLabel, DnsSubdomain, ShortString

Count = Annotated[int, Field(ge=0, le=10_000_000)]
MAX_REPORTED_PODS = 1000
"""Pods per deployment whose in-flight count a snapshot carries (the busiest): as many as
a deployment's ``maxReplicas`` may be."""


class DeploymentDemand(ApiModel):
    namespace: DnsLabel
    name: DnsLabel
    in_flight: Count = 0
    queued: Count = 0
    requests_total: Annotated[int, Field(ge=0)] = 0
    ms_since_last_request: Annotated[int, Field(ge=0)] | None = None
    cold_start_ms: Annotated[int, Field(ge=0, le=86_400_000)] | None = None
    """A cold start a request waited through since the last report: held -> forwarded."""
    in_flight_by_pod: Annotated[
        dict[DnsSubdomain, Annotated[int, Field(ge=1, le=10_000_000)]],
        Field(max_length=MAX_REPORTED_PODS),
    ] = Field(default_factory=dict)
    """Requests in flight on each pod that has any (pod name -> count)."""


class DemandSnapshot(ApiModel):
    gateway: ShortString
    deployments: Annotated[list[DeploymentDemand], Field(max_length=100_000)]


class Poke(ApiModel):
    """A request is held for a deployment with no ready endpoint: scale it up now."""

    gateway: ShortString
    namespace: DnsLabel
    name: DnsLabel
