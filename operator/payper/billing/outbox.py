"""The outbox: per sink, what of each BillingRecord has been sealed, sent and acknowledged.

Usage leaves the cluster as deltas of a record's cumulative totals. A delta is fixed
("sealed") on the record *before* it is sent, under a number that makes its event ids:
``<record identity>-<n>`` for the record's own window, ``<identity>-<n>-<window>`` for a
correction of an earlier window (late usage the record holds as an adjustment). A crash
between sending and recording the acknowledgement resends exactly the same deltas under
the same ids, and a sink that deduplicates by id counts them once. What a delta holds is
decided by the record's state alone, never by when an exporter happened to read it: so
a delta cannot be re-cut (and re-counted, or swallowed by a sink's deduplication) by a
retry that sees more usage.

Per sink the record carries one annotation, ``export.payper.dev/<sink>``:

- ``n``: how many deltas were sealed for this sink;
- ``sent``: the totals the sink has acknowledged (cumulative, per window part);
- ``pending``: the totals sealed as delta ``n`` (its content is ``pending - sent``), or
  absent when nothing is in flight;
- ``mac``: an HMAC of all that and the record's identity, keyed by the ledger's sealing
  key. The annotation sits in the tenant's namespace; a tenant who could edit it to say
  "sent" would never be billed. One that does not verify is not trusted (``decode``).

So a record holds at most one delta in flight per sink, however many flushes changed it:
the next is sealed when the sink acknowledged the last, and holds all usage since.

Totals are split by window part: ``OWN`` (the record's own window) and one part per
corrected window. The own part is the record's totals less its adjustments, so that all
parts of all deltas add up to the record's totals exactly, to the millisecond and the
cent. (A rounding step can make an own-window delta -1 ms or -0.01 where an adjustment
took the unit; the sum stays exact.)

Pure: no I/O. The exporter (``payper.billing.exporter``) reads and writes the annotation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from payper.api.billing_record import FINAL, BillingRecordStatus
from payper.billing.records import EXPORTED, STATE_LABEL, parse_window_label, window_label
from payper.clock import parse_iso

ANNOTATION_PREFIX = "export.payper.dev/"
IDENTITY_ANNOTATION = "payper.dev/record-identity"
"""A moved copy's identity is its original's UID: its deltas keep their ids."""
FINALIZER = "payper.dev/export"
"""On every record while exporting: it stays until every sink has it."""
OWN = "own"
"""The part of a record's totals that is its own window's (the rest are corrections)."""


@dataclass(frozen=True)
class Part:
    active_ms: int = 0
    billed_ms: int = 0
    amount: Decimal = Decimal(0)

    def __sub__(self, other: Part) -> Part:
        return Part(
            self.active_ms - other.active_ms,
            self.billed_ms - other.billed_ms,
            self.amount - other.amount,
        )

    def __add__(self, other: Part) -> Part:
        return Part(
            self.active_ms + other.active_ms,
            self.billed_ms + other.billed_ms,
            self.amount + other.amount,
        )

    def empty(self) -> bool:
        return self == Part()

    def to_wire(self) -> list[Any]:
        return [self.active_ms, self.billed_ms, str(self.amount)]


Totals = Mapping[str, Part]
"""Per window part (``OWN``, or a corrected window's start, as ``records.window_label``)."""


@dataclass(frozen=True)
class SinkState:
    sealed: int = 0
    sent: Totals = field(default_factory=dict)
    pending: Totals | None = None


@dataclass(frozen=True)
class Delta:
    """One part of one sealed delta: an event at a sink."""

    id: str
    part: str
    """``OWN``, or the start of the window it corrects (``records.window_label``)."""
    usage: Part


def totals(status: BillingRecordStatus) -> dict[str, Part]:
    """A record's totals by window part; all-zero parts are left out."""
    parts: dict[str, Part] = {}
    own = Part(status.active_ms, status.billed_ms, Decimal(status.amount))
    for adjustment in status.adjustments:
        start = int(adjustment.original_window_start.timestamp() * 1000)
        part = Part(adjustment.active_ms, adjustment.billed_ms, Decimal(adjustment.amount))
        parts[window_label(start)] = part
        own = own - part
    parts[OWN] = own
    return {name: part for name, part in parts.items() if not part.empty()}


def _same(a: Totals, b: Totals) -> bool:
    return {k: v for k, v in a.items() if not v.empty()} == {
        k: v for k, v in b.items() if not v.empty()
    }


def step(state: SinkState, current: Totals, acknowledged: int | None) -> SinkState:
    """The state after the sink acknowledged delta ``acknowledged`` (None: nothing new),
    with what the record gained since sealed as the next delta when none is in flight."""
    if acknowledged is not None and state.pending is not None and acknowledged == state.sealed:
        state = SinkState(state.sealed, state.pending, None)
    if state.pending is None and not _same(current, state.sent):
        state = SinkState(state.sealed + 1, state.sent, dict(current))
    return state


def done(state: SinkState, current: Totals) -> bool:
    """Whether the sink has acknowledged everything the record holds."""
    return state.pending is None and _same(current, state.sent)


def deltas(identity: str, state: SinkState) -> list[Delta]:
    """The events of the delta in flight (none when nothing is), own window first."""
    if state.pending is None:
        return []
    names = sorted(set(state.pending) | set(state.sent), key=lambda n: (n != OWN, n))
    found = []
    for name in names:
        usage = state.pending.get(name, Part()) - state.sent.get(name, Part())
        if usage.empty():
            continue
        suffix = "" if name == OWN else f"-{name}"
        found.append(Delta(f"{identity}-{state.sealed}{suffix}", name, usage))
    return found


def identity(metadata: Mapping[str, Any]) -> str:
    """What a record's event ids are made of: its UID, or its original's when moved."""
    return str((metadata.get("annotations") or {}).get(IDENTITY_ANNOTATION) or metadata["uid"])


# -- the annotation ------------------------------------------------------------------------
def annotation(sink: str) -> str:
    return f"{ANNOTATION_PREFIX}{sink}"


def _canonical(record_identity: str, sink: str, state: SinkState) -> bytes:
    body = [
        record_identity,
        sink,
        state.sealed,
        _totals_wire(state.sent),
        None if state.pending is None else _totals_wire(state.pending),
    ]
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _totals_wire(parts: Totals) -> dict[str, list[Any]]:
    return {name: part.to_wire() for name, part in sorted(parts.items()) if not part.empty()}


def encode(key: bytes, record_identity: str, sink: str, state: SinkState) -> str:
    mac = hmac.new(key, _canonical(record_identity, sink, state), hashlib.sha256).hexdigest()
    wire: dict[str, Any] = {"n": state.sealed, "sent": _totals_wire(state.sent), "mac": mac}
    if state.pending is not None:
        wire["pending"] = _totals_wire(state.pending)
    return json.dumps(wire, sort_keys=True, separators=(",", ":"))


class TamperedError(ValueError):
    """An export annotation that is malformed or whose MAC does not verify."""


def decode(key: bytes, record_identity: str, sink: str, text: str | None) -> SinkState:
    """The sink's state from its annotation (none yet: nothing sent). Raises ``TamperedError``
    for one this operator did not write: the record is then held, never guessed at."""
    if text is None:
        return SinkState()
    try:
        wire = json.loads(text)
        state = _state_of(wire)
        mac = str(wire["mac"])
    except (ValueError, KeyError, TypeError, ArithmeticError, AttributeError) as error:
        raise TamperedError(f"{annotation(sink)} is not an export state: {error!r}") from error
    expected = hmac.new(key, _canonical(record_identity, sink, state), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, expected):
        raise TamperedError(f"{annotation(sink)} was not written by payper-operator (bad MAC)")
    return state


def _state_of(wire: Mapping[str, Any]) -> SinkState:
    return SinkState(
        int(wire["n"]),
        _totals_of(wire["sent"]),
        None if wire.get("pending") is None else _totals_of(wire["pending"]),
    )


def _totals_of(wire: Mapping[str, Any]) -> dict[str, Part]:
    parts = {}
    for name, (active, billed, amount) in wire.items():
        if name != OWN:
            parse_window_label(name)  # a window's start, or ValueError
        parts[str(name)] = Part(int(active), int(billed), Decimal(str(amount)))
    return parts


def peek(text: str | None) -> SinkState | None:
    """A state as the annotation says, unverified (for ``payper export status``, which
    has no key); None when it is not one."""
    if text is None:
        return SinkState()
    try:
        return _state_of(json.loads(text))
    except (ValueError, KeyError, TypeError, ArithmeticError, AttributeError):
        return None


@dataclass(frozen=True)
class Backlog:
    """What one sink is owed, as the records say (``payper export status``)."""

    sink: str
    owed_records: int
    oldest_window_start_ms: int | None
    unreadable: int
    """Records whose annotation for this sink is not an export state."""


def backlogs(records: Iterable[Mapping[str, Any]]) -> tuple[list[Backlog], int]:
    """Per sink named on any record, the records it is owed; and how many Final records
    are not yet Exported (kept until they are)."""
    pending = [
        r for r in records if (r["metadata"].get("labels") or {}).get(STATE_LABEL) != EXPORTED
    ]
    sinks = sorted(
        {
            name.removeprefix(ANNOTATION_PREFIX)
            for r in pending
            for name in r["metadata"].get("annotations") or {}
            if name.startswith(ANNOTATION_PREFIX)
        }
    )
    current = [totals(BillingRecordStatus.model_validate(r.get("status") or {})) for r in pending]
    found = []
    for sink in sinks:
        owed, unreadable, oldest = 0, 0, None
        for record, record_totals in zip(pending, current, strict=True):
            text = (record["metadata"].get("annotations") or {}).get(annotation(sink))
            state = peek(text)
            if state is None:
                unreadable += 1
            elif not done(state, record_totals):
                owed += 1
                start = parse_iso(record["spec"]["window"]["start"])
                oldest = start if oldest is None else min(oldest, start)
        found.append(Backlog(sink, owed, oldest, unreadable))
    awaiting = sum(1 for r in pending if (r.get("status") or {}).get("state") == FINAL)
    return found, awaiting
