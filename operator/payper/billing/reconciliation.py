"""The per-GPU reconciliation's arithmetic, without I/O: which reports a flush adds to which
node and window, and how an object gains them exactly once and stays bounded.

A report's per-GPU times (``payper.api.usage.GpuTime``) go to the node's object for the
window its usage went to in the BillingRecords (the window it was observed in, or the
current one when that window was already Final, like late usage), so that over any range
of windows the objects and the records can be compared. Only reports the flush
acknowledges are added, after their records were written: then every record a report
touched holds it (or the dead-letter store does), and the object says how much of the
report's attributed time the records got. The object stores the last sequence applied per
agent, so a resend after a crash between its write and the progress save changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from payper.api.reconciliation import MAX_AGENTS, MAX_GPUS, OTHER_GPU, NodeWindowReconciliation
from payper.api.usage import GpuTime, UsageReport
from payper.billing.flush import BillingWindows, FlushPlan, ReportId, progress_key
from payper.billing.records import RecordKey

KINDS = ("attributed", "unattributed", "unmetered", "idle")
"""Where a GPU-second went; with ``excess`` these are the metric's ``use`` label values."""


@dataclass(frozen=True)
class ReportTimes:
    """What one applied report adds to its node's object."""

    agent: str
    """The report's progress key (node/agent id)."""
    sequence: int
    gpus: tuple[GpuTime, ...]
    in_records_us: int
    """The report's series active time that landed in BillingRecords this flush."""


@dataclass
class NodeWindow:
    node: str
    window_start_ms: int
    reports: list[ReportTimes] = field(default_factory=list)


def window_of(report: UsageReport, windows: BillingWindows, now_ms: int) -> int:
    """The window the report's usage went to in the records (late usage: the current one)."""
    observed = windows.start(report.interval_start_ms)
    return windows.start(now_ms) if windows.closed(observed, now_ms) else observed


def in_records(planned: FlushPlan, not_written: set[RecordKey]) -> dict[ReportId, int]:
    """Per report, the active time the flush put into records (not the ones in
    ``not_written``: failed, to be retried, or dead-lettered)."""
    landed: dict[ReportId, int] = defaultdict(int)
    for key, change in planned.changes.items():
        if key in not_written:
            continue
        for delta in change.usage:
            landed[(delta.agent_id, delta.sequence)] += delta.active_us
    return landed


def collect(
    planned: FlushPlan,
    acknowledged: Mapping[str, int],
    not_written: set[RecordKey],
    windows: BillingWindows,
    now_ms: int,
) -> dict[tuple[str, int], NodeWindow]:
    """Per (node, window): the reports this flush acknowledges, with their per-GPU times."""
    landed = in_records(planned, not_written)
    grouped: dict[tuple[str, int], NodeWindow] = {}
    for report in planned.selection.accepted:
        agent = progress_key(report)
        if acknowledged.get(agent, 0) < report.sequence:
            continue  # not acknowledged: it comes again, and is added then
        window = window_of(report, windows, now_ms)
        target = grouped.setdefault((report.node, window), NodeWindow(report.node, window))
        target.reports.append(
            ReportTimes(
                agent, report.sequence, tuple(report.gpus), landed.get((agent, report.sequence), 0)
            )
        )
    return grouped


def empty(node: str, window_start_ms: int, window_ms: int) -> NodeWindowReconciliation:
    return NodeWindowReconciliation(
        node=node,
        window_start=datetime.fromtimestamp(window_start_ms / 1000, UTC),
        window_end=datetime.fromtimestamp((window_start_ms + window_ms) / 1000, UTC),
    )


def add_times(a: GpuTime, b: GpuTime, gpu: str | None = None) -> GpuTime:
    """Two rows summed; idle and excess are netted, so the sum adds up as each part does."""
    rest = (a.idle_us - a.excess_us) + (b.idle_us - b.excess_us)
    return GpuTime(
        gpu=gpu or a.gpu,
        gpu_product=a.gpu_product if a.gpu_product == b.gpu_product else "mixed",
        wall_us=a.wall_us + b.wall_us,
        attributed_us=a.attributed_us + b.attributed_us,
        unattributed_us=a.unattributed_us + b.unattributed_us,
        unmetered_us=a.unmetered_us + b.unmetered_us,
        idle_us=max(0, rest),
        excess_us=max(0, -rest),
    )


def merge(
    stored: NodeWindowReconciliation,
    reports: Sequence[ReportTimes],
    now_ms: int,
    durable: Mapping[str, int] | None = None,
) -> tuple[NodeWindowReconciliation, list[ReportTimes]]:
    """The object with ``reports`` added, and which of them were new to it (a report
    whose sequence it already holds for its agent is a resend: skipped). Agents whose
    reports are durable in the ledger's progress (``durable``: a resend at or below it
    never gets here) are forgotten first, as records forget them."""
    last = dict(stored.last_applied_sequence)
    rows = {row.gpu: row for row in stored.gpus}
    attributed_in_records = stored.attributed_in_records_us
    unreconciled = stored.unreconciled_in_records_us
    forgotten = stored.forgotten_agents
    new: list[ReportTimes] = []
    for report in sorted(reports, key=lambda r: (r.agent, r.sequence)):
        if report.sequence <= last.get(report.agent, 0):
            continue
        for row in report.gpus:
            rows[row.gpu] = add_times(rows[row.gpu], row) if row.gpu in rows else row
        if report.gpus:
            attributed_in_records += report.in_records_us
        else:
            unreconciled += report.in_records_us  # an agent without per-GPU times
        last.pop(report.agent, None)
        last[report.agent] = report.sequence  # most recently applied last
        new.append(report)
    if durable:
        last = {agent: seq for agent, seq in last.items() if seq > durable.get(agent, 0)}
    while len(last) > MAX_AGENTS:
        del last[next(iter(last))]  # the agent applied longest ago
        forgotten += 1
    updated = stored.model_copy(
        update={
            "gpus": fold(list(rows.values())),
            "attributed_in_records_us": attributed_in_records,
            "unreconciled_in_records_us": unreconciled,
            "reports": stored.reports + len(new),
            "last_applied_sequence": last,
            "forgotten_agents": forgotten,
            "last_update_time": datetime.fromtimestamp(now_ms / 1000, UTC),
        }
    )
    return NodeWindowReconciliation.model_validate(updated.model_dump()), new


def fold(rows: list[GpuTime]) -> list[GpuTime]:
    """At most MAX_GPUS rows, sorted by GPU; the rest summed into one ``other`` row."""
    named = sorted((r for r in rows if r.gpu != OTHER_GPU), key=lambda r: r.gpu)
    others = [r for r in rows if r.gpu == OTHER_GPU]
    if len(named) + len(others) <= MAX_GPUS:
        return named + others
    keep = MAX_GPUS - 1
    folded = [*named[keep:], *others]
    total = folded[0]
    for row in folded[1:]:
        total = add_times(total, row, OTHER_GPU)
    return [*named[:keep], total.model_copy(update={"gpu": OTHER_GPU})]


def amounts(row: GpuTime) -> dict[str, int]:
    """A row as the metric's ``use`` values, in microseconds."""
    return {
        "attributed": row.attributed_us,
        "unattributed": row.unattributed_us,
        "unmetered": row.unmetered_us,
        "idle": row.idle_us,
        "excess": row.excess_us,
    }
