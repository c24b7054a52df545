"""Usage reaches Stripe as meter events exactly once per identifier: stripe-mock (Stripe's
own mock server) validates every request against Stripe's API definition, and a proxy
of ours in front of it counts identifiers through a Stripe outage, a Stripe that answers
after the operator gave up, and an operator SIGKILL mid-export. A namespace the
platform mapped to no Stripe customer is never billed to anyone, and is kept until it
is mapped.

Short windows (20 s, grace 5 s) so that records become Final, then Exported, within a
test."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from payper.billing.outbox import FINALIZER, annotation, identity
from payper.clock import now_ms, parse_iso
from payper_dev.testing.billing import (
    exported,
    kill_mid_export,
    model,
    records,
    traffic,
    wait_exported,
)
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import Stack, StackOptions, running, scraped_sum
from payper_dev.testing.stripe_proxy import MeterEvent, StripeMock, StripeProxy

SINK = "stripe"
EVENT_NAME = "payper_gpu_seconds"
CUSTOMER = "cus_PayperBilled"
LATE_CUSTOMER = "cus_PayperMappedLate"


@pytest.fixture(scope="module")
def stripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StripeProxy]:
    mock = StripeMock(tmp_path_factory.mktemp("stripe-mock") / "stripe-mock.log").start()
    proxy = StripeProxy(mock).start()
    yield proxy
    proxy.stop()
    mock.stop()


@pytest.fixture(scope="module")
def tenants(cluster: ClusterHandle) -> dict[str, str]:
    """Namespaces made before the operator starts: its configuration names them."""
    return {
        "billed": cluster.namespace("stripe-billed"),
        "unmapped": cluster.namespace("stripe-new"),
    }


@pytest.fixture(scope="module")
def stripe_stack(
    crds_installed: ClusterHandle,
    tmp_path_factory: pytest.TempPathFactory,
    stripe: StripeProxy,
    tenants: dict[str, str],
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("export-stripe")
    key = workdir / "stripe-api-key"
    key.write_text("sk_test_payper\n")
    billing = {
        "flushIntervalSeconds": 1,
        "windowSeconds": 20,
        "graceSeconds": 5,
        "export": {
            "sinks": [
                {
                    "name": SINK,
                    "type": "stripe",
                    "apiKeyFile": str(key),
                    "apiBase": stripe.url,
                    "customers": {tenants["billed"]: CUSTOMER},
                    "meters": {"by": "plan", "eventNames": {"default": EVENT_NAME}},
                    "timeoutSeconds": 1,
                    "batchSize": 20,
                }
            ],
            "minBackoffSeconds": 0.2,
            "maxBackoffSeconds": 1,
        },
    }
    options = StackOptions(agents=True, operator_extra={"billing": billing})
    with running(crds_installed, workdir, options) as started:
        yield started


def by_identifier(events: list[MeterEvent]) -> dict[str, MeterEvent]:
    """Every request stripe-mock took, by identifier; a resend repeats its event exactly,
    under its identifier as the idempotency key."""
    found: dict[str, MeterEvent] = {}
    for event in events:
        assert event.status == 200, f"stripe-mock refused {event}"
        assert event.idempotency_key == event.identifier
        assert found.setdefault(event.identifier, event).content == event.content, (
            f"{event.identifier} sent with two contents"
        )
    return found


def assert_stripe_holds_records(
    done: list[dict[str, Any]], events: dict[str, MeterEvent], customer: str
) -> None:
    """Per record: the values of its distinct identifiers add up to its billed seconds
    (the default plan's unit), all for the namespace's customer, at its window's time."""
    values: dict[str, Decimal] = defaultdict(Decimal)
    for event in events.values():
        values[event.identifier[:36]] += Decimal(event.value)
    for record in done:
        uid = identity(record["metadata"])
        billed = Decimal(int((record.get("status") or {}).get("billedMs", 0))) / 1000
        assert values.get(uid, Decimal(0)) == billed, record["metadata"]["name"]
        start_s = parse_iso(record["spec"]["window"]["start"]) // 1000
        for event in events.values():
            if event.identifier[:36] == uid and event.identifier.count("-") == 5:
                assert (event.customer, event.event_name) == (customer, EVENT_NAME)
                assert event.timestamp == start_s, "an own delta is at its window's start"


async def test_meter_events_reach_stripe_once_per_identifier_through_an_outage_and_a_kill(
    stripe_stack: Stack,
    stripe: StripeProxy,
    tenants: dict[str, str],
    http: aiohttp.ClientSession,
) -> None:
    stack, namespace = stripe_stack, tenants["billed"]
    stack.deploy(namespace, model("metered"))
    rng = random.Random(21)
    statuses = await traffic(http, stack, namespace, "metered", rng, 5)
    # Stripe unreachable for several flush intervals: nothing lost, retried with backoff.
    # (Until the operator has tried: the agents report every few seconds.)
    stripe.mode = "down"
    failed = {"sink": SINK, "result": "failed"}
    for _ in range(20):
        statuses += await traffic(http, stack, namespace, "metered", rng, 2)
        if scraped_sum(stack.metrics_url, "payper_export_events_total", failed) > 0:
            break
    else:
        raise AssertionError("the operator never tried Stripe while it was down")
    statuses += await traffic(http, stack, namespace, "metered", rng, 3)
    # Stripe takes the events and answers after the operator's 1 s timeout: the operator
    # resends them, under the same identifiers.
    stripe.slow_s, stripe.mode = 2.0, "slow"
    taken_before = len(stripe.events())
    statuses += await traffic(http, stack, namespace, "metered", rng, 4)
    await asyncio.to_thread(
        eventually, lambda: len(stripe.events()) > taken_before, 30, 0.2, "Stripe sent events"
    )
    # Killed mid-export: events taken, their acknowledgements never written.
    assert set(statuses) == {200}

    def sink_back() -> None:
        stripe.mode = "up"

    await kill_mid_export(http, stack, namespace, "metered", rng, sink_back)

    done = await wait_exported(stack, namespace, now_ms())
    sent = [e for e in stripe.events() if e.customer == CUSTOMER]
    events = by_identifier(sent)
    assert len(sent) > len(events), "the slow Stripe and the kill made the operator resend"
    assert_stripe_holds_records(done, events, CUSTOMER)
    assert sum(int(r["status"]["billedMs"]) for r in done) > 0


async def test_a_namespace_with_no_stripe_customer_is_billed_to_no_one_and_kept_until_mapped(
    stripe_stack: Stack,
    stripe: StripeProxy,
    tenants: dict[str, str],
    http: aiohttp.ClientSession,
) -> None:
    """A tenant the platform has not mapped yet: its usage is never sent under another
    customer, nor dropped; its records stay (not Exported, finalizer on) and the operator
    says why. Once the platform maps it, every millisecond goes, once."""
    stack, namespace = stripe_stack, tenants["unmapped"]
    stack.deploy(namespace, model("unbilled"))
    statuses = await traffic(http, stack, namespace, "unbilled", random.Random(22), 4)
    assert set(statuses) == {200}
    await stack.settle()
    owed: list[dict[str, Any]] = []

    def billed(record: dict[str, Any]) -> bool:
        return int((record.get("status") or {}).get("billedMs", 0)) > 0

    def final_and_sealed() -> bool:
        owed[:] = [
            r
            for r in records(stack.cluster, namespace)
            if billed(r)
            and (r.get("status") or {}).get("state") == "Final"
            and (r["metadata"].get("annotations") or {}).get(annotation(SINK))
        ]
        return bool(owed)

    await asyncio.to_thread(eventually, final_and_sealed, 90, 0.5, "a Final record sealed")
    ended_by = max(parse_iso(r["spec"]["window"]["end"]) for r in owed)
    for record in owed:
        assert not exported(record)
        assert FINALIZER in record["metadata"].get("finalizers", [])
    uids = {identity(r["metadata"]) for r in owed}
    assert not [e for e in stripe.events() if e.identifier[:36] in uids], "billed to no one"
    reason = f"namespace '{namespace}' has no Stripe customer"
    await asyncio.to_thread(
        eventually,
        lambda: reason in (stack.workdir / "operator.log").read_text(),
        30,
        0.5,
        "the operator to say why it is not sent",
    )
    assert scraped_sum(stack.metrics_url, "payper_export_refused_records", {"sink": SINK}) >= 1

    # The platform maps the namespace (a configuration change: the operator restarts).
    sinks = stack.options.operator_extra["billing"]["export"]["sinks"]
    sinks[0]["customers"][namespace] = LATE_CUSTOMER
    assert stack.operator is not None
    stack.operator.stop()
    await asyncio.to_thread(stack.start_operator)
    done = await wait_exported(stack, namespace, ended_by)
    events = by_identifier([e for e in stripe.events() if e.identifier[:36] in uids])
    assert_stripe_holds_records(done, events, LATE_CUSTOMER)
    assert {r["metadata"]["uid"] for r in done} >= uids


async def test_removing_every_sink_never_leaves_a_namespace_undeletable(
    stripe_stack: Stack, cluster: ClusterHandle, http: aiohttp.ClientSession
) -> None:
    """A careless platform admin removes the export configuration while records still
    carry the export finalizer (here: a namespace Stripe has no customer for). With no
    sink left nothing will export them: deleting their namespace still finishes."""
    stack = stripe_stack
    doomed = cluster.namespace("stripe-dropped")
    stack.deploy(doomed, model("orphan"))
    statuses = await traffic(http, stack, doomed, "orphan", random.Random(23), 3)
    assert set(statuses) == {200}
    await stack.settle()

    def held() -> bool:
        return any(
            FINALIZER in r["metadata"].get("finalizers", [])
            and (r.get("status") or {}).get("state") == "Final"
            for r in records(cluster, doomed)
        )

    await asyncio.to_thread(eventually, held, 90, 0.5, "a Final record held for export")
    export = stack.options.operator_extra["billing"].pop("export")
    assert stack.operator is not None
    try:
        stack.operator.stop()
        await asyncio.to_thread(stack.start_operator)
        cluster.kubectl("delete", "namespace", doomed, "--wait=false")

        def gone() -> bool:
            return cluster.kubectl("get", "namespace", doomed, check=False).returncode != 0

        await asyncio.to_thread(eventually, gone, 90, 0.5, f"namespace {doomed} deleted")
        log = (stack.workdir / "operator.log").read_text()
        assert f"namespace {doomed} is being deleted and no export sink is configured" in log
    finally:
        stack.options.operator_extra["billing"]["export"] = export
        stack.operator.stop()
        await asyncio.to_thread(stack.start_operator)


def test_stripe_check_reads_stripe_and_names_what_differs_from_the_plans(
    stripe_stack: Stack, stripe: StripeProxy
) -> None:
    """``payper export stripe --check`` against stripe-mock: its requests are valid, it
    only reads, and it names what Stripe's fixtures do not mirror (stripe-mock has one
    meter, ``test-meter-event-name``, and no price on it)."""
    config = stack_config(stripe_stack)
    before = len(stripe.other_requests)
    result = subprocess.run(
        [sys.executable, "-m", "payper.cli", "export", "stripe", "--check", "--config", config],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"{SINK}: no active Stripe meter has event_name '{EVENT_NAME}'"
    ]
    requests = stripe.other_requests[before:]
    assert requests and all(method == "GET" and status == 200 for method, _, status in requests)
    assert {path.split("?")[0] for _, path, _ in requests} >= {
        "/v1/billing/meters",
        "/v1/prices",
        f"/v1/customers/{CUSTOMER}",
    }


def stack_config(stack: Stack) -> str:
    path: Path = stack.workdir / "operator.yaml"
    assert path.is_file()
    return str(path)
