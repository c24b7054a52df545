"""The ledger's Prometheus metrics: what was billed, per deployment and GPU model.

Counters grow by what each flush newly wrote into BillingRecords, so their rates match
the records (within a flush interval). Amount counters are floats because Prometheus
samples are; the records hold the exact decimal amounts.
"""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import Counter, Gauge, Histogram

from payper.api.billing_record import GRANULARITY_MS, BillingRecordSpec, BillingRecordStatus
from payper.billing.pricing import amount

LABELS = ("namespace", "inference_deployment", "gpu_model")

ACTIVE = Counter(
    "payper_gpu_active_seconds_total",
    "GPU time in which the deployment's kernels were executing (what pay-per-compute bills).",
    LABELS,
)
BILLED = Counter(
    "payper_gpu_billed_seconds_total",
    "Active GPU time rounded up per burst at the plan's granularity: the billed time.",
    LABELS,
)
ROUNDED = Counter(
    "payper_gpu_rounded_seconds_total",
    "Active GPU time rounded up per burst at each standard granularity (1ms, 1s, 1m).",
    (*LABELS, "granularity"),
)
PROVISIONED = Counter(
    "payper_gpu_provisioned_seconds_total",
    "GPU time the deployment's pods held their GPUs (scheduled to gone) x GPUs.",
    LABELS,
)
BILLED_AMOUNT = Counter(
    "payper_billed_amount_total", "Amount billed for active GPU time.", (*LABELS, "currency")
)
AMOUNT_AT_GRANULARITY = Counter(
    "payper_amount_at_granularity_total",
    "What the same active GPU time costs when billed per millisecond, second or minute.",
    (*LABELS, "granularity", "currency"),
)
RESERVED_AMOUNT = Counter(
    "payper_reserved_equivalent_amount_total",
    "What the provisioned GPU time would have cost at reserved hourly prices.",
    (*LABELS, "currency"),
)
USAGE_REPORTS = Counter(
    "payper_usage_reports_total",
    "Usage reports received from agents, by result.",
    ("result",),
)
USAGE_LAG = Histogram(
    "payper_usage_report_lag_seconds",
    "Time from the end of a report's interval to its application in the ledger.",
    buckets=(1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 900, 3600, 86400),
)
SERIES_REFUSED = Counter(
    "payper_usage_series_refused_total",
    "Usage series not applied: an agent claimed usage for a pod the operator sees on "
    "another node, or did not see on a node within the wait (by reporting node, reason).",
    ("node", "reason"),
)
DEAD_LETTERS = Counter(
    "payper_billing_dead_letters_total",
    "Record changes the API server refuses for good (namespace gone or terminating, "
    "invalid), filed in the dead-letter store instead of stalling the agents' reports.",
    ("reason",),
)
DEAD_LETTERS_FULL = Gauge(
    "payper_billing_dead_letters_full",
    "1 while the dead-letter store is full: those reports stay unacknowledged.",
)
REPORTS_REFUSED = Counter(
    "payper_usage_reports_refused_total",
    "Usage reports the operator refused (not valid, too many agent ids from one node, or "
    "their application raised), filed in the dead-letter store and moved past, by the node "
    "whose token sent them. Never billed; settled by the platform team.",
    ("node",),
)
USAGE_LOST = Counter(
    "payper_usage_lost_seconds_total",
    "GPU time agents measured but dropped before delivery (their gap markers): an audited "
    "loss of known size, never billed, never a stalled sequence.",
    ("node", "reason"),
)
FLUSH_DURATION = Histogram(
    "payper_billing_flush_duration_seconds",
    "Time one ledger flush takes (records written, progress saved); near the flush "
    "interval means the ledger is falling behind.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECORDS_MOVED = Counter(
    "payper_billing_records_moved_total",
    "Open BillingRecords moved into the operator's namespace because their own was being "
    "deleted (their later usage lands there, nothing is lost with the namespace).",
)
GPU_WALL = Counter(
    "payper_gpu_wall_seconds_total",
    "Wall-clock time agents accounted per metered GPU; the sum over use of "
    "payper_gpu_time_seconds_total, less its excess.",
    ("node", "gpu"),
)
GPU_TIME = Counter(
    "payper_gpu_time_seconds_total",
    "Where each metered GPU's time went, by use: attributed (to pods), unattributed "
    "(processes in no pod), unmetered (the driver could not say), idle; excess is time "
    "attributed beyond the wall clock (normally 0).",
    ("node", "gpu", "use"),
)
GPU_ATTRIBUTED_IN_RECORDS = Counter(
    "payper_gpu_attributed_in_records_seconds_total",
    "Of the attributed GPU time, what the ledger applied to BillingRecords (per node).",
    ("node",),
)
UNMETERED_CAPACITY = Gauge(
    "payper_gpu_unmetered_capacity_gpus",
    "GPUs held by running pods on a node from which no usage report arrived for several "
    "report intervals (no agent there: its nodeSelector or tolerations do not match).",
    ("node",),
)
FOREIGN_RECORDS = Counter(
    "payper_billing_foreign_records_total",
    "BillingRecords found under a name the ledger wanted but not created by it (no valid "
    "seal): left alone; the ledger keeps its record in its own namespace instead.",
)
FINALIZED = Counter("payper_billing_records_finalized_total", "BillingRecords that became Final.")
RECORDS_DELETED = Counter(
    "payper_billing_records_deleted_total",
    "Final BillingRecords deleted past billing.recordRetentionDays.",
)


def prime(namespace: str, deployment: str, gpu_model: str, currency: str) -> None:
    """Create a deployment's series at zero once its pods hold GPUs, before usage flows.

    A counter whose first scraped sample is already above zero loses that first amount in
    ``increase()``; starting every series at 0 keeps dashboard sums equal to the records.
    """
    labels = (namespace, deployment, gpu_model)
    for counter in (ACTIVE, BILLED, PROVISIONED):
        counter.labels(*labels).inc(0)
    for granularity in GRANULARITY_MS:
        ROUNDED.labels(*labels, granularity).inc(0)
        AMOUNT_AT_GRANULARITY.labels(*labels, granularity, currency).inc(0)
    BILLED_AMOUNT.labels(*labels, currency).inc(0)
    RESERVED_AMOUNT.labels(*labels, currency).inc(0)


EXPORTED_EVENTS = Counter(
    "payper_export_events_total",
    "Usage events sent to a sink (sent: it took them; failed: retried after a backoff).",
    ("sink", "result"),
)
EXPORT_BACKLOG = Gauge(
    "payper_export_backlog_records",
    "Records with a delta sealed for a sink and not yet sent.",
    ("sink",),
)
EXPORT_LAG = Gauge(
    "payper_export_lag_seconds",
    "How long the oldest delta still owed to a sink has waited since it was sealed.",
    ("sink",),
)
EXPORT_BACKLOG_EXCEEDED = Gauge(
    "payper_export_backlog_exceeded",
    "1 while a sink is owed more records than billing.export.maxBacklogRecords.",
    ("sink",),
)
EXPORT_REFUSED_RECORDS = Gauge(
    "payper_export_refused_records",
    "Records whose usage a sink refused (a namespace with no customer, a plan with no "
    "meter, a request the billing system rejects): kept, and offered again after "
    "billing.export.maxBackoffSeconds.",
    ("sink",),
)
RECORDS_AWAITING_EXPORT = Gauge(
    "payper_billing_records_awaiting_export",
    "Final BillingRecords not yet acknowledged by every sink (kept until they are).",
)
EXPORT_HELD_RECORDS = Gauge(
    "payper_export_held_records",
    "Records whose export annotation payper did not write (bad MAC): not exported, alerted.",
    ("namespace",),
)
RECORDS_EXPORTED = Counter(
    "payper_billing_records_exported_total", "Final BillingRecords every sink acknowledged."
)


def count_applied(
    labels: tuple[str, str, str],
    spec: BillingRecordSpec,
    before: BillingRecordStatus,
    after: BillingRecordStatus,
) -> None:
    """Count what one record write added, by (namespace, deployment, GPU product).
    Prometheus samples are floats by definition; the records keep the exact decimals."""
    ACTIVE.labels(*labels).inc(max(0, after.active_us - before.active_us) / 1e6)
    BILLED.labels(*labels).inc(max(0, after.billed_ms - before.billed_ms) / 1000)
    PROVISIONED.labels(*labels).inc(max(0, after.provisioned_ms - before.provisioned_ms) / 1000)
    for granularity in GRANULARITY_MS:
        now_ms = after.rounded_ms.at(granularity)
        was_ms = before.rounded_ms.at(granularity)
        ROUNDED.labels(*labels, granularity).inc(max(0, now_ms - was_ms) / 1000)
        priced = amount(now_ms, spec.price_per_gpu_second) - amount(
            was_ms, spec.price_per_gpu_second
        )
        if priced > 0:
            AMOUNT_AT_GRANULARITY.labels(*labels, granularity, spec.currency).inc(float(priced))
    for metric, was, now in (
        (BILLED_AMOUNT, before.amount, after.amount),
        (RESERVED_AMOUNT, before.reserved_equivalent_amount, after.reserved_equivalent_amount),
    ):
        money_delta = Decimal(now) - Decimal(was)
        if money_delta > 0:
            metric.labels(*labels, spec.currency).inc(float(money_delta))
