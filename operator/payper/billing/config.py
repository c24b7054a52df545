"""The billing part of the operator's configuration: windows, grace, flushes, plans, and
which plans the platform grants to which namespaces.

Billing owns its settings; the operator's configuration file embeds them under
``billing:`` and validates them at start-up with the rest.

Tenants never choose their price. A deployment may name a plan (``spec.billing.plan``),
but only among those granted to its namespace: by an explicit list of namespaces or a
namespace label selector, first matching grant wins, and ``defaultPlan`` for namespaces
no grant mentions. A deployment that names a plan its namespace may not use is priced at
the namespace's default plan (and the operator does not wake it from zero); nothing is
priced at zero unless a configured plan says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from payper.api.common import ApiModel, DnsLabel, LabelValue, ShortString, defaulted
from payper.billing.pricing import Plan, default_plans

DAY_SECONDS = 86400
WINDOW_STEP_SECONDS = 10
"""Agents cut reports on 10 s boundaries: a window of whole steps never splits a report."""
WINDOW_LENGTHS = tuple(
    seconds
    for seconds in range(WINDOW_STEP_SECONDS, DAY_SECONDS + 1, WINDOW_STEP_SECONDS)
    if DAY_SECONDS % seconds == 0
)
"""Every allowed window length: whole steps that tile each UTC day exactly."""

WindowSeconds = Annotated[
    int,
    Field(ge=WINDOW_STEP_SECONDS, le=DAY_SECONDS, json_schema_extra={"enum": list(WINDOW_LENGTHS)}),
]
"""Checked by ``BillingConfig`` (with its message); the JSON Schema lists the lengths, so the
chart's values.schema.json refuses what the operator would refuse."""


LabelKey = Annotated[
    str, Field(pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", max_length=253)
]


class PlanGrant(ApiModel):
    """Plans the platform grants to some namespaces (by name or by their labels)."""

    namespaces: Annotated[list[DnsLabel], Field(max_length=1000)] = Field(default_factory=list)
    namespace_selector: Annotated[dict[LabelKey, LabelValue], Field(max_length=32)] = Field(
        default_factory=dict
    )
    """matchLabels: a namespace with all these labels is granted these plans."""
    plans: Annotated[list[DnsLabel], Field(min_length=1, max_length=64)]
    default_plan: DnsLabel
    """What the namespace's deployments that name no plan (or one not granted) pay."""

    @model_validator(mode="after")
    def _consistent(self) -> PlanGrant:
        if not self.namespaces and not self.namespace_selector:
            raise ValueError("a grant names namespaces, a namespaceSelector, or both")
        if self.default_plan not in self.plans:
            raise ValueError(f"defaultPlan {self.default_plan!r} is not among its plans")
        return self

    def matches(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if namespace in self.namespaces:
            return True
        return bool(self.namespace_selector) and all(
            labels.get(key) == value for key, value in self.namespace_selector.items()
        )


@dataclass(frozen=True)
class PlanChoice:
    """The plan that prices a deployment's usage, and whether its own choice stands."""

    name: str
    allowed: tuple[str, ...]
    granted: bool
    """False: the deployment names a plan its namespace may not use."""
    requested: str | None


DEFAULT_EXPORTED_RETENTION_DAYS = 3
"""How long a Final record every sink acknowledged is kept, unless configured."""

HttpUrl = Annotated[str, Field(pattern=r"^https?://[^\s/?#]+(/[^\s]*)?$", max_length=2048)]


class _Sink(ApiModel):
    name: DnsLabel
    """Names the sink in metrics and in each record's export annotation: renaming a sink
    makes it a new one, which is sent every record not yet Exported."""
    batch_size: Annotated[int, Field(ge=1, le=1000)] = 100
    """Events per send (CloudEvents: per POST; Stripe: per round of requests)."""
    timeout_seconds: Annotated[float, Field(ge=0.1, le=300)] = 10.0


class CloudEventsSinkConfig(_Sink):
    """Where usage goes, once each (``payper.billing.exporter``): CloudEvents over HTTP."""

    type: Literal["cloudevents"]
    url: HttpUrl
    """Batches are POSTed here as ``application/cloudevents-batch+json``."""
    bearer_token_file: Path | None = None
    """A file (a mounted Secret) holding the token sent as ``Authorization: Bearer``."""


StripeCustomer = Annotated[str, Field(pattern=r"^cus_[A-Za-z0-9]{1,250}$")]
StripeEventName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")]


class StripeMeters(ApiModel):
    by: Literal["plan", "gpuProduct"] = "plan"
    """Which meter an event goes to: one per plan, or one per GPU product (its key, as in
    a plan's price table: ``NVIDIA-H100-80GB-HBM3``)."""
    event_names: Annotated[dict[ShortString, StripeEventName], Field(min_length=1)]
    """Plan (or GPU product) to the ``event_name`` of a Stripe meter. Usage of one not
    listed is reported (``payper_export_refused_records``) and kept, never dropped."""


class StripeSinkConfig(_Sink):
    """Stripe Billing meter events (``payper.billing.stripe_sink``)."""

    type: Literal["stripe"]
    api_key_file: Path
    """A file (a mounted Secret) holding a Stripe secret or restricted key with write
    access to meter events (and read access to meters, prices and customers for
    ``payper export stripe --check``)."""
    api_base: HttpUrl = "https://api.stripe.com"
    customers: Annotated[dict[DnsLabel, StripeCustomer], Field(max_length=100_000)] = Field(
        default_factory=dict
    )
    """Namespace to Stripe customer: the platform's word, never a tenant's. Usage of a
    namespace not listed is reported and kept until it is."""
    meters: StripeMeters
    concurrency: Annotated[int, Field(ge=1, le=64)] = 8
    """Meter event requests in flight at once (Stripe takes one event per request)."""


SinkConfig = Annotated[CloudEventsSinkConfig | StripeSinkConfig, Field(discriminator="type")]


class ExportConfig(ApiModel):
    sinks: Annotated[list[SinkConfig], Field(max_length=8)] = Field(default_factory=list)
    source: ShortString = "//payper"
    """The CloudEvents ``source`` of every event: name the cluster (``//payper/eu-1``)."""
    min_backoff_seconds: Annotated[float, Field(ge=0.05, le=60)] = 1.0
    max_backoff_seconds: Annotated[float, Field(ge=0.05, le=3600)] = 300.0
    """A failing sink is retried after a delay that doubles per failure up to this, each
    drawn between half and all of it (jitter), without end: nothing is dropped."""
    max_backlog_records: Annotated[int, Field(ge=1, le=10_000_000)] = 50_000
    """Past this many records waiting for one sink, the operator reports the sink as
    falling behind (``payper_export_backlog_exceeded`` and the chart's alert)."""

    @field_validator("sinks")
    @classmethod
    def _unique(cls, sinks: list[SinkConfig]) -> list[SinkConfig]:
        names = [s.name for s in sinks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"sink names must be unique: {', '.join(repeated)} repeated")
        return sinks


class BillingConfig(ApiModel):
    window_seconds: WindowSeconds = 3600
    """One BillingRecord per deployment (and GPU product) per window."""
    grace_seconds: Annotated[int, Field(ge=0, le=86400)] = 300
    """A record becomes Final this long after its window ends; later usage is an adjustment."""
    flush_interval_seconds: Annotated[float, Field(ge=0.2, le=300)] = 10.0
    """Each record is written at most once per flush; usage reports are acknowledged after it."""
    record_write_concurrency: Annotated[int, Field(ge=1, le=32)] = 16
    """How many BillingRecords a flush writes at the same time (each still at most once per
    flush); 1 writes them one after another."""
    ledger_config_map: ShortString = "payper-usage-ledger"
    """Per agent id, the last report applied everywhere (in the leader election namespace)."""
    plans: dict[DnsLabel, Plan] = Field(default_factory=default_plans)
    default_plan: DnsLabel = "default"
    """The plan of namespaces no grant mentions (the only plan they may use)."""
    grants: Annotated[list[PlanGrant], Field(max_length=1000)] = Field(default_factory=list)
    """First matching grant wins."""
    reconciliation_retention_days: Annotated[int, Field(ge=1, le=3660)] = 14
    """How long the per-GPU reconciliation (one ConfigMap per GPU node and window) is kept."""
    record_retention_days: Annotated[int | None, Field(ge=1, le=3660)] = None
    """How long a Final BillingRecord is kept after its window ends; then the operator
    deletes it (with sinks: only once every sink acknowledged it, i.e. Exported). Unset:
    3 days with sinks; with none, kept for ever, and etcd grows by every deployment's
    every window (the operator warns at start)."""
    export: ExportConfig = defaulted(ExportConfig)
    accept_simulated_reports: bool = False
    """Accept usage reports from agents on the simulated backend (the local cluster, the
    demo and the tests). A real cluster must not: a simulated meter could bill anything."""
    unmetered_after_seconds: Annotated[int, Field(ge=5, le=86400)] = 60
    """A node whose pods hold GPUs and from which no usage report arrived for this long is
    reported as unmetered capacity (metric and event)."""

    @model_validator(mode="after")
    def _plans_exist(self) -> BillingConfig:
        named = [("defaultPlan", self.default_plan)] + [
            (f"grants.{index}", plan)
            for index, grant in enumerate(self.grants)
            for plan in grant.plans
        ]
        missing = [f"{where}: {plan!r}" for where, plan in named if plan not in self.plans]
        if missing:
            raise ValueError(
                f"names plans that are not configured ({', '.join(missing)}); "
                f"configured: {', '.join(sorted(self.plans))}"
            )
        return self

    @property
    def retention_days(self) -> int | None:
        """How long Final records are kept: as configured, else 3 days once exported."""
        if self.record_retention_days is not None or not self.export.sinks:
            return self.record_retention_days
        return DEFAULT_EXPORTED_RETENTION_DAYS

    def plan_for(
        self, namespace: str, labels: Mapping[str, str], requested: str | None
    ) -> PlanChoice:
        grant = next((g for g in self.grants if g.matches(namespace, labels)), None)
        allowed = tuple(grant.plans) if grant else (self.default_plan,)
        default = grant.default_plan if grant else self.default_plan
        if requested is None:
            return PlanChoice(default, allowed, True, None)
        if requested in allowed:
            return PlanChoice(requested, allowed, True, requested)
        return PlanChoice(default, allowed, False, requested)

    @field_validator("window_seconds")
    @classmethod
    def _window(cls, value: int) -> int:
        if value not in WINDOW_LENGTHS:
            raise ValueError(
                "must be a multiple of 10 s that divides a day (agents report every 10 s)"
            )
        return value
