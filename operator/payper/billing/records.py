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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from payper.api.billing_record import GRANULARITY_MS, BillingRecordSpec
from payper.billing.pricing import amount, money, reserved_amount
from payper.clock import iso, seconds

WINDOW_LABEL = "payper.dev/window-start"
DEPLOYMENT_LABEL = "payper.dev/inference-deployment"
ACCOUNT_LABEL = "payper.dev/account"


def window_start(ms: int, window_ms: int) -> int:
    return ms // window_ms * window_ms


def window_label(start_ms: int) -> str:
    return datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%Y%m%dT%H%M%SZ")


def record_name(deployment: str, start_ms: int, product: str) -> str:
    digest = hashlib.sha256(product.encode()).hexdigest()[:6]
    stamp = datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%Y%m%d-%H%M%S")
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


@dataclass(frozen=True)
class UsageDelta:
    agent_id: str
    sequence: int
    active_us: int
    rounded_ms: dict[str, int]
    bursts: int
    original_window_ms: int | None = None
    """Set when the usage belongs to a window that was already closed: an adjustment."""


@dataclass
class PodSpan:
    uid: str
    name: str
    gpus: int
    start_ms: int
    end_ms: int


@dataclass
class RecordChange:
    usage: list[UsageDelta] = field(default_factory=list)
    requests: int = 0
    cold_starts: int = 0
    pods: dict[str, PodSpan] = field(default_factory=dict)


def _rounded(status: dict[str, Any]) -> dict[str, int]:
    found = status.get("roundedMs") or {}
    return {g: int(found.get(g, 0)) for g in GRANULARITY_MS}


def apply(
    status: dict[str, Any], spec: BillingRecordSpec, change: RecordChange, now_ms: int
) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """The record's next status, and the (agent, sequence) pairs newly applied to it."""
    out = dict(status)
    last = dict(out.get("lastAppliedSequence") or {})
    active_us = int(out.get("activeUs", 0))
    rounded = _rounded(out)
    bursts = int(out.get("bursts", 0))
    adjustments = {a["originalWindowStart"]: dict(a) for a in out.get("adjustments") or []}
    applied: list[tuple[str, int]] = []

    by_report: dict[tuple[str, int], list[UsageDelta]] = defaultdict(list)
    for delta in change.usage:
        by_report[(delta.agent_id, delta.sequence)].append(delta)
    for (agent, sequence), deltas in sorted(by_report.items()):
        if sequence <= int(last.get(agent, 0)):
            continue  # already in this record: a resend, or a retry after a lost answer
        for delta in deltas:
            active_us += delta.active_us
            for g in GRANULARITY_MS:
                rounded[g] += delta.rounded_ms.get(g, 0)
            bursts += delta.bursts
            if delta.original_window_ms is not None:
                _adjust(adjustments, delta, spec)
        last[agent] = sequence
        applied.append((agent, sequence))

    pods = {p["uid"]: dict(p) for p in out.get("podIntervals") or []}
    for span in change.pods.values():
        current = pods.get(span.uid)
        if current is None:
            pods[span.uid] = {
                "uid": span.uid,
                "name": span.name,
                "gpus": span.gpus,
                "startMs": span.start_ms,
                "endMs": span.end_ms,
            }
        else:
            current["startMs"] = min(int(current["startMs"]), span.start_ms)
            current["endMs"] = max(int(current["endMs"]), span.end_ms)

    provisioned = sum((int(p["endMs"]) - int(p["startMs"])) * int(p["gpus"]) for p in pods.values())
    active_ms = (active_us + 500) // 1000
    billed = rounded[spec.granularity]
    out.update(
        {
            "state": out.get("state", "Open"),
            "activeUs": active_us,
            "activeMs": active_ms,
            "activeGpuSeconds": seconds(active_ms),
            "roundedMs": rounded,
            "billedMs": billed,
            "bursts": bursts,
            "requests": int(out.get("requests", 0)) + change.requests,
            "coldStarts": int(out.get("coldStarts", 0)) + change.cold_starts,
            "provisionedMs": provisioned,
            "idleMs": max(0, provisioned - active_ms),
            "amount": money(amount(billed, spec.price_per_gpu_second)),
            "reservedEquivalentAmount": money(
                reserved_amount(provisioned, spec.reserved_price_per_gpu_hour)
            ),
            "lastAppliedSequence": last,
            "adjustments": [adjustments[k] for k in sorted(adjustments)],
            "podIntervals": sorted(pods.values(), key=lambda p: (p["startMs"], p["uid"])),
            "lastUpdateTime": iso(now_ms),
        }
    )
    return out, applied


def _adjust(
    adjustments: dict[str, dict[str, Any]], delta: UsageDelta, spec: BillingRecordSpec
) -> None:
    assert delta.original_window_ms is not None
    key = iso(delta.original_window_ms)
    entry = adjustments.setdefault(
        key,
        {
            "originalWindowStart": key,
            "reason": f"late usage for the window starting {key}, which was already final",
            "activeUs": 0,
            "activeMs": 0,
            "billedMs": 0,
            "roundedMs": dict.fromkeys(GRANULARITY_MS, 0),
            "bursts": 0,
            "amount": "0",
        },
    )
    entry["activeUs"] = int(entry["activeUs"]) + delta.active_us
    entry["activeMs"] = (entry["activeUs"] + 500) // 1000
    entry["roundedMs"] = {
        g: int(entry["roundedMs"].get(g, 0)) + delta.rounded_ms.get(g, 0) for g in GRANULARITY_MS
    }
    entry["billedMs"] = entry["roundedMs"][spec.granularity]
    entry["bursts"] = int(entry["bursts"]) + delta.bursts
    entry["amount"] = money(amount(entry["billedMs"], spec.price_per_gpu_second))
