"""``payper reconcile``: where every GPU-second went, per node and GPU, over a time range.

Built from the per-GPU reconciliation objects (one per node and window) and the
BillingRecords of the same windows: per node and GPU the wall-clock time and its parts
(attributed to pods, unattributed, unmetered, idle; excess when the driver's percentages
overlapped), whether each row adds up, per node how much of the attributed time is in
BillingRecords, and whether the records hold exactly that. All in integer microseconds
(records keep ``activeUs`` besides their rounded milliseconds), so "adds up" is an
equality, not a tolerance. A window is in the range when it starts in [from, to).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from payper.api.billing_record import BillingRecord
from payper.api.reconciliation import NodeWindowReconciliation
from payper.api.usage import GpuTime, adds_up
from payper.billing.reconciliation import add_times


def in_range(window_start_ms: int, start_ms: int | None, end_ms: int | None) -> bool:
    return (start_ms is None or window_start_ms >= start_ms) and (
        end_ms is None or window_start_ms < end_ms
    )


def micros(us: int) -> str:
    """Microseconds as exact decimal seconds."""
    return f"{us // 1_000_000}.{us % 1_000_000:06d}"


@dataclass
class NodeSummary:
    rows: dict[str, GpuTime] = field(default_factory=dict)
    attributed_in_records_us: int = 0
    unreconciled_in_records_us: int = 0
    windows: int = 0

    @property
    def attributed_us(self) -> int:
        return sum(r.attributed_us for r in self.rows.values())


@dataclass
class Reconciliation:
    nodes: dict[str, NodeSummary]
    records_active_us: int | None
    """What the BillingRecords of these windows hold (None: not comparable, one node)."""

    @property
    def in_records_us(self) -> int:
        return sum(
            n.attributed_in_records_us + n.unreconciled_in_records_us for n in self.nodes.values()
        )

    @property
    def rows_add_up(self) -> bool:
        return all(adds_up(r) for n in self.nodes.values() for r in n.rows.values())

    @property
    def records_match(self) -> bool | None:
        if self.records_active_us is None:
            return None
        return self.records_active_us == self.in_records_us

    @property
    def ok(self) -> bool:
        return self.rows_add_up and self.records_match is not False

    def total(self) -> GpuTime | None:
        rows = [r for n in self.nodes.values() for r in n.rows.values()]
        if not rows:
            return None
        total = rows[0].model_copy(update={"gpu": "total"})
        for row in rows[1:]:
            total = add_times(total, row, "total")
        return total


def build(
    objects: Iterable[NodeWindowReconciliation],
    records: Iterable[BillingRecord] | None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    node: str | None = None,
) -> Reconciliation:
    nodes: dict[str, NodeSummary] = {}
    for item in objects:
        window = int(item.window_start.timestamp() * 1000)
        if not in_range(window, start_ms, end_ms) or (node is not None and item.node != node):
            continue
        summary = nodes.setdefault(item.node, NodeSummary())
        summary.windows += 1
        summary.attributed_in_records_us += item.attributed_in_records_us
        summary.unreconciled_in_records_us += item.unreconciled_in_records_us
        for row in item.gpus:
            known = summary.rows.get(row.gpu)
            summary.rows[row.gpu] = row if known is None else add_times(known, row)
    records_us = None
    if records is not None and node is None:
        records_us = sum(
            r.status.active_us
            for r in records
            if in_range(int(r.spec.window.start.timestamp() * 1000), start_ms, end_ms)
        )
    return Reconciliation(dict(sorted(nodes.items())), records_us)


COLUMNS = ("wall", "attributed", "unattributed", "unmetered", "idle", "excess")


def _cells(row: GpuTime) -> list[str]:
    return [micros(getattr(row, f"{c}_us")) for c in COLUMNS] + ["yes" if adds_up(row) else "NO"]


def as_table(result: Reconciliation) -> str:
    header = ["NODE", "GPU", "PRODUCT", *(f"{c.upper()}_S" for c in COLUMNS), "ADDS_UP"]
    lines = [header]
    for name, summary in result.nodes.items():
        for row in summary.rows.values():
            lines.append([name, row.gpu, row.gpu_product, *_cells(row)])
    total = result.total()
    if total is not None:
        lines.append(["TOTAL", "", "", *_cells(total)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    out.append("")
    out.append("wall = attributed + unattributed + unmetered + idle (- excess), per row")
    for name, summary in result.nodes.items():
        attributed = summary.attributed_us
        billed = summary.attributed_in_records_us
        line = (
            f"{name}: attributed {micros(attributed)} s, in BillingRecords {micros(billed)} s, "
            f"not billed {micros(max(0, attributed - billed))} s"
        )
        if summary.unreconciled_in_records_us:
            line += (
                f"; {micros(summary.unreconciled_in_records_us)} s in records from reports "
                "without per-GPU times"
            )
        out.append(line)
    if result.records_active_us is None:
        out.append("BillingRecords: not per node; compare them without --node")
    else:
        verdict = (
            "equal"
            if result.records_match
            else f"DIFFER by {micros(abs(result.records_active_us - result.in_records_us))} s"
        )
        out.append(
            f"BillingRecords of these windows: active {micros(result.records_active_us)} s; "
            f"applied to records per the reconciliation {micros(result.in_records_us)} s: "
            f"{verdict}"
        )
    out.append("adds up: " + ("yes" if result.ok else "NO"))
    return "\n".join(out) + "\n"


def as_json(result: Reconciliation) -> str:
    def row_json(row: GpuTime) -> dict[str, object]:
        return {**row.model_dump(mode="json", by_alias=True), "addsUp": adds_up(row)}

    total = result.total()
    document = {
        "nodes": {
            name: {
                "gpus": [row_json(r) for r in summary.rows.values()],
                "windows": summary.windows,
                "attributedUs": summary.attributed_us,
                "attributedInRecordsUs": summary.attributed_in_records_us,
                "unreconciledInRecordsUs": summary.unreconciled_in_records_us,
            }
            for name, summary in result.nodes.items()
        },
        "total": row_json(total) if total is not None else None,
        "inRecordsUs": result.in_records_us,
        "recordsActiveUs": result.records_active_us,
        "recordsMatch": result.records_match,
        "addsUp": result.ok,
    }
    return json.dumps(document, indent=2) + "\n"
