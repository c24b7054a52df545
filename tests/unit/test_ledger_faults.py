"""Every API call of a flush fails in turn, and no money is lost, repeated or left behind.

One flush with several agents on two nodes, records to create, update and finalise, an
export sink and one poison report: that flush is run again and again, each time with one
of its API calls (by index, from the first) answered with one fault: 409, 500, 429, a
timeout before the call, a broken connection, or the call carried out and its answer
lost. The flushes after
it run clean, the agents resending what was not acknowledged, as real agents do. Then:

- records + dead letters = what the agents measured (nothing lost, nothing twice);
- every honest agent is acknowledged through its last report;
- nothing is left Open past its grace, nothing left unexported, the sink told each
  record's totals once.

The ledger is the real one over the in-memory API (``payper_dev.testing.memory_api``);
the sink is a list in this process (the exporter's runner sends to it when the test says).
"""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal
from typing import Any

import pytest

from payper.api.billing_record import FINAL
from payper.billing.config import BillingConfig
from payper.billing.outbox import identity
from payper.billing.records import EXPORTED, STATE_LABEL
from payper.billing.sinks import Sent, UsageEvent
from payper_dev.testing.memory_api import DISCONNECT, LOST, TIMEOUT, Call
from payper_dev.testing.memory_ledger import GRACE_S, T0, WINDOW_S, Agent, World

X, Y = "gpu-node-x", "gpu-node-y"
SINK = "meter"
FAULTS = (409, 500, 429, TIMEOUT, LOST, DISCONNECT)
CALLS_IN_FLUSH = 40
"""More than the faulty flush makes (the suite checks it reaches its last call)."""


class ListSink:
    """The export sink: takes every event, keeps each id once (a resend repeats it)."""

    def __init__(self) -> None:
        self.events: dict[str, UsageEvent] = {}

    async def send(self, events: list[UsageEvent]) -> Sent:
        for event in events:
            assert self.events.setdefault(event.id, event) == event, "an id with two contents"
        return Sent(taken={e.id for e in events})

    async def close(self) -> None:
        return None


class Fleet:
    """The world, its agents (each resending what is not acknowledged) and the sink."""

    def __init__(self) -> None:
        config = BillingConfig.model_validate(
            {
                "windowSeconds": WINDOW_S,
                "graceSeconds": GRACE_S,
                "export": {
                    "sinks": [{"name": SINK, "type": "cloudevents", "url": "http://127.0.0.1:9"}]
                },
            }
        )
        self.world = World(config)
        self.sink = ListSink()
        self.world.ledger.exporter.runners[SINK].sink = self.sink
        self.agents = [Agent("a1", Y), Agent("a2", Y), Agent("b1", X)]
        self.unacked: dict[str, list[dict[str, Any]]] = {a.agent_id: [] for a in self.agents}
        self.poisoned_us = 0
        self.pods: dict[str, dict[str, Any]] = {}

    async def start(self) -> None:
        await self.world.ledger.load()
        for node in (X, Y):
            await self.world.node(node)
        self.pods[Y] = await self.world.pod("team-y", "server", Y)
        self.pods[X] = await self.world.pod("team-x", "server", X)

    def measure(self, start_ms: int, poison: bool = False) -> None:
        """Each agent cuts its next report (with ``poison``, agent b1 on X also cuts one
        that no record can hold)."""
        for agent in self.agents:
            pod = self.pods[agent.node]
            self.unacked[agent.agent_id].append(agent.report(start_ms, [(pod, 250_000)]))
            if agent.agent_id == "b1" and poison:
                poison = agent.report(start_ms + 1, [(pod, 40_000)])
                poison["series"][0]["roundedMs"]["1s"] = 10**24
                self.unacked["b1"].append(poison)
                self.poisoned_us = 40_000

    async def flush(self) -> None:
        """Every agent sends what it has not seen acknowledged; one flush; the sink takes
        what the exporter offers."""
        batches = [(a.node, list(self.unacked[a.agent_id])) for a in self.agents]
        sent = [
            asyncio.ensure_future(self.world.send(node, reports))
            for node, reports in batches
            if reports
        ]
        await asyncio.sleep(0)
        with contextlib.suppress(Exception):  # as the operator's flush loop: logged, next one
            await self.world.ledger.flush()
        for receipt in [await asyncio.wait_for(s, 5) for s in sent]:
            for agent_id, through in receipt.acked.items():
                self.unacked[agent_id] = [
                    r for r in self.unacked[agent_id] if r["sequence"] > through
                ]
        runner = self.world.ledger.exporter.runners[SINK]
        while runner.work:
            assert await runner.send_once()

    def truth(self) -> int:
        return sum(sum(a.truth.values()) for a in self.agents)


def accounted_us(fleet: Fleet) -> int:
    """Active µs in records, plus dead-lettered usage and refused reports' claims."""
    in_records = sum(r.get("status", {}).get("activeUs", 0) for r in fleet.world.records())
    letters = fleet.world.dead_letters().values()
    filed = sum(e.get("activeUs", 0) + e.get("claimedUs", 0) for e in letters)
    return in_records + filed


async def run_case(fault: int | str | None, index: int) -> tuple[Fleet, int]:
    """The fleet after the faulty flush and the clean ones, and how many API calls the
    faulty flush made."""
    fleet = Fleet()
    await fleet.start()
    fleet.world.now = T0 + 2000
    fleet.measure(T0 + 1000)
    await fleet.flush()
    # The faulty flush: the first window closes (Final, exported), new usage opens the
    # next, the poison report arrives.
    fleet.world.now = T0 + (WINDOW_S + GRACE_S + 1) * 1000
    fleet.measure(T0 + (WINDOW_S + 1) * 1000, poison=True)
    api = fleet.world.api
    first = len(api.calls)
    if fault is not None:

        def at_index(call: Call) -> bool:
            return len(api.calls) - 1 == first + index

        api.fail(fault, when=at_index, retry_after="0.1")
    await fleet.flush()
    calls = len(api.calls) - first
    # Clean flushes: resends, then past the second window's grace.
    for _ in range(3):
        fleet.world.now += 1000
        await fleet.flush()
    fleet.world.now = T0 + (2 * WINDOW_S + GRACE_S + 1) * 1000
    for _ in range(3):
        fleet.world.now += 1000
        await fleet.flush()
    return fleet, calls


def assert_whole(fleet: Fleet) -> None:
    assert accounted_us(fleet) == fleet.truth(), "records + dead letters = measured"
    assert all(not unacked for unacked in fleet.unacked.values()), fleet.unacked
    records = fleet.world.records()
    assert records and all(r["status"]["state"] == FINAL for r in records), "all Final"
    assert all(r["metadata"]["labels"][STATE_LABEL] == EXPORTED for r in records)
    told: dict[str, tuple[int, Decimal]] = {}
    for event in fleet.sink.events.values():
        active, amount = told.get(event.id[:36], (0, Decimal(0)))
        told[event.id[:36]] = (active + event.active_ms, amount + event.amount)
    for record in records:
        status = record["status"]
        expected = (int(status["activeMs"]), Decimal(status["amount"]))
        assert told.get(identity(record["metadata"]), (0, Decimal(0))) == expected


async def test_the_flush_without_faults_is_whole_and_makes_the_calls_the_suite_fails() -> None:
    fleet, calls = await run_case(None, 0)
    assert_whole(fleet)
    assert 10 <= calls <= CALLS_IN_FLUSH, calls
    assert fleet.poisoned_us and any(
        e.get("claimedUs") == fleet.poisoned_us for e in fleet.world.dead_letters().values()
    )


@pytest.mark.parametrize("fault", FAULTS)
async def test_any_one_api_call_of_a_flush_may_fail_and_nothing_is_lost_or_repeated(
    fault: int | str,
) -> None:
    for index in range(CALLS_IN_FLUSH):
        fleet, _ = await run_case(fault, index)
        try:
            assert_whole(fleet)
        except AssertionError as error:
            raise AssertionError(f"call {index} of the flush answered {fault}: {error}") from None
