"""Table-driven tests of the autoscaler's decision: one row per rule."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from payper.operator.autoscaler import (
    MAX_COST_PATCHES,
    MAX_DELETION_COST,
    Decision,
    History,
    Observation,
    Policy,
    Reason,
    Recommendation,
    Sample,
    Windows,
    decide,
    deletion_costs,
)

POLICY = Policy(
    min_replicas=0,
    max_replicas=5,
    target_concurrency=4,
    idle_timeout_ms=30_000,
    scale_down_delay_ms=10_000,
)
WINDOWS = Windows(stable_ms=60_000, panic_ms=6_000)
NOW = 1_000_000


@dataclass
class Row:
    name: str
    current: int = 0
    in_flight: int = 0
    queued: int = 0
    starting: int = 0
    last_request_ago_ms: int | None = 1_000
    history: list[int] = field(default_factory=list)
    """Concurrency one sample a second, oldest first, ending one second before now."""
    recommendations: list[tuple[int, int]] = field(default_factory=list)
    """(ms ago, replicas) of earlier recommendations."""
    policy: Policy = POLICY
    desired: int = 0
    reason: Reason = Reason.DEMAND


ROWS = [
    Row("idle at zero stays at zero", last_request_ago_ms=None, desired=0, reason=Reason.IDLE),
    Row(
        "a held request scales from zero at once",
        queued=1,
        desired=1,
        reason=Reason.SCALE_FROM_ZERO,
    ),
    Row(
        "many held requests scale from zero to what they need",
        queued=9,
        desired=3,
        reason=Reason.SCALE_FROM_ZERO,
    ),
    Row(
        "held requests at zero respect maxReplicas",
        queued=40,
        desired=5,
        reason=Reason.MAX_REPLICAS,
    ),
    Row("concurrency / target, rounded up", current=1, in_flight=9, history=[9] * 60, desired=3),
    Row(
        "exactly the target needs one replica", current=1, in_flight=4, history=[4] * 60, desired=1
    ),
    Row(
        "a burst scales up at once (panic window)",
        current=1,
        in_flight=20,
        history=[1] * 55 + [20] * 5,
        desired=5,
    ),
    Row(
        "a burst beyond maxReplicas is capped and says so",
        current=2,
        in_flight=60,
        history=[60] * 60,
        desired=5,
        reason=Reason.MAX_REPLICAS,
    ),
    Row(
        "a lull keeps the higher recommendation during the scale-down delay",
        current=3,
        in_flight=4,
        history=[4] * 60,
        recommendations=[(5_000, 3)],
        desired=3,
        reason=Reason.SCALE_DOWN_DELAY,
    ),
    Row(
        "after the scale-down delay the lower recommendation wins",
        current=3,
        in_flight=4,
        history=[4] * 60,
        recommendations=[(15_000, 3)],
        desired=1,
    ),
    Row(
        "no scale-down while a replica is cold-starting",
        current=3,
        in_flight=4,
        starting=1,
        history=[4] * 60,
        desired=3,
        reason=Reason.COLD_START_IN_PROGRESS,
    ),
    Row(
        "cold-starting replicas do not block scaling up",
        current=1,
        in_flight=12,
        starting=1,
        history=[12] * 60,
        desired=3,
    ),
    Row(
        "idle but before the idle timeout: keep one replica",
        current=2,
        last_request_ago_ms=10_000,
        history=[0] * 60,
        desired=1,
        reason=Reason.WAITING_FOR_IDLE_TIMEOUT,
    ),
    Row(
        "idle past the idle timeout: scale to zero",
        current=2,
        last_request_ago_ms=30_000,
        history=[3] * 60,
        desired=0,
        reason=Reason.IDLE_TIMEOUT,
    ),
    Row(
        "past the idle timeout but a request is in flight: no scale to zero",
        current=1,
        in_flight=1,
        last_request_ago_ms=40_000,
        history=[1] * 60,
        desired=1,
    ),
    Row(
        "idle past the timeout while cold-starting: wait for the start to finish",
        current=1,
        starting=1,
        last_request_ago_ms=40_000,
        desired=1,
        reason=Reason.COLD_START_IN_PROGRESS,
    ),
    Row(
        "minReplicas keeps replicas warm when idle",
        current=2,
        last_request_ago_ms=100_000,
        policy=Policy(2, 5, 4, 30_000, 10_000),
        desired=2,
        reason=Reason.MIN_REPLICAS,
    ),
    Row(
        "minReplicas raises a low recommendation",
        current=2,
        in_flight=1,
        history=[1] * 60,
        policy=Policy(2, 5, 4, 30_000, 10_000),
        desired=2,
        reason=Reason.MIN_REPLICAS,
    ),
    Row(
        "idle timeout 0 scales to zero as soon as nothing is in flight",
        current=1,
        last_request_ago_ms=0,
        policy=Policy(0, 5, 4, 0, 10_000),
        desired=0,
        reason=Reason.IDLE_TIMEOUT,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_decide(row: Row) -> None:
    samples = [Sample(NOW - (len(row.history) - i) * 1000, c) for i, c in enumerate(row.history)]
    samples.append(Sample(NOW, row.in_flight + row.queued))
    recent = [Recommendation(NOW - ago, replicas) for ago, replicas in row.recommendations]
    obs = Observation(
        now_ms=NOW,
        current=row.current,
        starting=row.starting,
        in_flight=row.in_flight,
        queued=row.queued,
        last_request_ms=None if row.last_request_ago_ms is None else NOW - row.last_request_ago_ms,
    )
    decision = decide(row.policy, WINDOWS, obs, samples, recent)
    assert (decision.desired, decision.reason) == (row.desired, row.reason), decision


def test_max_replicas_decision_reports_what_demand_wanted() -> None:
    obs = Observation(NOW, current=5, starting=0, in_flight=40, queued=0, last_request_ms=NOW)
    decision = decide(POLICY, WINDOWS, obs, [Sample(NOW, 40)], [])
    assert decision == Decision(5, Reason.MAX_REPLICAS, 10)
    assert decision.limited_by_max


def test_history_keeps_only_its_windows_and_owns_the_scale_down_delay() -> None:
    policy = Policy(0, 10, 10, idle_timeout_ms=600_000, scale_down_delay_ms=5_000)
    windows = Windows(stable_ms=10_000, panic_ms=2_000)
    history = History()

    def tick(at_ms: int, in_flight: int) -> Decision:
        observation = Observation(at_ms, 1, 0, in_flight, 0, last_request_ms=at_ms)
        return history.decide(policy, windows, observation)

    assert tick(1_000, 50).desired == 5  # a burst: the panic window scales up at once
    for at in range(2_000, 5_001, 1_000):
        assert tick(at, 0).desired == 5, "the scale-down delay holds the burst's size"
    lower = tick(6_000, 0)
    assert lower.desired < 5 and lower.reason == Reason.SCALE_DOWN_DELAY
    for at in range(7_000, 40_001, 1_000):
        last = tick(at, 0)
    assert (last.desired, last.reason) == (1, Reason.WAITING_FOR_IDLE_TIMEOUT)
    # Only the windows are kept: the stable window's samples, the delay's recommendations.
    assert [s.at_ms for s in history.samples] == list(range(31_000, 40_001, 1_000))
    assert [r.at_ms for r in history.recommendations] == list(range(36_000, 40_001, 1_000))

    restarted = History()
    restarted.seed(100_000, 3)
    quiet = Observation(100_500, 3, 0, 0, 0, last_request_ms=100_000)
    assert restarted.decide(policy, windows, quiet).desired == 3, "a restart keeps a warm size"


@pytest.mark.parametrize(
    ("current", "in_flight", "expected"),
    [
        ({"a": 0, "b": 0}, {}, {}),
        ({"a": 0, "b": 0}, {"b": 3}, {"b": 3}),
        ({"a": 0, "b": 3}, {"b": 3}, {}),  # unchanged: no patch
        ({"a": 2, "b": 0}, {"b": 1}, {"b": 1, "a": 0}),  # a stale cost is cleared
        ({"a": 0}, {"gone": 4}, {}),  # only serving pods get a cost
        ({"a": 0}, {"a": 10**9}, {"a": MAX_DELETION_COST}),
    ],
)
def test_deletion_costs_are_requests_in_flight_set_only_where_they_change(
    current: dict[str, int], in_flight: dict[str, int], expected: dict[str, int]
) -> None:
    assert deletion_costs(current, in_flight) == expected


def test_deletion_costs_set_per_scale_down_are_bounded_busiest_first() -> None:
    pods = MAX_COST_PATCHES + 50
    current = {f"p{i:04}": 7 for i in range(pods)}  # all stale...
    busy = {f"p{i:04}": 1 + i % 3 for i in range(0, pods, 2)}  # ...half of them busy now
    changes = deletion_costs(current, busy)
    assert len(changes) == MAX_COST_PATCHES
    busy_first = sorted(
        ((cost, pod) for pod, cost in {p: busy.get(p, 0) for p in current}.items()),
        key=lambda change: (-change[0], change[1]),
    )
    assert list(changes.items()) == [(pod, cost) for cost, pod in busy_first][:MAX_COST_PATCHES]
    assert set(busy) <= set(changes), "every busy pod is marked before a stale cost clears"
