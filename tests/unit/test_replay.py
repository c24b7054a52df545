"""Replay accuracy: the meter against the truth of known busy intervals.

Truth is the sum of the busy intervals; rounded truth rounds each burst up. The driver
(simulated) reports integer percents per 1 s poll, so a single poll can be off by up to
5 ms; over many bursts with random phases these errors cancel, and the acceptance bound
is 1 % of the total. Bursts are separated by idle gaps of at least two polls, and their
lengths stay clear of granularity boundaries by more than the quantization, so the
rounded counters must match the truth exactly.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payper.api.billing_record import GRANULARITY_MS
from payper_agent import replay
from payper_agent.meter import round_up_ms

POLL_MS = 1000


def scenario(processes: list[dict[str, Any]], duration_ms: int, gpus: int = 1) -> replay.Scenario:
    return replay.Scenario.model_validate(
        {
            "pollIntervalMs": POLL_MS,
            "durationMs": duration_ms,
            "gpus": [{"uuid": f"GPU-{i}", "product": "NVIDIA H100 80GB HBM3"} for i in range(gpus)],
            "processes": processes,
        }
    )


def pod(name: str) -> dict[str, str]:
    return {"namespace": "team-a", "name": name, "uid": f"uid-{name}", "container": "server"}


def duty_cycle(rng: random.Random, burst_ms: int, duty: float, count: int) -> list[list[int]]:
    """``count`` bursts of ``burst_ms`` with random phases, the given duty cycle overall."""
    period = int(burst_ms / duty)
    gap = max(period - burst_ms, 2 * POLL_MS + 1)  # at least two idle polls between bursts
    intervals, t = [], rng.randrange(0, POLL_MS)
    for _ in range(count):
        intervals.append([t, t + burst_ms])
        t += burst_ms + gap + rng.randrange(0, 200)
    return intervals


def bursts_at(intervals: list[list[int]], granularity_ms: int) -> list[int]:
    """Active ms of each burst at a granularity: intervals closer than it share a burst
    (the scenarios keep every gap a few polls away from each granularity)."""
    bursts: list[int] = []
    last_end: int | None = None
    for start, end in intervals:
        if last_end is not None and start - last_end < granularity_ms:
            bursts[-1] += end - start
        else:
            bursts.append(end - start)
        last_end = end
    return bursts


def burst_spans(intervals: list[list[int]], granularity_ms: int) -> list[tuple[int, int]]:
    """[first, last] ms of each burst at a granularity (intervals closer than it share)."""
    spans: list[tuple[int, int]] = []
    for start, end in intervals:
        if spans and start - spans[-1][1] < granularity_ms:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def truth(intervals: list[list[int]]) -> tuple[int, dict[str, int]]:
    active = sum(end - start for start, end in intervals)
    rounded = {
        name: sum(round_up_ms(ms * 1000, g) for ms in bursts_at(intervals, g))
        for name, g in GRANULARITY_MS.items()
    }
    return active, rounded


CASES = [
    # burst ms, duty cycle, bursts
    (100, 0.01, 120),
    (100, 0.25, 200),
    (250, 0.05, 150),
    (1_500, 0.10, 60),
    (2_500, 0.50, 60),
    (12_300, 0.30, 20),
    (95_300, 0.60, 6),
    (150_500, 0.99, 4),
]


@pytest.mark.parametrize(
    ("burst_ms", "duty", "count"), CASES, ids=[f"{b}ms-{int(d * 100)}%" for b, d, _ in CASES]
)
def test_active_time_and_rounded_counters_match_the_truth(
    burst_ms: int, duty: float, count: int
) -> None:
    rng = random.Random(burst_ms * 1000 + count)
    intervals = duty_cycle(rng, burst_ms, duty, count)
    end = intervals[-1][1] + 3 * POLL_MS
    result = replay.run(
        scenario([{"pid": 10, "gpu": "GPU-0", "pod": pod("p"), "busy": intervals}], end)
    )
    (container,) = result["containers"]
    active, rounded = truth(intervals)
    assert abs(container["activeMs"] - active) <= 0.01 * active, (container["activeMs"], active)
    assert container["bursts"] == count
    assert container["roundedMs"]["1s"] == rounded["1s"]
    assert container["roundedMs"]["1m"] == rounded["1m"]
    assert abs(container["roundedMs"]["1ms"] - rounded["1ms"]) <= 0.01 * rounded["1ms"]
    assert result["unattributedMs"] == 0


def test_processes_time_slicing_one_gpu_and_several_gpus() -> None:
    rng = random.Random(7)
    a = duty_cycle(rng, 400, 0.2, 80)
    b = duty_cycle(rng, 700, 0.3, 50)
    c = duty_cycle(rng, 3_300, 0.5, 20)
    processes = [
        {"pid": 1, "gpu": "GPU-0", "pod": pod("a"), "busy": a},
        {"pid": 2, "gpu": "GPU-0", "pod": pod("b"), "busy": b},
        {"pid": 3, "gpu": "GPU-1", "pod": pod("c"), "busy": c},
        {"pid": 4, "gpu": "GPU-1", "busy": [[1_000, 6_000]]},
    ]
    end = max(x[-1][1] for x in (a, b, c)) + 3 * POLL_MS
    result = replay.run(scenario(processes, end, gpus=2))
    by_pod = {c["pod"]: c for c in result["containers"]}
    for name, intervals, gpu in (("a", a, "GPU-0"), ("b", b, "GPU-0"), ("c", c, "GPU-1")):
        active, rounded = truth(intervals)
        assert by_pod[name]["gpu"] == gpu
        assert abs(by_pod[name]["activeMs"] - active) <= 0.01 * active
        assert by_pod[name]["roundedMs"]["1s"] == rounded["1s"]
    assert result["unattributedMs"] == 5_000


def test_the_example_from_the_docs(tmp_path: Path) -> None:
    path = tmp_path / "scenario.json"
    path.write_text(
        json.dumps(
            {
                "pollIntervalMs": 1000,
                "durationMs": 600000,
                "gpus": [{"uuid": "GPU-1b2c", "product": "NVIDIA H100 80GB HBM3"}],
                "processes": [
                    {
                        "pid": 4242,
                        "gpu": "GPU-1b2c",
                        "pod": {
                            "namespace": "team-a",
                            "name": "llama-7d9f",
                            "uid": "0f7c",
                            "container": "server",
                        },
                        "busy": [[1000, 1200], [5000, 7500]],
                    }
                ],
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "payper_agent.main", "replay", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == {
        "containers": [
            {
                "namespace": "team-a",
                "pod": "llama-7d9f",
                "container": "server",
                "gpu": "GPU-1b2c",
                "activeMs": 2700,
                "bursts": 2,
                # 200 ms and 2.5 s, 3.8 s apart: two bursts at 1 ms and 1 s, one at 1 min.
                "roundedMs": {"1ms": 2700, "1s": 4000, "1m": 60000},
            }
        ],
        "unattributedMs": 0,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gpus": []}, "gpus"),
        ({"processes": [{"pid": 1, "gpu": "GPU-x", "busy": []}]}, "processes[0].gpu"),
        ({"processes": [{"pid": 1, "gpu": "GPU-0", "busy": [[5, 2]]}]}, "busy[0]"),
        ({"durationMs": 0}, "durationMs"),
        ({"pollIntervalMs": "fast"}, "pollIntervalMs"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_scenarios_name_the_field(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    base = {
        "pollIntervalMs": 1000,
        "durationMs": 1000,
        "gpus": [{"uuid": "GPU-0", "product": "x"}],
        "processes": [],
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**base, **change}))
    with pytest.raises(replay.ScenarioError) as error:
        replay.load(path)
    assert message in str(error.value)
    result = subprocess.run(
        [sys.executable, "-m", "payper_agent.main", "replay", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr


@st.composite
def busy_intervals(draw: st.DrawFn) -> list[list[int]]:
    """Requests of 20 ms to 90 s (shorter ones are below the driver's 1 % resolution of
    a 1 s sample), with idle gaps of 1 ms to 3 minutes, over up to ~20 minutes."""
    intervals, t = [], draw(st.integers(POLL_MS, 6_000))
    for _ in range(draw(st.integers(1, 12))):
        length = draw(st.integers(20, 90_000))
        intervals.append([t, t + length])
        t += length + draw(st.integers(1, 180_000))
    return intervals


@settings(max_examples=60, deadline=None, derandomize=True)
@given(busy_intervals())
def test_a_series_is_never_billed_more_than_its_wall_clock_time_plus_one_unit(
    intervals: list[list[int]],
) -> None:
    """The rounding rule's promise, at every granularity: a burst ends only after a unit
    of idleness, so the units billed cover the wall-clock span of the work plus at most
    one unit (and the meter's view of that span extends by at most a poll each side)."""
    end = intervals[-1][1] + 2 * 60_000 + 3 * POLL_MS
    result = replay.run(
        scenario([{"pid": 10, "gpu": "GPU-0", "pod": pod("p"), "busy": intervals}], end)
    )
    (container,) = result["containers"]
    span_ms = intervals[-1][1] - intervals[0][0]
    for name, unit_ms in GRANULARITY_MS.items():
        billed = container["roundedMs"][name]
        assert billed <= span_ms + 2 * POLL_MS + unit_ms, (name, billed, span_ms)
        assert billed >= container["activeMs"] - 10, "never less than the active time"
        assert billed % unit_ms == 0
    # A lone request still pays a whole unit at each granularity (the seed's example).
    if len(intervals) == 1 and intervals[0][1] - intervals[0][0] <= 1_000:
        assert container["roundedMs"]["1m"] == 60_000


def test_a_server_busy_across_windows_is_billed_in_each_window_as_it_computed() -> None:
    """150 s without a pause, windows of 60 s, reports every 10 s: each window bills its
    own time (the 1 min burst's units as they complete, the remainder when it ends in the
    last window), and the windows add up to the totals."""
    busy = [[0, 150_000]]
    result = replay.run(
        scenario([{"pid": 10, "gpu": "GPU-0", "pod": pod("p"), "busy": busy}], 170_000),
        window_seconds=60,
        report_interval_ms=10_000,
    )
    [row] = result["containers"]
    windows = row["windows"]
    assert [w["startMs"] for w in windows] == [0, 60_000, 120_000]
    assert [w["roundedMs"]["1m"] for w in windows] == [60_000, 60_000, 60_000]
    assert [w["roundedMs"]["1s"] for w in windows] == [60_000, 60_000, 30_000]
    assert [w["activeMs"] for w in windows] == [60_000, 60_000, 30_000]
    for name in GRANULARITY_MS:
        assert sum(w["roundedMs"][name] for w in windows) == row["roundedMs"][name]
    assert sum(w["activeMs"] for w in windows) == row["activeMs"]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(busy_intervals(), st.sampled_from([(60, 10_000), (120, 30_000), (60, 60_000)]))
def test_windows_add_up_to_the_totals_and_bill_no_more_than_their_time_plus_a_unit_a_burst(
    intervals: list[list[int]], window: tuple[int, int]
) -> None:
    window_s, report_ms = window
    end = intervals[-1][1] + 2 * 60_000 + 3 * POLL_MS
    result = replay.run(
        scenario([{"pid": 10, "gpu": "GPU-0", "pod": pod("p"), "busy": intervals}], end),
        window_seconds=window_s,
        report_interval_ms=report_ms,
    )
    [row] = result["containers"]
    windows = row["windows"]
    assert len(windows) == -(-end // (window_s * 1000)), "every window, empty ones included"
    assert sum(w["activeMs"] for w in windows) == row["activeMs"]
    for name, unit in GRANULARITY_MS.items():
        assert sum(w["roundedMs"][name] for w in windows) == row["roundedMs"][name]
        spans = burst_spans(intervals, unit)
        for w in windows:
            # Billed in a window: its own active time, plus at most one unit per burst
            # open at its start or ending in it (a burst ends up to a unit and a report
            # after its last work), and a poll of the driver's quantization per report.
            reach = unit + report_ms + 2 * POLL_MS
            start, stop = w["startMs"] - reach, w["startMs"] + window_s * 1000 + reach
            touching = sum(1 for first, last in spans if first < stop and last > start)
            assert w["roundedMs"][name] <= w["activeMs"] + unit * touching + POLL_MS, (name, w)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--help"], 0, "--window-seconds"),
        (["--window-seconds", "60", "--report-interval-ms", "7000", "x.json"], 2, "divide"),
        (["--report-interval-ms", "0", "x.json"], 2, "at least 1"),
        ([], 2, "scenario"),
    ],
)
def test_replay_help_and_bad_options(args: list[str], code: int, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "payper_agent.main", "replay", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == code, result.stderr
    assert message in result.stdout + result.stderr
