"""One bad report, from one agent token, never stops billing for anyone else.

A hostile or broken agent on node X sends what the records cannot hold; an honest agent
on node Y reports beside it. Y's usage is applied and acknowledged, its records become
Final; X's bad report is refused alone (in the answer, in the dead-letter store, in a
metric) and X's agent moves past it, so its next honest report applies. The real ledger
runs over the in-memory API (``payper_dev.testing.memory_ledger``): milliseconds a case.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from payper.api.billing_record import MAX_AGENTS
from payper.api.usage import NewerAgentError, UsageReport, parse_batch
from payper.billing import deadletter, flush, intake
from payper.billing.deadletter import REPORT_ENTRY_PREFIX
from payper.billing.events import BillingEvents
from payper.billing.ledger import Ledger, PlanningFaultError
from payper.kube import ApiError, resource_path
from payper_dev.testing.memory_ledger import GRACE_S, SYSTEM, T0, WINDOW_S, Agent, World

X, Y = "gpu-node-x", "gpu-node-y"


def refused_count(node: str) -> float:
    return REGISTRY.get_sample_value("payper_usage_reports_refused_total", {"node": node}) or 0.0


async def world_with_pods() -> tuple[World, dict[str, Any], dict[str, Any]]:
    world = World()
    await world.ledger.load()
    for node in (X, Y):
        await world.node(node)
    return world, await world.pod("team-x", "worker", X), await world.pod("team-y", "worker", Y)


def huge_rounded(report: dict[str, Any]) -> None:
    report["series"][0]["roundedMs"]["1s"] = 10**24  # the amount would overflow 18 digits


def far_future(report: dict[str, Any]) -> None:
    report["intervalStartMs"] = 10**15  # year 33658: no window could be named
    report["intervalEndMs"] = 10**15 + 1000


def not_a_series(report: dict[str, Any]) -> None:
    report["series"][0] = "rm -rf /"


@pytest.mark.parametrize(
    ("poison", "field"),
    [(huge_rounded, "roundedMs"), (far_future, "intervalStartMs"), (not_a_series, "series.0")],
)
async def test_a_poison_report_is_refused_alone_and_the_flush_goes_on(
    poison: Callable[[dict[str, Any]], None], field: str
) -> None:
    world, pod_x, pod_y = await world_with_pods()
    x, y = Agent("agent-x", X), Agent("agent-y", Y)
    honest_before = x.report(T0 + 100, [(pod_x, 100_000)])
    bad = x.report(T0 + 1100, [(pod_x, 50_000)])
    poison(bad)
    x.truth.clear()  # what X's batch bills: its honest reports only
    honest_after = x.report(T0 + 2100, [(pod_x, 300_000)])
    refused_before = refused_count(X)

    receipt_x, receipt_y = await world.flush_with(
        (X, [honest_before, bad, honest_after]), (Y, [y.report(T0 + 100, [(pod_y, 700_000)])])
    )

    assert receipt_y.acked == {"agent-y": 1} and receipt_y.refused == []
    assert receipt_x.acked == {"agent-x": 3}, "X moved past its bad report"
    [refused] = receipt_x.to_wire()["refused"]
    assert (refused["agentId"], refused["sequence"]) == ("agent-x", 2)
    assert field in refused["reason"], refused["reason"]
    assert world.billed_us("team-y") == 700_000
    assert world.billed_us("team-x") == 400_000, "both honest reports of X applied"
    [entry] = [v for k, v in world.dead_letters().items() if k.startswith(REPORT_ENTRY_PREFIX)]
    assert (entry["node"], entry["agentId"], entry["sequence"]) == (X, "agent-x", 2)
    assert field in entry["reason"] and entry["claimedUs"] in (0, 50_000)
    assert entry["content"] and entry["size"] >= len(entry["content"])
    assert refused_count(X) == refused_before + 1

    # A resend of the whole batch (its answer lost) files and bills nothing twice.
    [again] = await world.flush_with((X, [honest_before, bad, honest_after]))
    assert again.acked == {"agent-x": 3}
    assert world.billed_us("team-x") == 400_000
    assert len([k for k in world.dead_letters() if k.startswith(REPORT_ENTRY_PREFIX)]) == 1
    assert refused_count(X) == refused_before + 1

    # X's next honest report applies; every record becomes Final after its grace.
    [next_x] = await world.flush_with((X, [x.report(T0 + 3100, [(pod_x, 5_000)])]))
    assert next_x.acked == {"agent-x": 4} and world.billed_us("team-x") == 405_000
    world.now = T0 + (WINDOW_S + GRACE_S + 1) * 1000
    await world.ledger.flush()
    assert world.open_records() == []


async def test_more_agent_ids_from_one_node_than_it_runs_are_refused_past_the_bound() -> None:
    world, pod_x, pod_y = await world_with_pods()
    count = intake.MAX_AGENTS_PER_NODE + 5
    agents = [Agent(f"invented-{i}", X) for i in range(count)]
    y = Agent("agent-y", Y)
    batches = [(X, [a.report(T0 + 100, [(pod_x, 1000)])]) for a in agents]
    *receipts_x, receipt_y = await world.flush_with(*batches, (Y, [y.report(T0, [(pod_y, 9)])]))
    assert receipt_y.acked == {"agent-y": 1} and world.billed_us("team-y") == 9
    refused = [r for r in receipts_x if r.refused]
    assert len(refused) == count - intake.MAX_AGENTS_PER_NODE
    assert all(r.acked == {r.refused[0].agent_id: 1} for r in refused), "moved past"
    assert "more than" in refused[0].refused[0].reason
    assert world.billed_us("team-x") == 1000 * intake.MAX_AGENTS_PER_NODE


async def test_a_record_that_cannot_hold_a_change_is_dead_lettered_and_the_rest_written() -> None:
    world, pod_x, pod_y = await world_with_pods()
    x, y = Agent("agent-x", X), Agent("agent-y", Y)
    await world.flush_with((X, [x.report(T0 + 100, [(pod_x, 10)])]))
    [record] = world.records("team-x")
    # The record already holds as many agents' sequences as it can (earlier flushes of
    # many invented ids): one more agent makes a status the CRD cannot store.
    stored = world.api.objects[f"/apis/payper.dev/v1alpha1/namespaces/team-x/{'billingrecords'}"]
    stored[record["metadata"]["name"]]["status"]["lastAppliedSequence"] = {
        f"{X}/old-{i}": 1 for i in range(MAX_AGENTS)
    }
    world.ledger.store.records.clear()  # read again, as after a restart
    newcomer = Agent("newcomer", X)
    receipt_n, receipt_y = await world.flush_with(
        (X, [newcomer.report(T0 + 200, [(pod_x, 77)])]), (Y, [y.report(T0, [(pod_y, 5)])])
    )
    assert receipt_y.acked == {"agent-y": 1} and world.billed_us("team-y") == 5
    assert receipt_n.acked == {"newcomer": 1}, "its usage is filed, so it is acknowledged"
    [entry] = [v for v in world.dead_letters().values() if v.get("reason") == "unstorable"]
    assert entry["activeUs"] == 77 and entry["reports"] == [f"{X}/newcomer/1"]
    assert world.billed_us("team-x") == 10


async def test_a_report_whose_application_raises_is_refused_and_the_others_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever makes planning raise (a bug the models did not foresee), only the report
    that causes it is refused."""
    world, pod_x, pod_y = await world_with_pods()
    x, y = Agent("agent-x", X), Agent("agent-y", Y)
    real_plan = flush.plan

    def plan(reports: Sequence[UsageReport], *args: Any) -> flush.FlushPlan:
        if any(r.agent_id == "agent-x" and r.sequence == 1 and r.series for r in reports):
            raise ZeroDivisionError("a bug only this report reaches")
        return real_plan(reports, *args)

    monkeypatch.setattr(flush, "plan", plan)
    receipt_x, receipt_y = await world.flush_with(
        (X, [x.report(T0, [(pod_x, 3)]), x.report(T0 + 1000, [(pod_x, 4)])]),
        (Y, [y.report(T0, [(pod_y, 5)])]),
    )
    assert receipt_y.acked == {"agent-y": 1} and world.billed_us("team-y") == 5
    assert receipt_x.acked == {"agent-x": 2} and world.billed_us("team-x") == 4
    [refused] = receipt_x.refused
    assert refused.sequence == 1 and "ZeroDivisionError" in refused.reason


async def test_a_fault_that_is_no_reports_fails_the_flush_and_nothing_is_acknowledged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world, pod_x, _ = await world_with_pods()
    x = Agent("agent-x", X)

    def plan(*_: Any) -> flush.FlushPlan:
        raise ZeroDivisionError("a bug every flush reaches")

    monkeypatch.setattr(flush, "plan", plan)
    sent = [x.report(T0, [(pod_x, 3)])]
    with pytest.raises(ZeroDivisionError):
        await world.flush_with((X, sent))
    monkeypatch.undo()
    [receipt] = await world.flush_with((X, sent))
    assert receipt.acked == {"agent-x": 1} and receipt.refused == []
    assert world.billed_us("team-x") == 3


def test_the_models_refuse_what_a_record_cannot_hold_naming_the_field() -> None:
    agent = Agent("a", X)
    pod = {"metadata": {"namespace": "n", "name": "p", "uid": "u"}}
    reports = [agent.report(T0, [(pod, 1)]) for _ in range(3)]
    huge_rounded(reports[0])
    far_future(reports[1])
    valid, refused = parse_batch(json.dumps({"reports": reports}).encode())
    assert [r.sequence for r in valid] == [3]
    assert (refused[0].sequence, "roundedMs" in refused[0].reason) == (1, True)
    assert "intervalStartMs" in refused[1].reason and "reports[1]" in refused[1].reason


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'{"reports": []}', b'{"reports": ' + b"[{}]" * 1 + b", 1}"],
)
def test_what_is_no_batch_at_all_is_refused_whole(body: bytes) -> None:
    with pytest.raises(ValidationError):
        parse_batch(body)


def test_a_report_without_a_readable_identity_is_answered_but_cannot_be_moved_past() -> None:
    valid, [refused] = parse_batch(b'{"reports": [{"agentId": "", "sequence": -1}]}')
    assert valid == [] and refused.agent_id is None and refused.sequence is None
    assert refused.answer()["reason"].startswith("invalid report")


@pytest.mark.parametrize(
    "start_offset_ms", [-intake.MAX_AGE_MS - 1, intake.MAX_AHEAD_MS + 1], ids=["old", "ahead"]
)
async def test_a_report_outside_the_operators_time_window_is_refused(
    start_offset_ms: int,
) -> None:
    """A node cannot place usage in a window of its choosing: 35 days back at most, two
    minutes ahead at most, on the operator's clock; an agent's gap marker is exempt."""
    world, pod_x, _ = await world_with_pods()
    x = Agent("agent-x", X)
    misplaced = x.report(world.now + start_offset_ms, [(pod_x, 9_000)])
    marker = x.report(world.now + start_offset_ms, [])
    marker.update(series=[], lostUs=5, lostReason="retention")
    honest = x.report(T0 + 100, [(pod_x, 1_000)])
    [receipt] = await world.flush_with((X, [misplaced, marker, honest]))
    assert receipt.acked == {"agent-x": 3}
    [refused] = receipt.refused
    assert refused.sequence == 1 and "intervalStartMs" in refused.reason
    assert world.billed_us("team-x") == 1_000


def test_a_report_from_a_newer_agent_fails_its_batch_so_the_agent_holds_it() -> None:
    """Fields this operator does not know, and nothing else wrong: an upgrade under way
    (agents before the operator). The batch is answered 400, which the agent keeps for
    ten minutes, instead of the report being refused and set aside."""
    agent = Agent("a", X)
    pod = {"metadata": {"namespace": "n", "name": "p", "uid": "u"}}
    newer = agent.report(T0, [(pod, 1)]) | {"startupUs": 5}
    with pytest.raises(NewerAgentError, match="startupUs"):
        parse_batch(json.dumps({"reports": [agent.report(T0, [(pod, 1)]), newer]}).encode())
    wrong_too = newer | {"sequence": 0}
    _, [refused] = parse_batch(json.dumps({"reports": [wrong_too]}).encode())
    assert "sequence" in refused.reason, "anything else wrong: refused, as any bad report"


async def test_a_poison_report_sent_out_of_order_is_found_and_the_rest_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reports are tried in sequence order: sent as [2, 1], with 2 poison, report 1 is
    applied and 2 refused (tried in the order they came, 1 was blamed and the flush
    failed for everyone)."""
    world, pod_x, pod_y = await world_with_pods()
    x, y = Agent("agent-x", X), Agent("agent-y", Y)
    first, second = x.report(T0, [(pod_x, 3)]), x.report(T0 + 1000, [(pod_x, 4)])
    real_plan = flush.plan

    def plan(reports: Sequence[UsageReport], *args: Any) -> flush.FlushPlan:
        if any(r.agent_id == "agent-x" and r.sequence == 2 and r.series for r in reports):
            raise ZeroDivisionError("a bug only report 2 reaches")
        return real_plan(reports, *args)

    monkeypatch.setattr(flush, "plan", plan)
    receipt_x, receipt_y = await world.flush_with(
        (X, [second, first]), (Y, [y.report(T0, [(pod_y, 5)])])
    )
    assert receipt_y.acked == {"agent-y": 1} and world.billed_us("team-y") == 5
    assert receipt_x.acked == {"agent-x": 2} and world.billed_us("team-x") == 3
    assert [r.sequence for r in receipt_x.refused] == [2]


async def test_planning_that_fails_for_several_nodes_is_the_operators_fault_not_theirs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug every report reaches must not dead-letter everyone's usage: the flush fails
    loudly and nothing is acknowledged or filed."""
    world, pod_x, pod_y = await world_with_pods()
    real_plan = flush.plan

    def plan(reports: Sequence[UsageReport], *args: Any) -> flush.FlushPlan:
        if any(r.series for r in reports):
            raise ZeroDivisionError("a bug any usage reaches")
        return real_plan(reports, *args)

    monkeypatch.setattr(flush, "plan", plan)
    sent = (X, [Agent("agent-x", X).report(T0, [(pod_x, 3)])])
    with pytest.raises(PlanningFaultError):
        await world.flush_with(sent, (Y, [Agent("agent-y", Y).report(T0, [(pod_y, 5)])]))
    assert world.dead_letters() == {} and world.ledger.applied_through == {}


async def test_one_nodes_refusals_past_its_quota_wait_and_no_other_node_waits_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world, pod_x, pod_y = await world_with_pods()
    monkeypatch.setattr(deadletter, "MAX_REPORTS_PER_NODE", 1)
    x, y = Agent("agent-x", X), Agent("agent-y", Y)
    bad_x = [x.report(T0 + i, [(pod_x, 1)]) for i in range(2)]
    for report in bad_x:
        not_a_series(report)
    bad_y = y.report(T0, [(pod_y, 1)])
    not_a_series(bad_y)
    receipt_x, receipt_y = await world.flush_with((X, bad_x), (Y, [bad_y]))
    assert receipt_y.acked == {"agent-y": 1}, "Y's refusal is filed: Y moves on"
    assert receipt_x.acked == {"agent-x": 0}, "X is past its quota: its refusals wait"
    nodes = [e["node"] for e in world.dead_letters().values()]
    assert sorted(nodes) == [Y]


async def test_refused_reports_far_ahead_of_their_agent_are_not_filed() -> None:
    """Filing a report the flush cannot move its agent past would only fill the store."""
    world, pod_x, _ = await world_with_pods()
    x = Agent("agent-x", X)
    x.sequence = 40  # reports 41.. while the operator has applied none
    far = [x.report(T0 + i, [(pod_x, 1)]) for i in range(5)]
    for report in far:
        not_a_series(report)
    [receipt] = await world.flush_with((X, far))
    assert receipt.acked == {"agent-x": 0} and len(receipt.refused) == 5
    assert world.dead_letters() == {}


async def test_a_report_once_filed_as_refused_is_never_billed_later() -> None:
    """The ninth agent id of a node is refused and filed; the progress save then fails,
    so nothing is acknowledged. Resent (by an operator that restarted, too), the report
    stays refused: its claim is in the dead-letter store, and is never also billed."""
    world, pod_x, _ = await world_with_pods()
    agents = [Agent(f"a{i}", X) for i in range(intake.MAX_AGENTS_PER_NODE + 1)]
    batches = [(X, [a.report(T0, [(pod_x, 1_000)])]) for a in agents]
    await world.kube.create(
        resource_path("v1", "configmaps", SYSTEM),
        {"metadata": {"name": world.config.ledger_config_map}, "data": {}},
    )
    await world.ledger.progress.load()  # so the save is a PUT, and that fails
    world.api.fail(500, method="PUT", path_contains=world.config.ledger_config_map)
    with contextlib.suppress(ApiError):
        await world.flush_with(*batches)
    [filed] = [v for v in world.dead_letters().values() if v.get("agentId") == "a8"]
    assert world.ledger.applied_through == {}, "nothing acknowledged"
    restarted = World()
    restarted.api, restarted.kube = world.api, world.kube
    restarted.registry = world.registry
    restarted.ledger = Ledger(
        world.kube, world.config, SYSTEM, world.registry, BillingEvents(), clock=lambda: world.now
    )
    await restarted.ledger.load()
    receipts = await restarted.flush_with(*reversed(batches))  # a8 first this time
    assert [r.acked for r in receipts] == [{a.agent_id: 1} for a in reversed(agents)]
    assert restarted.billed_us("team-x") == 1_000 * intake.MAX_AGENTS_PER_NODE
    reports = [v for v in restarted.dead_letters().values() if "agentId" in v]
    assert reports == [filed], "a8 is filed once and billed never; a7 is billed"
