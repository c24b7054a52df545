"""Usage reports: what a node's agent tells the operator about active GPU time.

Each agent instance has an id and numbers its reports 1, 2, 3, ...; a report carries,
per series (container x GPU), the deltas observed in its interval. The operator applies
each (agent id, sequence) at most once, so reports may be resent freely. Reports are
cut on wall-clock boundaries of the report interval, so one report never straddles two
billing windows. Times are integer microseconds (active) or milliseconds (rounded).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from payper.api.billing_record import RoundedMs, SplitUs
from payper.api.common import ApiModel, DnsLabel, ShortString

MAX_SERIES = 4096
MAX_BATCH = 200
Micros = Annotated[int, Field(ge=0, le=10**15)]


class SeriesUsage(ApiModel):
    """One container on one GPU during one report interval."""

    namespace: DnsLabel
    pod: Annotated[str, Field(min_length=1, max_length=253)]
    pod_uid: ShortString
    container: DnsLabel
    gpu: ShortString
    """GPU UUID (or MIG instance UUID)."""
    gpu_product: ShortString
    inference_deployment: DnsLabel | None = None
    """The pod's payper.dev/inference-deployment label as the agent saw it. The ledger bills
    by the operator's own owner chain of the pod instead; this counts only for a pod the
    operator never saw, and None there means the namespace's own records."""
    active_us: Micros = 0
    rounded_ms: RoundedMs = Field(default_factory=RoundedMs)
    """Bursts that closed in this interval, each rounded up per granularity."""
    bursts: Annotated[int, Field(ge=0)] = 0
    split_us: SplitUs | None = None
    """Of ``activeUs``, what came from a MIG instance this container shared with other
    processes, by how the instance's time was divided; None: none was shared."""


class UsageReport(ApiModel):
    agent_id: Annotated[str, Field(min_length=1, max_length=64)]
    sequence: Annotated[int, Field(ge=1)]
    node: Annotated[str, Field(min_length=1, max_length=253)]
    interval_start_ms: Annotated[int, Field(ge=0)]
    interval_end_ms: Annotated[int, Field(ge=0)]
    series: Annotated[list[SeriesUsage], Field(max_length=MAX_SERIES)] = Field(default_factory=list)
    unattributed_us: Micros = 0
    """GPU time of processes that belong to no pod: reported, never billed."""
    unmetered_gpus: Annotated[list[ShortString], Field(max_length=64)] = Field(default_factory=list)
    """GPUs the agent could not meter in this interval (e.g. MIG without GPM)."""
    lost_us: Micros = 0
    """Set on a *gap marker*: the agent dropped this sequence's report (past retention,
    or refused as malformed) and sends this, without series, in its place, so the ledger
    moves on and the loss is audited at its known size instead of a silent gap."""
    lost_reason: ShortString | None = None
    unmetered_us: Micros = 0
    """GPU time (summed over GPUs) no sample accounted for: gaps longer than a few polls
    (the agent down, driver errors) are not billed, they are reported here."""

    @model_validator(mode="after")
    def _interval(self) -> UsageReport:
        if self.interval_end_ms < self.interval_start_ms:
            raise ValueError("intervalEndMs must not be before intervalStartMs")
        return self


class UsageBatch(ApiModel):
    """Reports of one agent, oldest first; the operator applies them in sequence order."""

    reports: Annotated[list[UsageReport], Field(min_length=1, max_length=MAX_BATCH)]
