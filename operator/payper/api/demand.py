"""What gateways tell the operator about demand: snapshots every second, pokes at once.

Several gateway replicas may run; each sends its own view and the operator sums them.
Times are relative (milliseconds since the last request) so gateway and operator clocks
need not agree.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from payper.api.common import ApiModel, DnsLabel, ShortString

Count = Annotated[int, Field(ge=0, le=10_000_000)]


class DeploymentDemand(ApiModel):
    namespace: DnsLabel
    name: DnsLabel
    in_flight: Count = 0
    queued: Count = 0
    requests_total: Annotated[int, Field(ge=0)] = 0
    ms_since_last_request: Annotated[int, Field(ge=0)] | None = None
    cold_start_ms: Annotated[int, Field(ge=0, le=86_400_000)] | None = None
    """A cold start a request waited through since the last report: held -> forwarded."""


class DemandSnapshot(ApiModel):
    gateway: ShortString
    deployments: Annotated[list[DeploymentDemand], Field(max_length=100_000)]


class Poke(ApiModel):
    """A request is held for a deployment with no ready endpoint: scale it up now."""

    gateway: ShortString
    namespace: DnsLabel
    name: DnsLabel
