"""BillingRecord arithmetic, without I/O: windows, names, and applying one flush's changes.

``apply`` is the heart of exactly-once: a report's usage lands in a record only if its
sequence number is above the one that record stores for its agent, and the new number is
written in the same object update as the totals. Running ``apply`` twice with the same
change therefore changes nothing the second time, which is what makes resends, crashes
and conflicting writers safe.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from payper.api.billing_record import (
    MAX_POD_INTERVALS,
    Adjustment,
    BillingRecordSpec,
    BillingRecordStatus,
    PodInterval,
    RoundedMs,
    SplitUs,
)
from payper.billing.pricing import amount, money, reserved_amount
from payper.clock import iso, seconds
from payper.observed import UNMANAGED

WINDOW_LABEL = "payper.dev/window-start"
STATE_LABEL = "payper.dev/state"
"""Open, Final, then Exported once every export sink acknowledged it (with sinks): the
operator lists only the records it still needs, by label, instead of every record ever
written."""
DEPLOYMENT_LABEL = "payper.dev/inference-deployment"
MOVED_FROM_LABEL = "payper.dev/moved-from-namespace"
"""On a record the ledger moved into its own namespace when the tenant's namespace was
deleted: the namespace it came from (the account is unchanged)."""
ACCOUNT_LABEL = "payper.dev/account"
EXPORTED = "Exported"


def window_start(ms: int, window_ms: int) -> int:
    return ms // window_ms * window_ms


WINDOW_LABEL_FORMAT = "%Y%m%dT%H%M%SZ"


def window_label(start_ms: int) -> str:
    return datetime.fromtimestamp(start_ms / 1000, UTC).strftime(WINDOW_LABEL_FORMAT)


def parse_window_label(label: str) -> int:
    """The window start (ms) a label names; ValueError when it names none."""
    return int(datetime.strptime(label, WINDOW_LABEL_FORMAT).replace(tzinfo=UTC).timestamp()) * 1000


UNMANAGED_RECORD_PREFIX = "unmanaged."
"""Records of a namespace's GPU pods that belong to no InferenceDeployment are named
``unmanaged.<window>-<digest>``: the dot cannot occur in a deployment's records' names
(deployment names are DNS labels), so the two can never collide."""


def record_name(deployment: str, start_ms: int, product: str) -> str:
    digest = hashlib.sha256(product.encode()).hexdigest()[:6]
    stamp = datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%Y%m%d-%H%M%S")
    if deployment == UNMANAGED:
        return f"{UNMANAGED_RECORD_PREFIX}{stamp}-{digest}"
    return f"{deployment}-{stamp}-{digest}"


@dataclass(frozen=True)
class RecordKey:
    namespace: str
    deployment: str
    window_start_ms: int
    product: str

    @property
    def name(self) -> str:
        return record_name(self.deployment, self.window_start_ms, self.product)


def moved_name(namespace: str, name: str) -> str:
    """The name of a record of ``namespace`` once moved into the operator's namespace."""
    return f"{namespace}.{name}"


@dataclass(frozen=True)
class UsageDelta:
    agent_id: str
    """The report's progress key (node and agent id; ``flush.progress_key``)."""
    sequence: int
    active_us: int
    rounded_ms: RoundedMs
    bursts: int
    original_window_ms: int | None = None
    """Set when the usage belongs to a window that was already closed: an adjustment."""
    legacy_agent_id: str | None = None
    """The bare agent id, under which records written before node-keyed progress hold
    this agent's last applied sequence."""
    split_us: SplitUs | None = None
    """Of ``active_us``, the time of a shared MIG instance and how it was divided."""


@dataclass
class PodSpan:
    uid: str
    name: str
    gpus: int
    start_ms: int
    end_ms: int
    node: str | None = None


@dataclass
class RecordChange:
    usage: list[UsageDelta] = field(default_factory=list)
    requests: int = 0
    cold_starts: int = 0
    pods: dict[str, PodSpan] = field(default_factory=dict)


class UnstorableChangeError(ValueError):
    """A record cannot hold a change: its status after the change breaks the record's
    bounds (an amount past 18 digits, more agents than it keeps sequences for)."""


def _millis(active_us: int) -> int:
    return (active_us + 500) // 1000


def apply(
    status: BillingRecordStatus,
    spec: BillingRecordSpec,
    change: RecordChange,
    now_ms: int,
    durable: Mapping[str, int] | None = None,
) -> tuple[BillingRecordStatus, list[tuple[str, int]]]:
    """The record's next status, and the (agent, sequence) pairs newly applied to it.

    ``durable`` is the progress the ledger has saved (per agent, the last report applied
    everywhere): a resend at or below it never reaches a record (the ledger recognises it
    first), so the record forgets such agents. Its map then holds only agents whose
    latest reports are in flight, however many agents and restarts (new agent ids) a
    window sees: it stays below the CRD's bound."""
    last = dict(status.last_applied_sequence)
    active_us = status.active_us
    rounded = status.rounded_ms
    bursts = status.bursts
    split = status.split_us
    adjustments = {a.original_window_start: a for a in status.adjustments}
    applied: list[tuple[str, int]] = []

    by_report: dict[tuple[str, int], list[UsageDelta]] = defaultdict(list)
    for delta in change.usage:
        by_report[(delta.agent_id, delta.sequence)].append(delta)
    for (agent, sequence), deltas in sorted(by_report.items()):
        legacy = deltas[0].legacy_agent_id
        done = last[agent] if agent in last else last.get(legacy or agent, 0)
        if sequence <= done:
            continue  # already in this record: a resend, or a retry after a lost answer
        for delta in deltas:
            active_us += delta.active_us
            rounded += delta.rounded_ms
            bursts += delta.bursts
            if delta.split_us is not None:
                split = delta.split_us if split is None else split + delta.split_us
            if delta.original_window_ms is not None:
                _adjust(adjustments, delta, spec)
        last[agent] = sequence
        applied.append((agent, sequence))

    if durable:
        last = {agent: seq for agent, seq in last.items() if seq > durable.get(agent, 0)}

    pods = {p.uid: p for p in status.pod_intervals}
    for span in change.pods.values():
        current = pods.get(span.uid)
        pods[span.uid] = PodInterval(
            uid=span.uid,
            name=span.name if current is None else current.name,
            gpus=span.gpus if current is None else current.gpus,
            start_ms=span.start_ms if current is None else min(current.start_ms, span.start_ms),
            end_ms=span.end_ms if current is None else max(current.end_ms, span.end_ms),
            node=span.node if current is None else current.node or span.node,
        )

    kept, folded_pods, folded_ms = _fold(pods, status.folded_pods, status.folded_provisioned_ms)
    provisioned = folded_ms + sum((p.end_ms - p.start_ms) * p.gpus for p in kept)
    active_ms = _millis(active_us)
    billed = rounded.at(spec.granularity)
    updated = status.model_copy(
        update={
            "active_us": active_us,
            "active_ms": active_ms,
            "active_gpu_seconds": seconds(active_ms),
            "rounded_ms": rounded,
            "billed_ms": billed,
            "bursts": bursts,
            "requests": status.requests + change.requests,
            "cold_starts": status.cold_starts + change.cold_starts,
            "provisioned_ms": provisioned,
            "idle_ms": max(0, provisioned - active_ms),
            "amount": money(amount(billed, spec.price_per_gpu_second)),
            "reserved_equivalent_amount": money(
                reserved_amount(provisioned, spec.reserved_price_per_gpu_hour)
            ),
            "last_applied_sequence": last,
            "adjustments": [adjustments[k] for k in sorted(adjustments)],
            "pod_intervals": sorted(kept, key=lambda p: (p.start_ms, p.uid)),
            "folded_pods": folded_pods,
            "folded_provisioned_ms": folded_ms,
            "split_us": split,
            "last_update_time": datetime.fromtimestamp(now_ms / 1000, UTC),
        }
    )
    # model_copy does not validate: validating the result keeps every constraint of the
    # CRD (bounds, patterns, list sizes) checked here, before the API server sees it.
    return BillingRecordStatus.model_validate(updated.model_dump()), applied


def _fold(
    pods: dict[str, PodInterval], folded_pods: int, folded_ms: int
) -> tuple[list[PodInterval], int, int]:
    """At most MAX_POD_INTERVALS intervals stay listed; beyond that (pods churned through
    the window) the earliest ended ones are folded into two totals, so the record stays
    writable and its provisioned time exact. A folded pod is one that ended long ago:
    a running pod ends last and is never the one folded."""
    listed = sorted(pods.values(), key=lambda p: (p.end_ms, p.uid))
    excess = len(listed) - MAX_POD_INTERVALS
    if excess <= 0:
        return listed, folded_pods, folded_ms
    folded = listed[:excess]
    return (
        listed[excess:],
        folded_pods + len(folded),
        folded_ms + sum((p.end_ms - p.start_ms) * p.gpus for p in folded),
    )


def same_totals(a: BillingRecordStatus, b: BillingRecordStatus) -> bool:
    """Equal statuses apart from the time of the update."""
    return a.model_copy(update={"last_update_time": None}) == b.model_copy(
        update={"last_update_time": None}
    )


def _adjust(
    adjustments: dict[datetime, Adjustment], delta: UsageDelta, spec: BillingRecordSpec
) -> None:
    assert delta.original_window_ms is not None
    start = datetime.fromtimestamp(delta.original_window_ms / 1000, UTC)
    entry = adjustments.get(start) or Adjustment(
        original_window_start=start,
        reason=f"late usage for the window starting {iso(delta.original_window_ms)}, "
        "which was already final",
    )
    active_us = entry.active_us + delta.active_us
    rounded = entry.rounded_ms + delta.rounded_ms
    billed = rounded.at(spec.granularity)
    adjustments[start] = entry.model_copy(
        update={
            "active_us": active_us,
            "active_ms": _millis(active_us),
            "rounded_ms": rounded,
            "billed_ms": billed,
            "bursts": entry.bursts + delta.bursts,
            "amount": money(amount(billed, spec.price_per_gpu_second)),
        }
    )
