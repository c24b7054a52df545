"""Intake: the reports of one flush, with every report that cannot be billed refused alone.

Billing must never stop for everyone because of one report. A report is refused when it
is not valid (``payper.api.usage.validate_each``), when its node sends more agent ids in
one flush than an honest node has agents, when its interval starts more than 35 days
before or 2 minutes after the operator's clock, or when applying it raises. A refused report
whose agent and sequence are known becomes a *gap marker* under its sequence (no series,
the GPU time it claimed and why), so its agent moves past it exactly like past a report
the agent itself dropped: the ledger files its content in the dead-letter store first, and
the rest of the flush goes on. Pure: the ledger does the I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from payper.api.usage import RefusedReport, UsageReport, refusal
from payper.billing import flush

REFUSED = "refused"
"""The gap marker's ``lostReason`` for a report the operator refused."""
MAX_AGENTS_PER_NODE = 8
"""Agent ids one node may report under in one flush. An honest node runs one agent (two
while one replaces another); a token that invents ids could otherwise make a record hold
more agents' sequences than it can store, refusing the record's honest usage with it."""


@dataclass
class Receipt:
    """The answer to one batch: per agent, what is applied durably, and the reports of the
    batch that were refused (``{agentId, sequence, reason}`` each on the wire)."""

    acked: dict[str, int]
    refused: list[RefusedReport]

    def to_wire(self) -> dict[str, Any]:
        """``refused`` only when there are some: an honest batch is answered as before."""
        refused = {"refused": [r.answer() for r in self.refused]} if self.refused else {}
        return {"acked": self.acked, **refused}


@dataclass
class Batch:
    """One agent's batch waiting for the flush: its valid reports, those refused on
    arrival, the node its token is bound to, and the caller's future."""

    reports: list[UsageReport]
    refused: list[RefusedReport]
    node: str
    future: asyncio.Future[Receipt]
    markers: list[UsageReport] = field(default_factory=list)
    """Gap markers of this batch's refused reports that the dead-letter store holds."""

    def receipt(self, applied_through: dict[str, int]) -> Receipt:
        """Per agent of the batch (its refused reports' agents too: a resend of one
        applied before is acknowledged), what is applied durably."""
        named = [gap_marker(self.node, r, 0) for r in self.refused if r.agent_id and r.sequence]
        acked: dict[str, int] = {}
        for report in [*self.reports, *named]:
            acked[report.agent_id] = max(
                acked.get(report.agent_id, 0), flush.applied(applied_through, report)
            )
        return Receipt(acked=acked, refused=self.refused)


def gap_marker(node: str, refused: RefusedReport, now_ms: int) -> UsageReport:
    """The report that stands for a refused one: its agent moves past its sequence."""
    assert refused.agent_id is not None and refused.sequence is not None
    return UsageReport(
        agent_id=refused.agent_id,
        sequence=refused.sequence,
        node=node,
        interval_start_ms=now_ms,
        interval_end_ms=now_ms,
        lost_us=refused.claimed_us,
        lost_reason=REFUSED,
    )


MAX_AGE_MS = 35 * 86_400_000
"""A report whose interval starts longer ago than this, on the operator's clock, is
refused: an agent keeps unsent reports a day (gap markers, which bill nothing, longer)."""
MAX_AHEAD_MS = 120_000
"""A report whose interval starts further ahead than this is refused: a clock that far
off (or a node choosing its window) would bill usage into a window that has not begun."""


def refuse_out_of_time(batches: Sequence[Batch], now_ms: int) -> None:
    """Refuse, in place, reports whose interval starts outside
    [now - ``MAX_AGE_MS``, now + ``MAX_AHEAD_MS``]. A gap marker (no usage, a loss) is
    exempt: it bills nothing, and only moves its agent on."""
    for batch in batches:
        kept: list[UsageReport] = []
        for report in batch.reports:
            start = report.interval_start_ms
            marker = report.lost_reason is not None and not report.series and not report.gpus
            if marker or now_ms - MAX_AGE_MS <= start <= now_ms + MAX_AHEAD_MS:
                kept.append(report)
                continue
            reason = (
                f"intervalStartMs {start} is outside [now - {MAX_AGE_MS // 86_400_000} d, "
                f"now + {MAX_AHEAD_MS // 1000} s] on the operator's clock (now: {now_ms})"
            )
            batch.refused.append(refusal(report.to_wire(), reason))
        batch.reports = kept


def limit_agents_per_node(
    batches: Sequence[Batch], known: Callable[[UsageReport], bool] = lambda _: False
) -> None:
    """Refuse, in place, the reports of each node's agent ids beyond
    ``MAX_AGENTS_PER_NODE`` in this flush: the ids the ledger already has progress for
    (``known``) first, then the others in the order they came."""
    seen: dict[str, set[str]] = {}
    for batch in batches:
        for report in batch.reports:
            ids = seen.setdefault(batch.node, set())
            if known(report) and len(ids) < MAX_AGENTS_PER_NODE:
                ids.add(report.agent_id)
    for batch in batches:
        ids = seen.setdefault(batch.node, set())
        kept: list[UsageReport] = []
        for report in batch.reports:
            if report.agent_id in ids or len(ids) < MAX_AGENTS_PER_NODE:
                ids.add(report.agent_id)
                kept.append(report)
                continue
            reason = (
                f"node {batch.node} reported under more than {MAX_AGENTS_PER_NODE} agent ids "
                "in one flush"
            )
            batch.refused.append(refusal(report.to_wire(), reason))
        batch.reports = kept


MAX_FILED_PER_NODE = 8
"""Refused reports one node may file in one flush; the rest wait for the next flushes."""

Filing = list[tuple[Batch, RefusedReport, UsageReport]]


def next_in_line(
    batches: Sequence[Batch], applied_through: Mapping[str, int], now_ms: int
) -> Filing:
    """The refused reports worth filing now, with their gap markers: only those the flush
    will move their agent past (every sequence between the agent's progress and theirs is
    in this flush), at most ``MAX_FILED_PER_NODE`` per node. A report far ahead of its
    agent's progress would only fill the dead-letter store: it waits."""
    present: dict[str, set[int]] = {}
    candidates: list[tuple[Batch, RefusedReport, UsageReport]] = []
    for batch in batches:
        for report in batch.reports:
            present.setdefault(flush.progress_key(report), set()).add(report.sequence)
        for refused in batch.refused:
            if refused.agent_id is None or refused.sequence is None:
                continue  # nothing to move past: answered only
            marker = gap_marker(batch.node, refused, now_ms)
            present.setdefault(flush.progress_key(marker), set()).add(refused.sequence)
            candidates.append((batch, refused, marker))
    filing: Filing = []
    per_node: dict[str, int] = {}
    for batch, refused, marker in sorted(candidates, key=lambda c: c[2].sequence):
        through = flush.applied(applied_through, marker)
        run = present[flush.progress_key(marker)]
        if not through < marker.sequence or not all(
            s in run for s in range(through + 1, marker.sequence)
        ):
            continue  # applied already (a resend), or not next in line
        if per_node.get(batch.node, 0) >= MAX_FILED_PER_NODE:
            continue
        per_node[batch.node] = per_node.get(batch.node, 0) + 1
        filing.append((batch, refused, marker))
    return filing


def poisoned(
    reports: Sequence[UsageReport], plan: Callable[[Sequence[UsageReport]], object]
) -> dict[int, str]:
    """The reports (by index) whose planning raises, with what it raised; called once a
    flush's plan raised. Each agent's reports are planned in sequence order, each after its
    agent's earlier sound ones (as ``flush.select`` takes them); gap markers are sound (they
    carry no usage). Planning with no report at all must succeed, or the fault is not any
    report's and is raised."""
    plan([])
    found: dict[int, str] = {}
    sound: dict[str, list[UsageReport]] = {}
    for index in sorted(range(len(reports)), key=lambda i: reports[i].sequence):
        report = reports[index]
        before = sound.setdefault(flush.progress_key(report), [])
        if report.lost_reason is None:
            try:
                plan([*before, report])
            except Exception as error:  # anything a report makes planning raise
                found[index] = f"applying the report failed: {type(error).__name__}: {error}"
                found[index] = found[index][:1024]
                continue
        before.append(report)
    return found
