"""The Stripe sink's parts that need no Stripe: the meter event each usage event becomes,
what is refused (and kept) rather than sent, how a runner sets refused records aside,
and how ``payper export stripe --check`` compares meters and prices with the plans.
Requests against Stripe's API definition are the integration tier's (stripe-mock)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from payper.billing.config import ExportConfig, StripeSinkConfig
from payper.billing.pricing import Plan
from payper.billing.sink_runner import SinkRunner, Work
from payper.billing.sinks import Sent, UsageEvent
from payper.billing.stripe_sink import MAX_IDENTIFIER, compare, meter_event, value

HOUR = 3_600_000
NOW_S = 1_795_000_000
START = (NOW_S * 1000 - 5 * HOUR) // HOUR * HOUR
UID = "0b5c3a56-9a4f-4a8e-9f0c-3c2d1e0f9a8b"


def config(**overrides: Any) -> StripeSinkConfig:
    raw: dict[str, Any] = {
        "name": "stripe",
        "type": "stripe",
        "apiKeyFile": "/var/run/secrets/stripe/key",
        "customers": {"team-a": "cus_A1"},
        "meters": {"eventNames": {"default": "gpu_seconds", "minutes": "gpu_minutes"}},
    }
    raw.update(overrides)
    return StripeSinkConfig.model_validate(raw)


def event(
    id_: str = f"{UID}-3",
    account: str = "team-a",
    plan: str = "default",
    granularity: str = "1s",
    billed_ms: int = 2000,
    corrects: int | None = None,
    start: int = START,
) -> UsageEvent:
    return UsageEvent(
        id=id_,
        account=account,
        deployment="llama",
        gpu_product="NVIDIA-H100-80GB-HBM3",
        plan=plan,
        currency="USD",
        granularity=granularity,
        window_start_ms=start,
        window_end_ms=start + HOUR,
        corrects_window_start_ms=corrects,
        active_ms=1234,
        billed_ms=billed_ms,
        amount=Decimal("0.0024"),
    )


def test_a_meter_event_carries_the_billed_time_in_the_plans_unit_for_the_namespaces_customer() -> (
    None
):
    assert meter_event(config(), event(), NOW_S) == {
        "event_name": "gpu_seconds",
        "identifier": f"{UID}-3",
        "timestamp": START // 1000,
        "payload": {"stripe_customer_id": "cus_A1", "value": "2"},
    }
    minutes = meter_event(config(), event(plan="minutes", granularity="1m", billed_ms=180_000), 0)
    assert isinstance(minutes, dict)
    assert (minutes["event_name"], minutes["payload"]["value"]) == ("gpu_minutes", "3")
    assert value(event(granularity="1ms", billed_ms=1234)) == "1234"
    assert value(event(granularity="1s", billed_ms=1500)) == "1.5", "exact, never rounded"


def test_a_correction_is_a_new_event_at_the_original_windows_time_with_an_id_stripe_takes() -> None:
    label = "20261127T100000Z"
    corrects = START - 20 * HOUR
    params = meter_event(config(), event(id_=f"{UID}-7-{label}", corrects=corrects), NOW_S)
    assert isinstance(params, dict)
    assert params["timestamp"] == corrects // 1000
    assert params["identifier"] == f"{UID}-7-{label}"
    # The longest id a record makes (a UID, a count of deltas, a window label) fits.
    longest = f"{UID}-{2**63}-{label}"
    assert len(longest) <= MAX_IDENTIFIER
    assert isinstance(meter_event(config(), event(id_=longest), NOW_S), dict)


@pytest.mark.parametrize(
    ("changed", "reason"),
    [
        # A hostile tenant's namespace the platform never mapped: reported, not guessed.
        ({"account": "team-evil"}, "namespace 'team-evil' has no Stripe customer"),
        ({"plan": "internal"}, "plan 'internal' has no Stripe meter"),
        ({"start": (NOW_S - 36 * 86_400) * 1000}, "older than Stripe takes"),
        ({"id_": "x" * 101}, "longer than Stripe's 100"),
    ],
)
def test_what_stripe_would_never_take_is_refused_with_the_reason(
    changed: dict[str, Any], reason: str
) -> None:
    refused = meter_event(config(), event(**changed), NOW_S)
    assert isinstance(refused, str) and reason in refused


def test_meters_by_gpu_product_use_the_products_price_table_key() -> None:
    by_product = config(meters={"by": "gpuProduct", "eventNames": {"NVIDIA-H100-80GB-HBM3": "h"}})
    params = meter_event(by_product, event(), NOW_S)
    assert isinstance(params, dict) and params["event_name"] == "h"


class RefusingSink:
    """Refuses the events of one account, takes the rest, fails what it is told to."""

    def __init__(self, refuse: str, fail: set[str] | None = None) -> None:
        self.refuse = refuse
        self.fail = fail or set()
        self.sent: list[str] = []

    async def send(self, events: list[UsageEvent]) -> Sent:
        result = Sent()
        for e in events:
            self.sent.append(e.id)
            if e.account == self.refuse:
                result.refused[e.id] = "no customer"
            elif e.id in self.fail:
                self.fail.discard(e.id)
                result.failed[e.id] = "503"
            else:
                result.taken.add(e.id)
        return result

    async def close(self) -> None:
        pass


def runner(sink: RefusingSink, clock: list[float]) -> SinkRunner:
    cfg = config()
    export = ExportConfig(sinks=[cfg], max_backoff_seconds=300)
    return SinkRunner(cfg, export, sink, clock=lambda: clock[0])


async def test_a_refused_record_is_set_aside_and_kept_and_never_blocks_the_others() -> None:
    now = [1000.0]
    sink = RefusingSink(refuse="team-x")
    run = runner(sink, now)
    work = {
        ("team-x", "r0"): Work(1, [event("x-1", account="team-x")]),
        ("team-a", "r1"): Work(1, [event("a-1")]),
    }
    run.offer(work)
    while run.work:
        assert await run.send_once()
    assert run.acknowledged == {("team-a", "r1"): 1}, "refused is never acknowledged"
    assert set(run.refused) == {("team-x", "r0")}
    # Every flush offers it again: it stays aside until the longest backoff has passed.
    run.offer(work)
    assert not run.work
    now[0] += 301
    run.offer(work)
    assert list(run.work) == [("team-x", "r0")], "offered again, never dropped"
    # A new delta of the record (the usage grew) is offered at once.
    now[0] = 1000.0
    run.refused.clear()
    run.offer({("team-x", "r0"): Work(2, [event("x-2", account="team-x")])})
    assert list(run.work) == [("team-x", "r0")]


async def test_a_delta_half_taken_sends_only_what_the_sink_does_not_have() -> None:
    now = [0.0]
    sink = RefusingSink(refuse="nobody", fail={"a-1-20261127T100000Z"})
    run = runner(sink, now)
    work = Work(1, [event("a-1"), event("a-1-20261127T100000Z", corrects=START - HOUR)])
    run.offer({("team-a", "r"): work})
    assert not await run.send_once(), "one part failed: back off"
    assert await run.send_once()
    assert sink.sent == ["a-1", "a-1-20261127T100000Z", "a-1-20261127T100000Z"]
    assert run.acknowledged == {("team-a", "r"): 1} and not run.work


async def test_a_sink_that_forgets_an_event_is_retried_not_spun() -> None:
    class Forgetful(RefusingSink):
        async def send(self, events: list[UsageEvent]) -> Sent:
            self.sent += [e.id for e in events]
            return Sent()

    run = runner(Forgetful(refuse="nobody"), [0.0])
    run.offer({("team-a", "r"): Work(1, [event("a-1")])})
    assert not await run.send_once() and run.failures == 1
    assert ("team-a", "r") in run.work and not run.acknowledged


PLANS = {
    "default": Plan(
        granularity="1s",
        currency="USD",
        price_per_gpu_second={"default": "0.0012"},
        reserved_price_per_gpu_hour={"default": "3.20"},
    ),
    "minutes": Plan(
        granularity="1m",
        currency="EUR",
        price_per_gpu_second={"default": "0.001", "NVIDIA-H100-80GB-HBM3": "0.0015"},
        reserved_price_per_gpu_hour={"default": "3.20"},
    ),
}


def meter(id_: str, name: str, customer: str = "stripe_customer_id") -> dict[str, Any]:
    return {
        "id": id_,
        "event_name": name,
        "status": "active",
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"event_payload_key": customer, "type": "by_id"},
        "value_settings": {"event_payload_key": "value"},
    }


def price(meter_id: str, currency: str, unit_amount: str) -> dict[str, Any]:
    return {
        "active": True,
        "currency": currency,
        "unit_amount_decimal": unit_amount,
        "recurring": {"meter": meter_id, "usage_type": "metered"},
    }


def test_check_passes_when_stripe_mirrors_every_price_of_the_plans() -> None:
    meters = [meter("m1", "gpu_seconds"), meter("m2", "gpu_minutes")]
    # 0.0012 USD per second = 0.12 cents per second (1 s granularity, one unit per second);
    # 0.0015 EUR per second = 9 cents per minute; the default product, 6 cents.
    prices = [price("m1", "usd", "0.12"), price("m2", "eur", "9"), price("m2", "eur", "6.0")]
    assert compare(config(), PLANS, meters, prices) == []


def test_check_names_every_way_stripe_differs_from_the_plans() -> None:
    meters = [meter("m1", "gpu_seconds", customer="customer")]
    prices = [price("m1", "usd", "0.13"), price("m9", "usd", "0.12")]
    with_unknown = config(meters={"eventNames": {"default": "gpu_seconds", "gold": "gold"}})
    problems = compare(with_unknown, PLANS, meters, prices)
    assert problems == [
        "meters.eventNames names plan 'gold', which is not configured",
        "meter m1 (gpu_seconds) maps customers by 'customer', payper sends 'stripe_customer_id'",
        "meter 'gpu_seconds': no active price of 0.12 USD minor units per 1s "
        "(plan 'default', default)",
        "no active Stripe meter has event_name 'gold'",
    ]


def test_check_says_when_one_meter_would_mix_units_of_plans() -> None:
    by_product = config(meters={"by": "gpuProduct", "eventNames": {"NVIDIA-H100-80GB-HBM3": "h"}})
    prices = [price("m1", "usd", "0.12"), price("m1", "eur", "9")]
    problems = compare(by_product, PLANS, [meter("m1", "h")], prices)
    assert problems == [
        "meter 'h' gets usage of plans with different granularities (1m, 1s): its units mix"
    ]
