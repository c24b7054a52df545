"""Invoices from BillingRecords: ``payper bill``.

One line per record (deployment x window x GPU product): active, billed, provisioned and
idle GPU time and the amount. Totals per currency, the same work priced at per-ms,
per-second and per-minute granularity (each record's rounded counters times its own
price), and the saving against reserved GPUs for the same provisioned time. Everything
is recomputed from the records' integer milliseconds and decimal prices with the same
rounding rule the ledger uses, so an invoice can be checked by hand.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from payper.api.billing_record import GRANULARITY_MS, BillingRecord
from payper.billing.pricing import amount, money, reserved_amount
from payper.clock import parse_iso, seconds


def signed(value: Decimal) -> str:
    return money(value) if value >= 0 else "-" + money(-value)


@dataclass
class Line:
    namespace: str
    deployment: str
    window_start: str
    gpu_product: str
    state: str
    plan: str
    granularity: str
    currency: str
    active_ms: int
    billed_ms: int
    provisioned_ms: int
    idle_ms: int
    amount: Decimal
    reserved: Decimal
    at_granularity: dict[str, Decimal]


@dataclass
class Totals:
    active_ms: int = 0
    billed_ms: int = 0
    provisioned_ms: int = 0
    idle_ms: int = 0
    amount: Decimal = Decimal(0)
    reserved: Decimal = Decimal(0)
    at_granularity: dict[str, Decimal] = field(
        default_factory=lambda: dict.fromkeys(GRANULARITY_MS, Decimal(0))
    )

    @property
    def saving(self) -> Decimal:
        return self.reserved - self.amount

    @property
    def saving_percent(self) -> Decimal:
        if self.reserved == 0:
            return Decimal(0)
        return (self.saving * 100 / self.reserved).quantize(Decimal("0.1"))


@dataclass
class Invoice:
    lines: list[Line]
    totals: dict[str, Totals]
    """Per currency."""


def selected(
    records: Iterable[BillingRecord], start_ms: int | None, end_ms: int | None
) -> Iterator[BillingRecord]:
    """The records of a period: those whose window starts in [start, end)."""
    for record in records:
        window = int(record.spec.window.start.timestamp() * 1000)
        if start_ms is not None and window < start_ms:
            continue
        if end_ms is not None and window >= end_ms:
            continue
        yield record


def build(
    records: list[BillingRecord], start_ms: int | None = None, end_ms: int | None = None
) -> Invoice:
    lines = []
    for record in selected(records, start_ms, end_ms):
        spec, status = record.spec, record.status
        lines.append(
            Line(
                namespace=spec.account,  # a record moved out of a deleted namespace keeps it
                deployment=spec.inference_deployment or "",
                window_start=spec.window.start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                gpu_product=spec.gpu_product,
                state=status.state,
                plan=spec.plan,
                granularity=spec.granularity,
                currency=spec.currency,
                active_ms=status.active_ms,
                billed_ms=status.billed_ms,
                provisioned_ms=status.provisioned_ms,
                idle_ms=status.idle_ms,
                amount=amount(status.billed_ms, spec.price_per_gpu_second),
                reserved=reserved_amount(status.provisioned_ms, spec.reserved_price_per_gpu_hour),
                at_granularity={
                    g: amount(status.rounded_ms.at(g), spec.price_per_gpu_second)
                    for g in GRANULARITY_MS
                },
            )
        )
    lines.sort(key=lambda ln: (ln.namespace, ln.deployment, ln.window_start, ln.gpu_product))
    totals: dict[str, Totals] = defaultdict(Totals)
    for line in lines:
        total = totals[line.currency]
        total.active_ms += line.active_ms
        total.billed_ms += line.billed_ms
        total.provisioned_ms += line.provisioned_ms
        total.idle_ms += line.idle_ms
        total.amount += line.amount
        total.reserved += line.reserved
        for g in GRANULARITY_MS:
            total.at_granularity[g] += line.at_granularity[g]
    return Invoice(lines, dict(totals))


def _gpu_seconds(figures: Line | Totals) -> dict[str, str]:
    return {
        "activeGpuSeconds": seconds(figures.active_ms),
        "billedGpuSeconds": seconds(figures.billed_ms),
        "provisionedGpuSeconds": seconds(figures.provisioned_ms),
        "idleGpuSeconds": seconds(figures.idle_ms),
    }


def as_json(invoice: Invoice) -> str:
    def line(ln: Line) -> dict[str, Any]:
        return {
            "namespace": ln.namespace,
            "inferenceDeployment": ln.deployment,
            "windowStart": ln.window_start,
            "gpuProduct": ln.gpu_product,
            "state": ln.state,
            "plan": ln.plan,
            "granularity": ln.granularity,
            "currency": ln.currency,
            **_gpu_seconds(ln),
            "amount": money(ln.amount),
            "reservedEquivalentAmount": money(ln.reserved),
            "amountAtGranularity": {g: money(ln.at_granularity[g]) for g in GRANULARITY_MS},
        }

    totals = {
        currency: {
            **_gpu_seconds(t),
            "amount": money(t.amount),
            "amountAtGranularity": {g: money(t.at_granularity[g]) for g in GRANULARITY_MS},
            "reservedEquivalentAmount": money(t.reserved),
            "savingVsReserved": signed(t.saving),
            "savingPercent": str(t.saving_percent),
        }
        for currency, t in sorted(invoice.totals.items())
    }
    return json.dumps({"lines": [line(ln) for ln in invoice.lines], "totals": totals}, indent=2)


CSV_COLUMNS = [
    "namespace",
    "inference_deployment",
    "window_start",
    "gpu_product",
    "state",
    "plan",
    "granularity",
    "currency",
    "active_gpu_s",
    "billed_gpu_s",
    "provisioned_gpu_s",
    "idle_gpu_s",
    "amount",
    "amount_1ms",
    "amount_1s",
    "amount_1m",
    "reserved_equivalent",
]


def _csv_figures(figures: Line | Totals) -> list[str]:
    """The columns from ``active_gpu_s`` on, the same for a line and a total."""
    return [
        *_gpu_seconds(figures).values(),
        money(figures.amount),
        *(money(figures.at_granularity[g]) for g in GRANULARITY_MS),
        money(figures.reserved),
    ]


def as_csv(invoice: Invoice) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for ln in invoice.lines:
        writer.writerow(
            [
                ln.namespace,
                ln.deployment,
                ln.window_start,
                ln.gpu_product,
                ln.state,
                ln.plan,
                ln.granularity,
                ln.currency,
                *_csv_figures(ln),
            ]
        )
    for currency, t in sorted(invoice.totals.items()):
        writer.writerow(
            [
                "TOTAL",
                "",
                "",
                "",
                "",
                "",
                "",
                currency,
                *_csv_figures(t),
            ]
        )
    return out.getvalue()


def as_table(invoice: Invoice) -> str:
    header = [
        "NAMESPACE",
        "DEPLOYMENT",
        "WINDOW START",
        "GPU",
        "STATE",
        "ACTIVE GPU-s",
        "BILLED GPU-s",
        "PROVISIONED GPU-s",
        "IDLE GPU-s",
        "AMOUNT",
    ]
    rows = [
        [
            ln.namespace,
            ln.deployment,
            ln.window_start,
            ln.gpu_product,
            ln.state,
            seconds(ln.active_ms),
            seconds(ln.billed_ms),
            seconds(ln.provisioned_ms),
            seconds(ln.idle_ms),
            f"{money(ln.amount)} {ln.currency}",
        ]
        for ln in invoice.lines
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    if not rows:
        out.append("(no billing records in this range)")
    for currency, t in sorted(invoice.totals.items()):
        out += [
            "",
            f"TOTAL ({currency})",
            f"  active GPU time:       {seconds(t.active_ms)} s (billed {seconds(t.billed_ms)} s)",
            f"  provisioned GPU time:  {seconds(t.provisioned_ms)} s "
            f"(idle, not billed: {seconds(t.idle_ms)} s)",
            f"  amount due:            {money(t.amount)} {currency}",
            "  the same work billed per millisecond / second / minute:",
            *(f"    {g:>3}: {money(t.at_granularity[g])} {currency}" for g in GRANULARITY_MS),
            f"  reserved GPUs for the same provisioned time: {money(t.reserved)} {currency}",
            f"  saving vs reserved:    {signed(t.saving)} {currency} ({t.saving_percent} %)",
        ]
    return "\n".join(out) + "\n"


def parse_time(value: str) -> int:
    """An ISO date or date-time (UTC when no offset) in epoch milliseconds."""
    text = value.strip()
    if len(text) == 10:
        text += "T00:00:00Z"
    return parse_iso(text if ("Z" in text or "+" in text[10:]) else text + "Z")
