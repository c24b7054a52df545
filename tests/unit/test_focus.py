"""FOCUS rows and the export status, from records (pure: no cluster, no validator; the
integration tier runs focus-validator on real files)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from payper.api.billing_record import BillingRecord
from payper.billing import focus, invoice, outbox
from payper.billing.outbox import OWN, Part, SinkState
from payper.billing.records import EXPORTED, STATE_LABEL
from payper.clock import iso, parse_iso
from payper_dev.testing.billing import record_spec

KEY = b"k" * 32


def body(
    name: str,
    start: str,
    billed: int,
    adjustments: list[tuple[str, int]] = (),  # type: ignore[assignment]
    state: str = "Final",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    end = iso(parse_iso(start) + 3_600_000)
    return {
        "apiVersion": "payper.dev/v1alpha1",
        "kind": "BillingRecord",
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "uid": f"uid-{name}",
            "labels": labels or {},
            "annotations": annotations or {},
        },
        "spec": record_spec("team-a", "chat", start, end, price="0.0013"),
        "status": {
            "state": state,
            "activeMs": billed,
            "billedMs": billed,
            "amount": str(Decimal(billed) * Decimal("0.0013") / 1000),
            "adjustments": [
                {
                    "originalWindowStart": original,
                    "reason": "late",
                    "activeMs": ms,
                    "billedMs": ms,
                    "amount": str(Decimal(ms) * Decimal("0.0013") / 1000),
                }
                for original, ms in adjustments
            ],
        },
    }


RECORDS = [
    BillingRecord.model_validate(body("a", "2026-11-20T10:00:00Z", 1001)),
    BillingRecord.model_validate(
        body("b", "2026-11-20T11:00:00Z", 5003, [("2026-11-20T10:00:00Z", 2001)])
    ),
    BillingRecord.model_validate(body("c", "2026-11-20T12:00:00Z", 7)),
]


def test_rows_cost_what_the_invoice_says_for_every_period() -> None:
    for start, end in [
        (None, None),
        ("2026-11-20T11:00:00Z", None),
        (None, "2026-11-20T12:00:00Z"),
    ]:
        start_ms = None if start is None else parse_iso(start)
        end_ms = None if end is None else parse_iso(end)
        rows = focus.rows(RECORDS, start_ms, end_ms)
        bill = invoice.build(RECORDS, start_ms, end_ms)
        assert focus.billed_totals(rows) == {c: t.amount for c, t in bill.totals.items()}


def test_a_correction_is_its_own_row_in_the_window_it_corrects() -> None:
    rows = [r for r in focus.rows(RECORDS, None, None) if r["x_PayperRecord"] == "team-a/b"]
    assert [
        (r["ChargeClass"], r["ChargePeriodStart"], r["ChargePeriodEnd"], r["PricingQuantity"])
        for r in rows
    ] == [
        ("Correction", "2026-11-20T10:00:00Z", "2026-11-20T11:00:00Z", "2.001"),
        ("", "2026-11-20T11:00:00Z", "2026-11-20T12:00:00Z", "3.002"),
    ]
    assert {r["BillingPeriodStart"] for r in rows} == {"2026-11-01T00:00:00Z"}
    assert {r["BillingPeriodEnd"] for r in rows} == {"2026-12-01T00:00:00Z"}
    text = focus.as_csv(rows)
    assert text.splitlines()[0].split(",") == list(focus.COLUMNS)


def test_december_bills_into_a_period_ending_next_year() -> None:
    record = BillingRecord.model_validate(body("d", "2026-12-31T23:00:00Z", 1000))
    (row,) = focus.rows([record], None, None)
    assert (row["BillingPeriodStart"], row["BillingPeriodEnd"]) == (
        "2026-12-01T00:00:00Z",
        "2027-01-01T00:00:00Z",
    )


def test_export_status_counts_what_each_sink_is_owed() -> None:
    def sealed(name: str, state: SinkState) -> dict[str, str]:
        return {outbox.annotation("meter"): outbox.encode(KEY, f"uid-{name}", "meter", state)}

    owed_part = {OWN: Part(1, 1, Decimal("0.0000013"))}
    records = [
        # acknowledged all it holds
        body("a", "2026-11-20T10:00:00Z", 1, annotations=sealed("a", SinkState(1, owed_part))),
        # a delta in flight
        body(
            "b",
            "2026-11-20T09:00:00Z",
            1,
            annotations=sealed("b", SinkState(1, {}, owed_part)),
        ),
        # nothing sealed yet: owed to every sink named anywhere
        body("c", "2026-11-20T11:00:00Z", 1, state="Open"),
        # not an export state
        body("d", "2026-11-20T11:00:00Z", 1, annotations={outbox.annotation("meter"): "{"}),
        # Exported: done, whatever it says
        body("e", "2026-11-20T08:00:00Z", 1, labels={STATE_LABEL: EXPORTED}),
    ]
    (meter,), awaiting = outbox.backlogs(records)
    assert (meter.sink, meter.owed_records, meter.unreadable) == ("meter", 2, 1)
    assert meter.oldest_window_start_ms == parse_iso("2026-11-20T09:00:00Z")
    assert awaiting == 3  # a, b, d: Final, not Exported
