"""Busy servers are billed as they compute: whole units of g as they complete.

A burst of one container ends only after g of idleness; a server under steady load never
idles that long. Billed only when its burst closed, it showed active time and billed
nothing, hour after hour, until the load stopped: a tenant could defer its whole bill by
keeping one kernel running, and a lost node lost all of it. Now each whole unit is billed
in the poll it completes, the remainder rounded up when the burst ends: per burst still
``ceil(A / g) * g``, only sooner. Properties over random traffic (hypothesis).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from payper.api.billing_record import GRANULARITY_MS
from payper_agent.meter import KnownPids, Meter, Series, SeriesIdentity, restore, snapshot

IDENTITY = SeriesIdentity("ns", "pod", "uid-1", "server")
X100 = 100  # the meter counts percent-microseconds
SECOND = 1_000_000 * X100


def ceil_to(active_us: int, unit_ms: int) -> int:
    return -(-active_us // (unit_ms * 1000)) * unit_ms


def floor_to(active_us: int, unit_ms: int) -> int:
    return active_us // (unit_ms * 1000) * unit_ms


class Ledger:
    """What a series has billed so far (its reports' rounded time, summed)."""

    def __init__(self) -> None:
        self.billed = dict.fromkeys(GRANULARITY_MS, 0)

    def cut(self, series: Series) -> dict[str, int]:
        """A report: the rounded time since the last one (as ``reporting.cut`` takes it)."""
        taken = series.rounded_ms.to_wire()
        for name, ms in taken.items():
            self.billed[name] += ms
        series.rounded_ms = type(series.rounded_ms)()
        return taken


# A poll: busy for some microseconds (a poll is one second), or idle for whole polls.
polls = st.lists(
    st.one_of(
        st.tuples(st.just("busy"), st.integers(min_value=1, max_value=1_000_000)),
        st.tuples(st.just("idle"), st.integers(min_value=1, max_value=70)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(polls, st.integers(min_value=1, max_value=7))
def test_billed_time_stays_within_a_unit_of_active_time_and_each_burst_totals_its_ceiling(
    steps: list[tuple[str, int]], report_every: int
) -> None:
    series = Series(IDENTITY, "GPU-0", "H100")
    ledger = Ledger()
    closed = dict.fromkeys(GRANULARITY_MS, 0)
    """Per granularity: what the closed bursts must total (ceil of each)."""
    open_us = dict.fromkeys(GRANULARITY_MS, 0)
    for index, (kind, amount) in enumerate(steps):
        if kind == "busy":
            series.add_active(amount * X100)
            for name in open_us:
                open_us[name] += amount
        else:
            idle_ms = amount * 1000
            for name, unit in GRANULARITY_MS.items():
                if open_us[name] and idle_ms >= unit:
                    closed[name] += ceil_to(open_us[name], unit)
                    open_us[name] = 0
            series.close_bursts(idle_ms)
        if index % report_every == 0:
            ledger.cut(series)
        for name, unit in GRANULARITY_MS.items():
            # Reported so far, plus what waits for the next report.
            so_far = ledger.billed[name] + series.rounded_ms.at(name) - closed[name]
            assert floor_to(open_us[name], unit) <= so_far <= ceil_to(open_us[name], unit), name
    series.close_bursts()
    ledger.cut(series)
    for name, unit in GRANULARITY_MS.items():
        assert ledger.billed[name] == closed[name] + ceil_to(open_us[name], unit), name


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=100), st.sampled_from([60, 300, 3600]))
def test_a_server_never_idle_is_billed_each_window_its_own_time_within_one_unit(
    utilisation: int, window_s: int
) -> None:
    series = Series(IDENTITY, "GPU-0", "H100")
    ledger = Ledger()
    per_poll_us = utilisation * 10_000  # of a one-second poll
    for _ in range(3):  # three windows, busy every poll
        for _ in range(window_s):
            series.add_active(per_poll_us * X100)
        billed = ledger.cut(series)
        active_us = per_poll_us * window_s
        for name, unit in GRANULARITY_MS.items():
            assert abs(billed[name] - active_us / 1000) <= unit, (name, billed, active_us)
    assert series.in_burst, "never idle: the burst is still open"


def test_an_agent_restart_mid_burst_bills_no_unit_twice_and_loses_none() -> None:
    meter = Meter(KnownPids({}))
    series = Series(IDENTITY, "GPU-0", "H100")
    meter.series[series.key] = series
    series.add_active(90 * SECOND)  # 1 m: one unit complete, 30 s into the next
    assert series.rounded_ms.per_minute == 60_000
    series.rounded_ms = type(series.rounded_ms)()  # reported before the restart
    restarted = Meter(KnownPids({}))
    restore(restarted, snapshot(meter))
    [again] = restarted.series.values()
    again.add_active(20 * SECOND)  # 110 s: the second unit is not complete yet
    assert again.rounded_ms.per_minute == 0
    again.close_bursts()
    assert again.rounded_ms.per_minute == 60_000, "the burst totals two units, not three"


def test_a_checkpoint_from_before_units_were_billed_early_bills_its_open_burst_once() -> None:
    """The last release billed an open burst only when it closed, and its checkpoint has
    no ``openBilledMs``: the whole burst is billed once, as it would have been."""
    meter = Meter(KnownPids({}))
    series = Series(IDENTITY, "GPU-0", "H100")
    meter.series[series.key] = series
    series.add_active(90 * SECOND)
    series.rounded_ms = type(series.rounded_ms)()
    old = snapshot(meter)
    for item in old["series"]:  # as the last release wrote it: the whole open burst
        item["openX100"] = dict.fromkeys(item["openX100"], 90 * SECOND)
        del item["openBilledMs"]
    restarted = Meter(KnownPids({}))
    restore(restarted, old)
    [again] = restarted.series.values()
    again.close_bursts()
    assert again.rounded_ms.per_minute == 120_000


def test_an_agent_rolled_back_to_the_last_release_bills_only_the_rest_of_an_open_burst() -> None:
    """The last release reads ``openX100`` alone and rounds it up when the burst ends: the
    checkpoint holds there what is not billed yet, so a rollback never bills a completed
    unit twice."""
    meter = Meter(KnownPids({}))
    series = Series(IDENTITY, "GPU-0", "H100")
    meter.series[series.key] = series
    series.add_active(150 * SECOND)  # two 1 min units billed, 30 s open
    assert series.rounded_ms.per_minute == 120_000
    [item] = snapshot(meter)["series"]
    left_us = item["openX100"]["1m"] // X100
    assert left_us == 30_000_000, "what a last-release agent would still round up"
    billed_by_old_agent_at_close = -(-left_us // 60_000_000) * 60_000
    assert series.rounded_ms.per_minute + billed_by_old_agent_at_close == 180_000
