"""BillingRecord: one InferenceDeployment's usage and charge in one billing window.

Written only by the operator. ``spec`` fixes what is billed and at which prices (a
snapshot taken when the record is created) and never changes; ``status`` carries the
running totals and, in the same write, the last report sequence number applied per
agent, which is what makes usage exactly-once. Once ``status.state`` is ``Final`` the
API server refuses every change to the record's spec and status.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints

from payper.api.common import (
    ApiModel,
    DecimalString,
    DnsLabel,
    ObjectMeta,
    ShortString,
    cel_rules,
)

KIND = "BillingRecord"
PLURAL = "billingrecords"
SINGULAR = "billingrecord"
SHORT_NAMES = ("brec",)

Granularity = Literal["1ms", "1s", "1m"]
GRANULARITY_MS: dict[str, int] = {"1ms": 1, "1s": 1000, "1m": 60_000}
State = Literal["Open", "Final"]
OPEN: State = "Open"
FINAL: State = "Final"

MAX_AGENTS = 4096
MAX_ADJUSTMENTS = 256
MAX_POD_INTERVALS = 1000
Millis = Annotated[int, Field(ge=0)]
Micros = Annotated[int, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]


class Window(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            {
                "rule": "timestamp(self.end) > timestamp(self.start)",
                "message": "window end must be after its start",
                "fieldPath": ".end",
            }
        )
    )

    start: datetime
    end: datetime


class RoundedMs(ApiModel):
    """Active time rounded up per burst to each standard billing granularity."""

    per_millisecond: Millis = Field(0, alias="1ms")
    per_second: Millis = Field(0, alias="1s")
    per_minute: Millis = Field(0, alias="1m")

    def at(self, granularity: str) -> int:
        return {"1ms": self.per_millisecond, "1s": self.per_second, "1m": self.per_minute}[
            granularity
        ]

    # The agent adds and serialises these on every poll: sums of validated non-negative
    # counts need no validation again, and the wire form is three keys (bench/agent_poll.py).
    def __add__(self, other: RoundedMs) -> RoundedMs:
        return RoundedMs.model_construct(
            per_millisecond=self.per_millisecond + other.per_millisecond,
            per_second=self.per_second + other.per_second,
            per_minute=self.per_minute + other.per_minute,
        )

    def to_wire(self) -> dict[str, Any]:
        return {"1ms": self.per_millisecond, "1s": self.per_second, "1m": self.per_minute}

    def add_at(self, granularity: str, ms: int) -> None:
        """Add a closed burst's rounded time in place (the meter's hot path)."""
        field = _ROUNDED_FIELDS[granularity]
        setattr(self, field, getattr(self, field) + ms)


_ROUNDED_FIELDS = {"1ms": "per_millisecond", "1s": "per_second", "1m": "per_minute"}


Split = Literal["proportional", "equal"]
"""How the time of a MIG instance shared by several processes was divided among them."""
PROPORTIONAL: Split = "proportional"
EQUAL: Split = "equal"


class SplitUs(ApiModel):
    """Active time of MIG instances shared by several processes, by how it was divided."""

    # proportional: in proportion to each process's own utilization samples, where the
    # driver gave them; equal: equally among the instance's processes, where it did not
    # (an estimate, and the record says so).

    proportional: Micros = 0
    equal: Micros = 0

    def __add__(self, other: SplitUs) -> SplitUs:
        return SplitUs.model_construct(
            proportional=self.proportional + other.proportional, equal=self.equal + other.equal
        )


class Adjustment(ApiModel):
    """Usage that arrived after its own window was Final, billed in this open window."""

    original_window_start: datetime
    reason: ShortString
    active_us: Micros = 0
    active_ms: Millis = 0
    billed_ms: Millis = 0
    rounded_ms: RoundedMs = Field(default_factory=RoundedMs)
    bursts: Count = 0
    amount: DecimalString = "0"


class PodInterval(ApiModel):
    """The part of this window during which one pod held its GPUs (scheduled -> gone)."""

    uid: ShortString
    name: ShortString
    gpus: Annotated[int, Field(ge=0, le=64)]
    start_ms: Millis
    end_ms: Millis
    node: ShortString | None = None
    """The node it ran on: a restarted operator that never saw the pod knows from here
    which agent may report its last usage (absent in records from before this field)."""


class BillingRecordSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules({"rule": "self == oldSelf", "message": "spec is immutable"})
    )

    inference_deployment: DnsLabel | None = None
    """The InferenceDeployment whose pods' GPU time this is (by owner chain). Absent: GPU
    pods of the account's namespace that belong to no InferenceDeployment (bare pods,
    pods of other controllers, pods relabelled away), billed at the namespace's plan."""
    account: ShortString
    window: Window
    plan: DnsLabel
    granularity: Granularity
    currency: Currency
    price_per_gpu_second: DecimalString
    reserved_price_per_gpu_hour: DecimalString
    gpu_product: ShortString


class BillingRecordStatus(ApiModel):
    """Totals include the adjustments; ``adjustments`` shows which part arrived late."""

    state: State = OPEN
    active_us: Micros = 0
    active_ms: Millis = 0
    billed_ms: Millis = 0
    rounded_ms: RoundedMs = Field(default_factory=RoundedMs)
    provisioned_ms: Millis = 0
    idle_ms: Millis = 0
    bursts: Count = 0
    requests: Count = 0
    cold_starts: Count = 0
    amount: DecimalString = "0"
    reserved_equivalent_amount: DecimalString = "0"
    active_gpu_seconds: Annotated[
        DecimalString, Field(description="activeMs / 1000, for kubectl get.")
    ] = "0"
    last_applied_sequence: Annotated[
        dict[ShortString, Annotated[int, Field(ge=0)]],
        Field(
            max_length=MAX_AGENTS,
            description="Per agent id, the last usage report sequence number applied here.",
            # Written whole by the ledger (status PUT): as an atomic map the API server
            # tracks it as one field instead of one managedFields entry per agent, which
            # halves its CPU per record write at 640 agents (bench/record_write_cost.py).
            json_schema_extra={"x-kubernetes-map-type": "atomic"},
        ),
    ] = Field(default_factory=dict)
    adjustments: Annotated[list[Adjustment], Field(max_length=MAX_ADJUSTMENTS)] = Field(
        default_factory=list
    )
    pod_intervals: Annotated[list[PodInterval], Field(max_length=MAX_POD_INTERVALS)] = Field(
        default_factory=list
    )
    folded_pods: Count = 0
    """Pods whose intervals were folded away (the earliest ended first) to keep
    ``podIntervals`` within its bound; their provisioned time is in ``foldedProvisionedMs``."""
    folded_provisioned_ms: Millis = 0
    split_us: Annotated[
        SplitUs | None,
        Field(
            description="Of activeUs, the time of MIG instances shared by several processes:"
            " divided in proportion to their own samples, or equally where the driver gave"
            " none. Absent when none of the time was shared."
        ),
    ] = None
    last_update_time: datetime | None = None
    finalized_at: datetime | None = None


class BillingRecord(ApiModel):
    """A whole object as read from the API server."""

    model_config = ConfigDict(extra="ignore")

    api_version: str
    kind: Literal["BillingRecord"]
    metadata: ObjectMeta
    spec: BillingRecordSpec
    status: BillingRecordStatus = Field(default_factory=BillingRecordStatus)


FINAL_IS_IMMUTABLE_RULE = {
    "rule": "!has(oldSelf.status) || oldSelf.status.state != 'Final' || "
    "(has(self.status) && self.status == oldSelf.status)",
    "message": "a Final BillingRecord cannot be modified (and cannot go back to Open)",
    "fieldPath": ".status",
}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Deployment", "type": "string", "jsonPath": ".spec.inferenceDeployment"},
    {"name": "Window-Start", "type": "string", "jsonPath": ".spec.window.start"},
    {"name": "State", "type": "string", "jsonPath": ".status.state"},
    {"name": "Active-GPU-s", "type": "string", "jsonPath": ".status.activeGpuSeconds"},
    {"name": "Amount", "type": "string", "jsonPath": ".status.amount"},
    {"name": "Currency", "type": "string", "jsonPath": ".spec.currency"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
