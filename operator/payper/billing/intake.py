"""Intake: the reports of one flush, with every report that cannot be billed refused alone.

Billing must never stop for everyone because of one report. A report is refused when it
is not valid (``payper.api.usage.validate_each``), when its node sends more agent ids in
one flush than an honest node has agents, or when applying it raises. A refused report
whose agent and sequence are known becomes a *gap marker* under its sequence (no series,
the GPU time it claimed and why), so its agent moves past it exactly like past a report
the agent itself dropped: the ledger files its content in the dead-letter store first, and
the rest of the flush goes on. Pure: the ledger does the I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
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
        acked: dict[str, int] = {}
        for report in [*self.reports, *self.markers]:
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


def limit_agents_per_node(batches: Sequence[Batch]) -> None:
    """Refuse, in place, the reports of each node's agent ids beyond
    ``MAX_AGENTS_PER_NODE`` in this flush (the ids seen first are kept)."""
    seen: dict[str, set[str]] = {}
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


def poisoned(
    reports: Sequence[UsageReport], plan: Callable[[Sequence[UsageReport]], object]
) -> dict[int, str]:
    """The reports (by index) whose planning raises, with what it raised; called once a
    flush's plan raised. Each report is planned after its agent's earlier sound ones (it
    is selected only in sequence). Planning with no report at all must succeed, or the
    fault is not any report's and is raised."""
    plan([])
    found: dict[int, str] = {}
    sound: dict[str, list[UsageReport]] = {}
    for index, report in enumerate(reports):
        before = sound.setdefault(flush.progress_key(report), [])
        try:
            plan([*before, report])
        except Exception as error:
            found[index] = f"applying the report failed: {type(error).__name__}: {error}"[:1024]
        else:
            before.append(report)
    return found
