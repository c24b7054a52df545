"""The exporter's parts that need no cluster: the CloudEvents a sink receives, and how
one sink's runner batches, retries and backs off."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat

from payper.billing import outbox, seal
from payper.billing.config import CloudEventsSinkConfig, ExportConfig
from payper.billing.exporter import Exporter
from payper.billing.sink_runner import SinkRunner, Work
from payper.billing.sinks import (
    CORRECTION_TYPE,
    EVENT_TYPE,
    Sent,
    SinkError,
    UsageEvent,
    cloudevents_batch,
)
from payper.clock import iso
from payper_dev.testing.billing import record_spec

HOUR = 3_600_000
START = 1_795_000_000_000 // HOUR * HOUR


def event(id_: str, corrects: int | None = None, amount: str = "1.25") -> UsageEvent:
    return UsageEvent(
        id=id_,
        account="team-a",
        deployment="llama",
        gpu_product="nvidia-h100-80gb-hbm3",
        plan="default",
        currency="USD",
        granularity="1s",
        window_start_ms=START,
        window_end_ms=START + HOUR,
        corrects_window_start_ms=corrects,
        active_ms=1234,
        billed_ms=2000,
        amount=Decimal(amount),
    )


def test_a_batch_is_cloudevents_the_sdk_reads_back_with_deterministic_attributes() -> None:
    body = cloudevents_batch([event("u-1"), event("u-1-x", corrects=START - HOUR)], "//payper/eu")
    assert body == cloudevents_batch(
        [event("u-1"), event("u-1-x", corrects=START - HOUR)], "//payper/eu"
    ), "a resend is byte for byte the same"
    parsed = [JSONFormat().read(None, json.dumps(item)) for item in json.loads(body)]
    own, correction = parsed
    assert (own.get_id(), own.get_source(), own.get_subject(), own.get_type()) == (
        "u-1",
        "//payper/eu",
        "team-a",
        EVENT_TYPE,
    )
    assert own.get_time() is not None and int(own.get_time().timestamp() * 1000) == START
    assert own.get_data() == {
        "account": "team-a",
        "inferenceDeployment": "llama",
        "gpuProduct": "nvidia-h100-80gb-hbm3",
        "plan": "default",
        "granularity": "1s",
        "windowStart": iso(START),
        "windowEnd": iso(START + HOUR),
        "activeMs": 1234,
        "billedMs": 2000,
        "amount": "1.25",
        "currency": "USD",
    }
    # A correction carries the original window's time and names it.
    assert correction.get_type() == CORRECTION_TYPE
    assert int(correction.get_time().timestamp() * 1000) == START - HOUR
    assert correction.get_data()["correctsWindowStart"] == iso(START - HOUR)


class FlakySink:
    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.batches: list[list[str]] = []

    async def send(self, events: list[UsageEvent]) -> Sent:
        if self.fail:
            self.fail -= 1
            raise SinkError("down")
        self.batches.append([e.id for e in events])
        return Sent(taken={e.id for e in events})


def runner(sink: FlakySink, batch_size: int = 3, **export: float) -> SinkRunner:
    config = CloudEventsSinkConfig(
        name="cloud", type="cloudevents", url="http://127.0.0.1:1/", batch_size=batch_size
    )
    return SinkRunner(config, ExportConfig(sinks=[config], **export), sink)  # type: ignore[arg-type]


async def test_batches_are_bounded_and_acknowledged_per_record() -> None:
    sink = FlakySink(fail=0)
    run = runner(sink, batch_size=3)
    run.offer({("ns", f"r{i}"): Work(1, [event(f"r{i}-1"), event(f"r{i}-1-x")]) for i in range(3)})
    while run.work:
        assert await run.send_once()
    # Two events per record, three per batch: never a record split across batches,
    # never a batch above its bound (except one record on its own).
    assert sink.batches == [["r0-1", "r0-1-x"], ["r1-1", "r1-1-x"], ["r2-1", "r2-1-x"]]
    assert run.acknowledged == {("ns", "r0"): 1, ("ns", "r1"): 1, ("ns", "r2"): 1}
    # Acknowledged but not yet on the record: offered again by a step, not sent again.
    run.offer({("ns", "r0"): Work(1, [event("r0-1")]), ("ns", "r9"): Work(4, [event("r9-4")])})
    assert list(run.work) == [("ns", "r9")]


async def test_a_sink_that_is_down_is_retried_with_a_bounded_jittered_backoff() -> None:
    sink = FlakySink(fail=40)
    run = runner(sink, min_backoff_seconds=1.0, max_backoff_seconds=60.0)
    run.offer({("ns", "r"): Work(1, [event("r-1")])})
    waits = []
    for _ in range(40):
        assert not await run.send_once()
        waits.append(run.backoff())
    assert await run.send_once()
    assert sink.batches == [["r-1"]] and run.failures == 0 and not run.work
    assert 0.5 <= waits[0] <= 1.0
    assert all(30.0 <= w <= 60.0 for w in waits[10:]), "capped at maxBackoffSeconds"
    assert len(set(waits[10:])) > 1, "jittered, so that operators do not retry in step"


STRIPE: dict[str, Any] = {
    "name": "stripe",
    "type": "stripe",
    "apiKeyFile": "/var/run/secrets/stripe/key",
    "customers": {"team-a": "cus_A1"},
    "meters": {"eventNames": {"default": "gpu_seconds"}},
}


@pytest.mark.parametrize(
    ("sinks", "message"),
    [
        ([{"name": "a", "type": "cloudevents", "url": "http://x/"}] * 2, "a repeated"),
        ([{"name": "a", "type": "kafka", "url": "http://x/"}], "(?s)sinks.0.*'kafka'"),
        ([{"name": "a", "type": "cloudevents", "url": "ftp://x/"}], "sinks.0.cloudevents.url"),
        ([{"name": "A b", "type": "cloudevents", "url": "http://x/"}], "sinks.0.cloudevents.name"),
        # Stripe: customers are Stripe customer ids, a sink needs its meters and a key.
        (
            [{**STRIPE, "customers": {"team-a": "alice@example.com"}}],
            "sinks.0.stripe.customers.team-a",
        ),
        ([{**STRIPE, "customers": {"Team_A": "cus_1"}}], "sinks.0.stripe.customers.Team_A"),
        ([{**STRIPE, "meters": {"eventNames": {}}}], "sinks.0.stripe.meters.eventNames"),
        ([{**STRIPE, "meters": {"by": "pod", "eventNames": {"a": "b"}}}], "stripe.meters.by"),
        ([{**STRIPE, "meters": {"eventNames": {"a": "no spaces"}}}], "eventNames.a"),
        ([{k: v for k, v in STRIPE.items() if k != "apiKeyFile"}], "stripe.apiKeyFile"),
    ],
)
def test_a_bad_sink_configuration_is_refused_by_name(sinks, message) -> None:
    with pytest.raises(ValueError, match=message):
        ExportConfig.model_validate({"sinks": sinks})


KEY = b"k" * 32
SPEC = record_spec("team-a", "llama", "2026-11-28T01:00:00Z", "2026-11-28T02:00:00Z")


def record(annotation: str | None, sealed: bool = True, version: str = "1") -> dict[str, Any]:
    annotations = {seal.ANNOTATION: seal.seal(KEY, "team-a", "r", SPEC) if sealed else "0"}
    if annotation is not None:
        annotations[outbox.annotation("meter")] = annotation
    return {
        "metadata": {
            "name": "r",
            "namespace": "team-a",
            "uid": "uid-r",
            "resourceVersion": version,
            "annotations": annotations,
        },
        "spec": SPEC,
        "status": {"state": "Open", "activeMs": 1000, "billedMs": 1000, "amount": "0.001200"},
    }


def exporter() -> Exporter:
    sink = CloudEventsSinkConfig(name="meter", type="cloudevents", url="http://127.0.0.1:1/")
    return Exporter(None, ExportConfig(sinks=[sink]), KEY, lambda *_: None, lambda: 0.0)  # type: ignore[arg-type]


REAL = outbox.SinkState(2, {}, {outbox.OWN: outbox.Part(1000, 1000, Decimal("0.0012"))})
FORGED = json.dumps({"n": 9, "sent": {"own": [10**9, 10**9, "1000000"]}, "mac": "0" * 64})


def test_a_forged_export_state_is_rewritten_by_the_process_that_knows_the_truth() -> None:
    running = exporter()
    running.observe(record(outbox.encode(KEY, "uid-r", "meter", REAL)))
    running.observe(record(FORGED, version="2"))
    tracked = running.tracked[("team-a", "r")]
    assert (tracked.held, tracked.states["meter"]) == (None, REAL)
    assert tracked.written["meter"] == FORGED, "so the next step writes the truth back"


def test_a_forged_export_state_found_at_start_holds_the_record_for_good() -> None:
    started = exporter()
    started.observe(record(FORGED))
    started.observe(record(FORGED, version="2"))  # the ledger wrote it since: still held
    tracked = started.tracked[("team-a", "r")]
    assert tracked.held is not None and "bad MAC" in tracked.held
    assert started.final_records() == []


def test_a_record_the_ledger_did_not_seal_is_never_exported() -> None:
    fresh = exporter()
    fresh.observe(record(None, sealed=False))
    assert fresh.tracked == {}
