"""Cold-start phases (pure): marks from what the pod watch shows, the kubelet's pull time
from its Pulled event message, and the gateway's total for the last phase."""

from __future__ import annotations

from typing import Any

import pytest

from payper.observed import PodView
from payper.operator.coldstart import (
    MAX_TRACKED_PODS,
    ColdStart,
    FinishedColdStart,
    go_duration_ms,
    pull_ms,
)

HELD = 1_000_000


def pod(uid: str = "u1", *, created: int = HELD, **status: Any) -> PodView:
    return PodView(
        name=f"llm-{uid}",
        uid=uid,
        created_ms=created,
        ready=status.get("ready", False),
        unschedulable=None,
        node=status.get("node"),
        started=status.get("started", False),
        ip="10.0.0.1" if status.get("ready") else None,
    )


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("532ms", 532),
        ("1.5s", 1500),
        ("2m3.25s", 123_250),
        ("1h", 3_600_000),
        ("750µs", 1),
        ("1.2345s", 1235),  # halves up
        ("", None),
        ("5 s", None),
        ("1.5sx", None),
    ],
)
def test_go_durations(text: str, ms: int | None) -> None:
    assert go_duration_ms(text) == ms


def test_the_kubelets_pulled_messages() -> None:
    assert (
        pull_ms(
            'Successfully pulled image "127.0.0.1:5000/payper/model-server:0.1.0" in 1.234s '
            "(1.234s including waiting). Image size: 64812345 bytes."
        )
        == 1234
    )
    assert pull_ms('Successfully pulled image "x" in 812ms (2.1s including waiting)') == 812
    assert pull_ms('Container image "x" already present on machine') == 0
    assert pull_ms("Pulling image x") is None


def test_marks_come_from_the_first_time_the_watch_shows_each() -> None:
    trace = ColdStart(HELD)
    trace.observe(pod(), HELD + 40)  # created
    trace.observe(pod(node="n1"), HELD + 90)  # scheduled
    trace.observe(pod(node="n1"), HELD + 95)  # nothing new
    trace.observe(pod(node="n1", started=True), HELD + 2_090)
    marks = trace.observe(pod(node="n1", started=True, ready=True), HELD + 3_590)
    assert marks is not None and marks.ready_ms == HELD + 3_590
    finished = FinishedColdStart.of(trace, pod(node="n1", started=True, ready=True))
    assert finished.held_to_ready_ms == 3_590
    assert finished.phases == {
        "create": 40,
        "schedule": 50,
        "image": None,  # not known yet: the kubelet's event decides
        "start": 2_000,
        "ready": 1_500,
        "forward": None,
    }
    finished.add_pull(1_200)
    assert (finished.phases["image"], finished.phases["start"]) == (1_200, 800)
    finished.add_forward(3_650)  # the gateway's total: 60 ms to learn and forward
    assert finished.phases["forward"] == 60
    assert sum(v for v in finished.phases.values() if v is not None) == 3_650


def test_a_pull_longer_than_its_span_and_a_gateway_total_shorter_than_ready() -> None:
    trace = ColdStart(HELD)
    for status in ({}, {"node": "n"}, {"node": "n", "started": True}):
        trace.observe(pod(**status), HELD + 100)
    trace.observe(pod(node="n", started=True, ready=True), HELD + 200)
    finished = FinishedColdStart.of(trace, pod(node="n", started=True, ready=True))
    finished.add_pull(5_000)  # measured by another clock, rounded: never beyond its span
    assert (finished.phases["image"], finished.phases["start"]) == (0, 0)
    finished.add_forward(150)  # never negative
    assert finished.phases["forward"] == 0


def test_pods_from_before_the_decision_and_beyond_the_bound_are_not_followed() -> None:
    trace = ColdStart(HELD)
    assert trace.observe(pod("old", created=HELD - 60_000), HELD + 1) is None
    for i in range(MAX_TRACKED_PODS):
        assert trace.observe(pod(f"p{i}"), HELD + 1) is not None
    assert trace.observe(pod("one-too-many"), HELD + 1) is None
    assert len(trace.pods) == MAX_TRACKED_PODS
