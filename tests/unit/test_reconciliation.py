"""The per-GPU reconciliation's pure parts: the agent's split adds up on every GPU and
report and tiles each GPU's timeline; the operator's node/window objects gain each report
exactly once and stay bounded; ``payper reconcile`` compares them with the records; and
the unmetered-capacity rule."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from payper.api.billing_record import BillingRecord
from payper.api.reconciliation import MAX_AGENTS, MAX_GPUS, OTHER_GPU
from payper.api.usage import GpuTime, SeriesUsage, UsageReport, adds_up
from payper.billing import reconcile_report, reconciliation
from payper.billing.events import BillingEvents
from payper.billing.flush import BillingWindows, Observations, plan
from payper.operator.capacity import GpuPod, unmetered
from payper_agent import reporting
from payper_agent.backends import Gpu, ProcessSample, Unmetered
from payper_agent.meter import KnownPids, Meter, SeriesIdentity, restore, snapshot
from payper_agent.simulated import Intervals, SimProcess, SimulatedBackend, fake_gpus

S = 1_000_000


def row(gpu: str = "GPU-0", **us: int) -> GpuTime:
    fields = {"wall_us": 0, "attributed_us": 0, "unattributed_us": 0, "unmetered_us": 0}
    fields |= us
    rest = fields["wall_us"] - sum(v for k, v in fields.items() if k != "wall_us")
    return GpuTime(
        gpu=gpu, gpu_product="H100", idle_us=max(0, rest), excess_us=max(0, -rest), **fields
    )


def test_a_split_that_does_not_add_up_is_refused() -> None:
    with pytest.raises(ValidationError, match="must equal"):
        GpuTime(gpu="g", gpu_product="p", wall_us=10, attributed_us=3, idle_us=6)
    with pytest.raises(ValidationError, match="must equal"):
        GpuTime(gpu="g", gpu_product="p", wall_us=10, attributed_us=11, idle_us=1, excess_us=2)
    assert adds_up(GpuTime(gpu="g", gpu_product="p", wall_us=10, attributed_us=12, excess_us=2))


class _Flaky(SimulatedBackend):
    """The simulated driver, with GPUs that cannot be metered in some polls."""

    unmetered: set[str]

    def utilization(self, gpu: Gpu, last_seen_us: int) -> list[ProcessSample]:
        if gpu.uuid in self.unmetered:
            raise Unmetered(gpu.uuid)
        return super().utilization(gpu, last_seen_us)


@settings(max_examples=60, deadline=None)
@given(
    busy=st.lists(
        st.tuples(
            st.integers(0, 3),  # pid (3: a process in no pod)
            st.integers(0, 1),  # gpu
            st.integers(0, 60_000),  # start ms
            st.integers(1, 8_000),  # length ms
        ),
        max_size=12,
    ),
    steps=st.lists(st.sampled_from([1000, 1000, 1000, 250, 7000, 20_000]), min_size=5, max_size=40),
    unmetered_at=st.sets(st.integers(0, 39), max_size=4),
    cut_every=st.integers(1, 10),
)
def test_per_gpu_split_adds_up_and_tiles_each_gpu_timeline(
    busy: list[tuple[int, int, int, int]],
    steps: list[int],
    unmetered_at: set[int],
    cut_every: int,
) -> None:
    backend = _Flaky(fake_gpus("node", 2, "H100"))
    backend.unmetered = set()
    gpus = backend.gpus()
    pods = {
        pid: SeriesIdentity("ns", f"pod-{pid}", f"uid-{pid}", "server", "m") for pid in (0, 1, 2)
    }
    for pid, gpu, start, length in busy:
        process = backend.processes.get(pid) or SimProcess(pid, gpus[gpu].uuid, Intervals(), None)
        if process.gpu == gpus[gpu].uuid:
            process.busy.add(start * 1000, (start + length) * 1000)
        backend.processes[pid] = process
    meter = Meter(KnownPids(pods), max_period_us=5 * S)
    reports: list[UsageReport] = []
    first: dict[str, int] = {}
    for index, step in enumerate(steps):
        backend.clock_us += step * 1000
        backend.unmetered = {gpus[0].uuid} if index in unmetered_at else set()
        meter.poll(backend)
        for gpu in gpus:
            first.setdefault(gpu.uuid, meter.last_seen_us[gpu.uuid])
        if index % cut_every == 0:
            if index % 3 == 0:  # the agent restarts from its checkpoint now and then
                restarted = Meter(meter.resolver, max_period_us=5 * S)
                restore(restarted, snapshot(meter))
                meter = restarted
            reports.append(reporting.cut(meter, "a", len(reports) + 1, "node", 0, 0))
    reports.append(reporting.cut(meter, "a", len(reports) + 1, "node", 0, 0))
    sharing: dict[str, int] = {}
    for process in backend.processes.values():
        sharing[process.gpu] = sharing.get(process.gpu, 0) + 1
    for report in reports:
        attributed: dict[str, int] = {}
        for series in report.series:
            attributed[series.gpu] = attributed.get(series.gpu, 0) + series.active_us
        for gpu_time in report.gpus:
            assert adds_up(gpu_time)
            assert gpu_time.attributed_us == attributed.pop(gpu_time.gpu, 0)
            if sharing.get(gpu_time.gpu, 0) <= 1:  # overlapping processes may exceed
                assert gpu_time.excess_us == 0, "one process on a GPU never exceeds its wall"
        assert not attributed, "every series' time is in a GPU's row"
    for gpu in gpus:
        wall = sum(t.wall_us for r in reports for t in r.gpus if t.gpu == gpu.uuid)
        assert wall == meter.last_seen_us[gpu.uuid] - first[gpu.uuid], "no gap, no overlap"
    truth = sum(s.total_x100 // 100 for s in meter.series.values())
    assert sum(t.attributed_us for r in reports for t in r.gpus) == truth
    # Node-wide and per GPU, each carries its sub-microsecond remainder: apart by < 1 µs a GPU.
    per_gpu = sum(t.unattributed_us for r in reports for t in r.gpus)
    assert 0 <= sum(r.unattributed_us for r in reports) - per_gpu < len(gpus)


def test_an_unmetered_gpu_and_a_long_gap_are_unmetered_time() -> None:
    backend = _Flaky(fake_gpus("node", 1, "H100"))
    backend.unmetered = set()
    meter = Meter(KnownPids({}), max_period_us=5 * S)
    meter.poll(backend)  # first sight at 0
    backend.clock_us = 60 * S  # a minute later: at most 5 s of it metered
    meter.poll(backend)
    backend.unmetered = {"GPU-node-0"}
    backend.clock_us = 70 * S
    meter.poll(backend)
    (gpu_time,) = reporting.cut(meter, "a", 1, "node", 0, 0).gpus
    assert (gpu_time.wall_us, gpu_time.unmetered_us, gpu_time.idle_us) == (70 * S, 65 * S, 5 * S)


def test_a_node_with_gpus_reports_its_idle_time() -> None:
    backend = SimulatedBackend(fake_gpus("node", 2, "H100"))
    meter = Meter(KnownPids({}))
    for second in range(11):
        backend.clock_us = second * S
        meter.poll(backend)
    report = reporting.cut(meter, "a", 1, "node", 0, 10_000)
    assert [(t.gpu, t.wall_us, t.idle_us) for t in report.gpus] == [
        ("GPU-node-0", 10 * S, 10 * S),
        ("GPU-node-1", 10 * S, 10 * S),
    ]
    assert not reporting.cut(meter, "a", 2, "node", 10_000, 20_000).gpus


# -- the operator's objects ---------------------------------------------------------------

WINDOWS = BillingWindows(window_ms=3_600_000, grace_ms=300_000)
NOW = 10 * 3_600_000 + 60_000


def report(sequence: int, agent: str = "a", node: str = "n1", **usage: int) -> UsageReport:
    active = usage.pop("active_us", 0)
    series = []
    if active:
        series.append(
            SeriesUsage(
                namespace="ns",
                pod="p",
                pod_uid="uid",
                container="c",
                gpu="GPU-0",
                gpu_product="H100",
                inference_deployment="m",
                active_us=active,
            )
        )
    return UsageReport(
        agent_id=agent,
        sequence=sequence,
        node=node,
        interval_start_ms=NOW - 20_000,
        interval_end_ms=NOW - 10_000,
        series=series,
        gpus=[row(attributed_us=active, wall_us=10 * S, **usage)],
    )


def _observations() -> Observations:
    """The operator sees the reports' pod on their node."""
    return Observations(BillingEvents(), {}, {}, {}, {}, pod_nodes={"uid": "n1"})


def test_objects_gain_acknowledged_reports_once_with_what_the_records_got() -> None:
    reports = [report(1, active_us=2 * S), report(2, active_us=3 * S, unattributed_us=S)]
    planned = plan(reports, {}, _observations(), WINDOWS, NOW)
    (record_key,) = planned.changes
    # Report 2's record failed: only report 1 is acknowledged, so only it is added.
    grouped = reconciliation.collect(planned, {"n1/a": 1}, set(), WINDOWS, NOW)
    (target,) = grouped.values()
    assert target.window_start_ms == 10 * 3_600_000
    assert [(r.sequence, r.in_records_us) for r in target.reports] == [(1, 2 * S)]
    stored = reconciliation.empty("n1", target.window_start_ms, WINDOWS.window_ms)
    stored, new = reconciliation.merge(stored, target.reports, NOW)
    assert len(new) == 1 and stored.attributed_in_records_us == 2 * S
    # Both acknowledged next time; report 1 again is a resend: added once only.
    grouped = reconciliation.collect(planned, {"n1/a": 2}, set(), WINDOWS, NOW)
    stored, new = reconciliation.merge(stored, next(iter(grouped.values())).reports, NOW)
    assert [r.sequence for r in new] == [2]
    (gpu,) = stored.gpus
    assert (gpu.wall_us, gpu.attributed_us, gpu.unattributed_us, gpu.idle_us) == (
        20 * S,
        5 * S,
        S,
        14 * S,
    )
    assert stored.attributed_in_records_us == 5 * S and stored.reports == 2
    assert stored.last_applied_sequence == {"n1/a": 2}
    # A dead-lettered record's usage is attributed, but not in the records.
    grouped = reconciliation.collect(planned, {"n1/a": 2}, {record_key}, WINDOWS, NOW)
    assert {r.in_records_us for r in next(iter(grouped.values())).reports} == {0}


def test_late_usage_goes_to_the_current_windows_object_like_the_records() -> None:
    late = report(1, active_us=S).model_copy(
        update={"interval_start_ms": NOW - 3 * 3_600_000, "interval_end_ms": NOW - 3 * 3_600_000}
    )
    planned = plan([late], {}, _observations(), WINDOWS, NOW)
    ((_, window),) = reconciliation.collect(planned, {"n1/a": 1}, set(), WINDOWS, NOW)
    assert window == 10 * 3_600_000 == next(iter(planned.changes)).window_start_ms


def test_objects_stay_bounded_in_gpus_and_agents_with_sums_kept() -> None:
    stored = reconciliation.empty("n1", 0, WINDOWS.window_ms)
    times = [
        reconciliation.ReportTimes(
            f"n1/agent-{i}",
            1,
            tuple(row(f"GPU-{i:03d}-{j}", wall_us=S, attributed_us=j) for j in range(2)),
            0,
        )
        for i in range(MAX_AGENTS + 6)
    ]
    stored, new = reconciliation.merge(stored, times, 0)
    assert len(new) == MAX_AGENTS + 6
    assert len(stored.last_applied_sequence) == MAX_AGENTS
    assert stored.forgotten_agents == 6
    assert len(stored.gpus) == MAX_GPUS and stored.gpus[-1].gpu == OTHER_GPU
    assert sum(g.wall_us for g in stored.gpus) == 2 * (MAX_AGENTS + 6) * S
    assert sum(g.attributed_us for g in stored.gpus) == MAX_AGENTS + 6
    assert all(adds_up(g) for g in stored.gpus)
    assert len(stored.model_dump_json(by_alias=True)) < 64_000
    # Agents whose reports the ledger has saved as applied are forgotten first: nothing
    # in flight is forgotten however many agent ids come and go.
    durable = {t.agent: 1 for t in times}
    more = [reconciliation.ReportTimes("n1/fresh", 1, (row(wall_us=S),), 0)]
    stored, new = reconciliation.merge(stored, more, 0, durable)
    assert stored.last_applied_sequence == {"n1/fresh": 1}
    assert stored.forgotten_agents == 6, "none forgotten that was still needed"


def _record(active_us: int, window_start: datetime) -> BillingRecord:
    return BillingRecord.model_validate(
        {
            "apiVersion": "payper.dev/v1alpha1",
            "kind": "BillingRecord",
            "metadata": {"name": "r", "namespace": "ns"},
            "spec": {
                "inferenceDeployment": "m",
                "account": "ns",
                "window": {"start": window_start, "end": window_start.replace(hour=11)},
                "plan": "default",
                "granularity": "1s",
                "currency": "USD",
                "pricePerGpuSecond": "0.001",
                "reservedPricePerGpuHour": "2",
                "gpuProduct": "H100",
            },
            "status": {"activeUs": active_us},
        }
    )


def test_reconcile_compares_the_objects_with_the_records_of_the_same_windows() -> None:
    start = datetime(2026, 1, 1, 10, tzinfo=UTC)
    ms = int(start.timestamp() * 1000)
    stored = reconciliation.empty("n1", ms, WINDOWS.window_ms)
    times = reconciliation.ReportTimes(
        "n1/a", 1, (row(wall_us=10 * S, attributed_us=4 * S),), 4 * S
    )
    stored, _ = reconciliation.merge(stored, [times], ms)
    result = reconcile_report.build([stored], [_record(4 * S, start)])
    assert result.records_match and result.ok
    table = reconcile_report.as_table(result)
    assert "GPU-0" in table and "4.000000" in table and "adds up: yes" in table
    assert "BillingRecords of these windows: active 4.000000 s" in table
    wrong = reconcile_report.build([stored], [_record(4 * S + 1, start)])
    assert wrong.records_match is False and not wrong.ok
    assert "DIFFER by 0.000001 s" in reconcile_report.as_table(wrong)
    outside = reconcile_report.build([stored], [_record(4 * S, start)], start_ms=ms + 1)
    assert outside.nodes == {} and outside.records_active_us == 0 and outside.ok


def test_a_node_with_gpu_pods_and_no_reports_is_unmetered_capacity() -> None:
    after = 60_000
    now = 1_000_000
    pods = {
        "a": GpuPod("quiet", 2, 0),
        "b": GpuPod("quiet", 1, 0),
        "c": GpuPod("metered", 4, 0),
        "d": GpuPod("new", 1, now - 1000),  # just placed: not yet
    }
    reported = {"metered": now - 5000}
    assert unmetered(pods, reported, 0, now, after) == {"quiet": 3}
    assert unmetered(pods, reported, now - 1000, now, after) == {}, "the operator just started"
