"""Usage to Stripe Billing as meter events, with Stripe's own SDK, and a check that Stripe's
meters and prices mirror the plans.

One meter event per usage event (Stripe takes one per request): ``identifier`` is the
event's deterministic id (and the request's idempotency key), ``timestamp`` the window's
start (a correction: the original window's), ``payload.value`` the billed GPU time in
the plan's unit (its granularity: ms, s or min), ``payload.stripe_customer_id`` the
namespace's customer from the platform's configuration. Stripe deduplicates identifiers
only over about 24 hours, so it is Payper's outbox (an event acknowledged is never sent
again) that makes this exactly once, not Stripe.

What Stripe would never take is refused here, with the reason, and kept: a namespace
with no customer, a plan or GPU product with no meter, usage older than Stripe's 35
days, or a request Stripe rejects (400). Refused events stay owed (their records are
not Exported, not deleted) and are offered again after the longest backoff, so fixing
the configuration sends them. Everything else that goes wrong (a network error, 429,
5xx, a key Stripe does not accept) is a failure, retried after a backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import stripe

from payper.api.billing_record import GRANULARITY_MS
from payper.billing.config import StripeSinkConfig
from payper.billing.pricing import Plan, product_key
from payper.billing.sinks import Sent, UsageEvent

logger = logging.getLogger(__name__)

MAX_AGE_SECONDS = 35 * 86_400 - 3_600
"""Stripe takes timestamps up to 35 days old: an hour less, for clocks that differ."""
MAX_IDENTIFIER = 100
CUSTOMER_KEY = "stripe_customer_id"
VALUE_KEY = "value"
ZERO_DECIMAL_CURRENCIES = frozenset(
    [
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "JPY",
        "KMF",
        "KRW",
        "MGA",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    ]
)
"""Currencies whose Stripe amounts are whole units (no cents)."""


def meter_key(config: StripeSinkConfig, event: UsageEvent) -> str:
    return event.plan if config.meters.by == "plan" else product_key(event.gpu_product)


def value(event: UsageEvent) -> str:
    """Billed GPU time in the plan's unit, exactly (a decimal string, no exponent)."""
    units = Decimal(event.billed_ms) / Decimal(GRANULARITY_MS[event.granularity])
    text = format(units, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def meter_event(config: StripeSinkConfig, event: UsageEvent, now_s: float) -> dict[str, Any] | str:
    """The meter event's parameters, or why Stripe must not be sent it."""
    customer = config.customers.get(event.account)
    if customer is None:
        return f"namespace {event.account!r} has no Stripe customer in the configuration"
    key = meter_key(config, event)
    name = config.meters.event_names.get(key)
    if name is None:
        return f"{config.meters.by} {key!r} has no Stripe meter (meters.eventNames)"
    timestamp = event.time_ms // 1000
    if timestamp < now_s - MAX_AGE_SECONDS:
        return f"usage of {timestamp} is older than Stripe takes (35 days)"
    if len(event.id) > MAX_IDENTIFIER:  # ids are a UID, a count and a window: never
        return f"identifier {event.id!r} is longer than Stripe's {MAX_IDENTIFIER}"
    return {
        "event_name": name,
        "identifier": event.id,
        "timestamp": timestamp,
        "payload": {CUSTOMER_KEY: customer, VALUE_KEY: value(event)},
    }


def _client(config: StripeSinkConfig, http_client: Any | None = None) -> stripe.StripeClient:
    key = Path(config.api_key_file).read_text().strip()
    return stripe.StripeClient(
        key,
        base_addresses={"api": config.api_base},
        http_client=http_client,
        max_network_retries=0,  # the sink's runner retries, with its own backoff
    )


class StripeSink:
    def __init__(self, config: StripeSinkConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self._http: stripe.AIOHTTPClient | None = None
        self._stripe: stripe.StripeClient | None = None

    def _connect(self) -> stripe.StripeClient:
        if self._stripe is None:
            self._http = stripe.AIOHTTPClient(timeout=self.config.timeout_seconds)
            self._stripe = _client(self.config, self._http)
        return self._stripe

    async def send(self, events: list[UsageEvent]) -> Sent:
        sent = Sent()
        try:
            client = self._connect()
        except OSError as error:
            sent.failed = {e.id: f"api key: {error}" for e in events}
            return sent
        gate = asyncio.Semaphore(self.config.concurrency)
        now = self.clock()

        async def one(event: UsageEvent) -> None:
            params = meter_event(self.config, event, now)
            if isinstance(params, str):
                sent.refused[event.id] = params
                return
            if event.billed_ms == 0:
                sent.taken.add(event.id)  # nothing to meter
                return
            async with gate:
                try:
                    await client.v1.billing.meter_events.create_async(
                        params,  # type: ignore[arg-type]
                        {"idempotency_key": event.id},
                    )
                except stripe.InvalidRequestError as error:
                    if error.code == "resource_already_exists":
                        sent.taken.add(event.id)  # Stripe has it, from an earlier send
                    else:
                        sent.refused[event.id] = f"Stripe: {error.user_message or error}"
                    return
                except stripe.AuthenticationError as error:
                    self._stripe = None  # a rotated key is read again
                    sent.failed[event.id] = f"Stripe: {error}"
                    return
                except stripe.StripeError as error:
                    sent.failed[event.id] = f"Stripe: {error}"
                    return
            sent.taken.add(event.id)

        await asyncio.gather(*(one(e) for e in events))
        return sent

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close_async()  # type: ignore[no-untyped-call]


# -- payper export stripe --check ----------------------------------------------------------
@dataclass(frozen=True)
class Expected:
    """What a meter's price should be: per unit of the plan's granularity."""

    currency: str
    unit_amount: Decimal
    """In the currency's smallest unit (Stripe's ``unit_amount_decimal``)."""
    granularity: str
    plan: str
    product: str


def expected_price(plan_name: str, plan: Plan, product: str) -> Expected:
    seconds = Decimal(GRANULARITY_MS[plan.granularity]) / 1000
    minor = 1 if plan.currency in ZERO_DECIMAL_CURRENCIES else 100
    amount = Decimal(plan.price(product)) * seconds * minor
    return Expected(plan.currency, amount.normalize(), plan.granularity, plan_name, product)


def expectations(config: StripeSinkConfig, plans: Mapping[str, Plan]) -> dict[str, list[Expected]]:
    """Per meter event name, the prices the plans say it must carry."""
    found: dict[str, list[Expected]] = {}
    for key, name in config.meters.event_names.items():
        if config.meters.by == "plan":
            plan = plans.get(key)
            pairs = [] if plan is None else [(key, plan, p) for p in plan.price_per_gpu_second]
        else:
            pairs = [(n, p, key) for n, p in plans.items()]
        found[name] = [expected_price(n, p, product) for n, p, product in pairs]
    return found


def compare(
    config: StripeSinkConfig,
    plans: Mapping[str, Plan],
    meters: Sequence[Mapping[str, Any]],
    prices: Sequence[Mapping[str, Any]],
) -> list[str]:
    """What Stripe does not mirror: one line per problem (none: it mirrors the plans)."""
    problems = []
    if config.meters.by == "plan":
        problems += [
            f"meters.eventNames names plan {k!r}, which is not configured"
            for k in config.meters.event_names
            if k not in plans
        ]
    by_name = {m["event_name"]: m for m in meters if m.get("status") == "active"}
    for name, wanted in expectations(config, plans).items():
        meter = by_name.get(name)
        if meter is None:
            problems.append(f"no active Stripe meter has event_name {name!r}")
            continue
        if (meter.get("default_aggregation") or {}).get("formula") != "sum":
            problems.append(f"meter {meter['id']} ({name}) must sum its events")
        customer = (meter.get("customer_mapping") or {}).get("event_payload_key")
        if customer != CUSTOMER_KEY:
            problems.append(
                f"meter {meter['id']} ({name}) maps customers by {customer!r}, "
                f"payper sends {CUSTOMER_KEY!r}"
            )
        value_key = (meter.get("value_settings") or {}).get("event_payload_key")
        if value_key != VALUE_KEY:
            problems.append(
                f"meter {meter['id']} ({name}) reads its value from {value_key!r}, "
                f"payper sends {VALUE_KEY!r}"
            )
        if len({w.granularity for w in wanted}) > 1:
            problems.append(
                f"meter {name!r} gets usage of plans with different granularities "
                f"({', '.join(sorted({w.granularity for w in wanted}))}): its units mix"
            )
        on_meter = [
            p
            for p in prices
            if p.get("active") and ((p.get("recurring") or {}).get("meter") == meter["id"])
        ]
        for want in wanted:
            if not any(
                str(p.get("currency", "")).upper() == want.currency
                and p.get("unit_amount_decimal") is not None
                and Decimal(str(p["unit_amount_decimal"])) == want.unit_amount
                for p in on_meter
            ):
                problems.append(
                    f"meter {name!r}: no active price of {format(want.unit_amount, 'f')} "
                    f"{want.currency} minor units per {want.granularity} "
                    f"(plan {want.plan!r}, {want.product})"
                )
    return problems


def check(config: StripeSinkConfig, plans: Mapping[str, Plan]) -> list[str]:
    """Compare Stripe's meters, prices and customers with the configuration (read only)."""
    client = _client(config)
    meters = [m.to_dict() for m in client.v1.billing.meters.list({"limit": 100}).auto_paging_iter()]
    prices = [
        p.to_dict()
        for p in client.v1.prices.list({"active": True, "limit": 100}).auto_paging_iter()
    ]
    problems = compare(config, plans, meters, prices)
    for namespace, customer in sorted(config.customers.items()):
        try:
            found = client.v1.customers.retrieve(customer)
        except stripe.InvalidRequestError as error:
            problems.append(f"namespace {namespace!r}: customer {customer}: {error.user_message}")
            continue
        if found.to_dict().get("deleted"):
            problems.append(f"namespace {namespace!r}: customer {customer} is deleted")
    return problems
