"""The outbox's pure core: deltas sealed before they are sent add up to the record's
totals exactly, whatever fails and whenever, and an id never names two contents."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payper.api.billing_record import Adjustment, BillingRecordStatus
from payper.billing import outbox
from payper.billing.outbox import OWN, Part, SinkState

KEY = b"k" * 32
LATE = datetime(2026, 11, 28, 1, 0, tzinfo=UTC)


def status(active: int, billed: int, amount: str, late: tuple[int, int, str] | None = None):
    adjustments = []
    if late is not None:
        adjustments = [
            Adjustment(
                original_window_start=LATE,
                reason="late",
                active_ms=late[0],
                billed_ms=late[1],
                amount=late[2],
            )
        ]
    return BillingRecordStatus(
        active_ms=active, billed_ms=billed, amount=amount, adjustments=adjustments
    )


def test_a_records_parts_add_up_to_its_totals_and_name_the_corrected_window() -> None:
    parts = outbox.totals(status(5000, 6000, "0.60", late=(1000, 2000, "0.20")))
    assert parts == {
        OWN: Part(4000, 4000, Decimal("0.40")),
        "20261128T010000Z": Part(1000, 2000, Decimal("0.20")),
    }
    assert sum(parts.values(), Part()) == Part(5000, 6000, Decimal("0.60"))


def test_one_delta_in_flight_holds_everything_since_the_last_acknowledgement() -> None:
    first = outbox.step(SinkState(), {OWN: Part(10, 10, Decimal("1"))}, None)
    assert (first.sealed, first.pending) == (1, {OWN: Part(10, 10, Decimal("1"))})
    # The record grows while delta 1 is unacknowledged: delta 1 does not change.
    grown = {OWN: Part(30, 30, Decimal("3"))}
    assert outbox.step(first, grown, None) == first
    assert outbox.step(first, grown, acknowledged=7) == first  # not its number: ignored
    second = outbox.step(first, grown, acknowledged=1)
    assert second.sealed == 2
    [delta] = outbox.deltas("uid", second)
    assert (delta.id, delta.usage) == ("uid-2", Part(20, 20, Decimal("2")))
    assert not outbox.done(second, grown)
    assert outbox.done(outbox.step(second, grown, acknowledged=2), grown)


def test_a_correction_is_its_own_event_naming_the_original_window() -> None:
    state = outbox.step(SinkState(), outbox.totals(status(3, 3, "3", late=(1, 1, "1"))), None)
    assert [(d.id, d.part) for d in outbox.deltas("uid", state)] == [
        ("uid-1", OWN),
        ("uid-1-20261128T010000Z", "20261128T010000Z"),
    ]


def test_the_annotation_round_trips_and_is_bound_to_its_record_and_sink() -> None:
    state = SinkState(3, {OWN: Part(1, 2, Decimal("0.03"))}, {OWN: Part(5, 6, Decimal("0.07"))})
    text = outbox.encode(KEY, "uid-a", "openmeter", state)
    assert outbox.decode(KEY, "uid-a", "openmeter", text) == state
    assert outbox.decode(KEY, "uid-a", "openmeter", None) == SinkState()
    for identity, sink in (("uid-b", "openmeter"), ("uid-a", "stripe")):
        with pytest.raises(outbox.TamperedError, match="bad MAC"):
            outbox.decode(KEY, identity, sink, text)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # A hostile tenant marks everything sent, so that the usage is never billed.
        (lambda w: {**w, "sent": w["pending"], "pending": None}, "bad MAC"),
        (lambda w: {**w, "n": 1}, "bad MAC"),
        (lambda w: {**w, "mac": "0" * 64}, "bad MAC"),
        (lambda w: {k: v for k, v in w.items() if k != "mac"}, "not an export state"),
        (lambda w: {**w, "sent": {OWN: [1, 2]}}, "not an export state"),
        (lambda w: {**w, "sent": {"tomorrow": [1, 2, "3"]}}, "not an export state"),
        (lambda w: {**w, "sent": {OWN: [1, 2, "three"]}}, "not an export state"),
        (lambda w: "[]", "not an export state"),
    ],
)
def test_an_annotation_payper_did_not_write_is_refused_by_name(edit, message) -> None:
    state = SinkState(2, {OWN: Part(1, 1, Decimal(1))}, {OWN: Part(9, 9, Decimal(9))})
    wire = json.loads(outbox.encode(KEY, "uid", "cloud", state))
    with pytest.raises(outbox.TamperedError, match=message) as raised:
        outbox.decode(KEY, "uid", "cloud", json.dumps(edit(wire)))
    assert "export.payper.dev/cloud" in str(raised.value)


# One record's life: flushes add usage (sometimes late usage for an earlier window), the
# sink takes or refuses each send, the exporter's writes of the annotation sometimes fail,
# and the operator is sometimes killed (everything not in the annotation is lost).
Event = st.one_of(
    st.tuples(st.just("usage"), st.integers(0, 5000), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("send"), st.booleans()),
    st.tuples(st.just("write"), st.booleans()),
    st.just(("crash",)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(Event, max_size=60))
def test_every_ms_and_cent_reaches_a_deduplicating_sink_once_whatever_fails(events) -> None:
    active = billed = late_active = late_billed = 0
    price = Decimal("0.0007")

    def current() -> dict[str, Part]:
        return outbox.totals(
            status(
                active,
                billed,
                str((billed * price).quantize(Decimal("0.01"))),
                late=(
                    late_active,
                    late_billed,
                    str((late_billed * price).quantize(Decimal("0.01"))),
                ),
            )
        )

    stored = None  # the annotation on the record
    state = SinkState()  # the exporter's copy
    acknowledged: int | None = None
    received: dict[str, Part] = {}

    def flush() -> None:
        nonlocal state, acknowledged, stored
        state = outbox.step(state, current(), acknowledged)
        acknowledged = None

    for event in [*events, ("write", True), ("send", True), ("write", True)]:
        if event[0] == "usage":
            _, ms, extra, is_late = event
            if is_late:
                late_active += ms
                late_billed += ms + extra
            else:
                active += ms
                billed += ms + extra
        elif event[0] == "send":
            if event[1]:
                for delta in outbox.deltas("uid", state):
                    # An id is never reused for different content.
                    assert received.setdefault(delta.id, delta.usage) == delta.usage
                acknowledged = state.sealed if state.pending is not None else None
        elif event[0] == "write":
            flush()
            if event[1]:
                stored = outbox.encode(KEY, "uid", "sink", state)
            else:  # the patch failed: the step never happened, its acknowledgement is lost
                state, acknowledged = outbox.decode(KEY, "uid", "sink", stored), None
        else:
            state, acknowledged = outbox.decode(KEY, "uid", "sink", stored), None
    # Drain: the sink up, writes succeeding, until nothing is owed.
    for _ in range(4):
        for delta in outbox.deltas("uid", state):
            assert received.setdefault(delta.id, delta.usage) == delta.usage
        acknowledged = state.sealed if state.pending is not None else None
        flush()
        stored = outbox.encode(KEY, "uid", "sink", state)
    assert outbox.done(state, current())
    assert sum(received.values(), Part()) == sum(current().values(), Part())
