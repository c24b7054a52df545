"""PID -> container resolution across polls: cached while a process runs, never reused.

The kernel hands an exited process's PID to a later one; its GPU time must go to the
new process's pod, not to the pod the PID belonged to before.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from payper.api.inference_deployment import POD_LABEL
from payper_agent import metrics, reporting
from payper_agent.backends import Gpu, ProcessSample
from payper_agent.meter import EXITED_PID_POLLS, Meter, SeriesIdentity, restore, snapshot
from payper_agent.pods import PidResolver, PodIndex
from payper_agent.simulated import Intervals, SimProcess, SimulatedBackend, cgroup_line, fake_gpus

PID = 42
UIDS = {"a": "0e7c5a52-1111-4222-8333-44445555aaaa", "b": "0e7c5a52-1111-4222-8333-44445555bbbb"}


def _pod(name: str) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": name,
            "uid": UIDS[name],
            "labels": {POD_LABEL: "m"},
        },
        "spec": {"containers": [{"name": "server"}]},
    }


def test_a_reused_pid_is_billed_to_its_new_pod_and_parsed_once_per_process() -> None:
    pods = PodIndex()
    for name in ("a", "b"):
        pods.upsert(_pod(name))
    backend = SimulatedBackend(fake_gpus("node", 1, "H100"))
    (gpu,) = backend.gpus()
    reads: list[int] = []

    def cgroup_of(pid: int) -> str | None:
        reads.append(pid)
        return backend.cgroup(pid)

    meter = Meter(PidResolver(cgroup_of, pods))

    def poll_at(*seconds: int) -> None:
        for second in seconds:
            backend.clock_us = second * 1_000_000
            meter.poll(backend)

    def busy(pod: str, start_s: int, end_s: int) -> None:
        intervals = Intervals()
        intervals.add(start_s * 1_000_000, end_s * 1_000_000)
        backend.processes[PID] = SimProcess(
            PID, gpu.uuid, intervals, cgroup_line(UIDS[pod], "server")
        )

    busy("a", 0, 3)
    poll_at(0, 1, 2, 3)
    del backend.processes[PID]  # it exits
    poll_at(4)
    busy("b", 4, 7)  # the kernel gives the same PID to a process of pod b
    poll_at(5, 6, 7)
    active_us = {s.identity.pod: s.total_x100 // 100 for s in meter.series.values()}
    assert active_us == {"a": 3_000_000, "b": 3_000_000}
    assert reads == [PID, PID], "one cgroup read per process, not per sample"


def test_a_label_no_deployment_can_be_called_is_sanitised_not_fatal() -> None:
    """A tenant labels its pod `Evil_`: valid for Kubernetes, not a deployment name. The
    agent meters it without a deployment, counts it, and reports every other pod."""
    pods = PodIndex()
    before = metrics.SANITISED_IDENTITIES._value.get()
    evil = _pod("a")
    evil["metadata"]["labels"] = {POD_LABEL: "Evil_"}
    pods.upsert(evil)
    pods.upsert(evil)  # counted once per pod, not per update
    pods.upsert(_pod("b"))
    assert metrics.SANITISED_IDENTITIES._value.get() == before + 1
    backend = SimulatedBackend(fake_gpus("node", 1, "H100"))
    (gpu,) = backend.gpus()
    for pid, name in ((PID, "a"), (PID + 1, "b")):
        intervals = Intervals()
        intervals.add(0, 2_000_000)
        backend.processes[pid] = SimProcess(
            pid, gpu.uuid, intervals, cgroup_line(UIDS[name], "server")
        )
    meter = Meter(PidResolver(backend.cgroup, pods))
    for second in (0, 1, 2, 3):
        backend.clock_us = second * 1_000_000
        meter.poll(backend)
    report = reporting.cut(meter, "agent", 1, "node", 0, 10_000)
    deployments = {s.pod: s.inference_deployment for s in report.series}
    assert deployments == {"a": None, "b": "m"}
    assert all(s.active_us == 2_000_000 for s in report.series)


def test_a_report_that_cannot_be_cut_leaves_the_meter_untouched() -> None:
    pods = PodIndex()
    pods.upsert(_pod("a"))
    backend = SimulatedBackend(fake_gpus("node", 1, "H100"))
    (gpu,) = backend.gpus()
    intervals = Intervals()
    intervals.add(0, 2_000_000)
    backend.processes[PID] = SimProcess(PID, gpu.uuid, intervals, cgroup_line(UIDS["a"], "server"))
    meter = Meter(PidResolver(backend.cgroup, pods))
    for second in (0, 1, 2, 3):
        backend.clock_us = second * 1_000_000
        meter.poll(backend)
    (series,) = meter.series.values()
    good = series.identity
    series.identity = SeriesIdentity("Not_A_Namespace", good.pod, good.pod_uid, good.container)
    with pytest.raises(ValidationError):
        reporting.cut(meter, "agent", 1, "node", 0, 10_000)
    assert (series.reported_us, series.bursts) == (0, 1), "nothing marked reported"
    series.identity = good
    report = reporting.cut(meter, "agent", 1, "node", 0, 10_000)
    assert report.series[0].active_us == 2_000_000 and report.series[0].bursts == 1


class _OneBusySample:
    """A driver that, after the agent was away, reports one fully busy latest sample."""

    def __init__(self, gpu: Gpu, pid: int) -> None:
        self.gpu, self.pid, self.clock_us = gpu, pid, 0

    def refresh(self) -> None:
        return None

    def gpus(self) -> list[Gpu]:
        return [self.gpu]

    def now_us(self) -> int:
        return self.clock_us

    def utilization(self, gpu: Gpu, since_us: int) -> list[ProcessSample]:
        return [ProcessSample(self.pid, 100, self.clock_us)]

    def running_pids(self, gpu: Gpu) -> set[int]:
        return {self.pid}


def test_an_hour_away_then_a_busy_second_bills_a_few_polls_not_the_hour() -> None:
    pods = PodIndex()
    pods.upsert(_pod("a"))
    gpu = Gpu(0, "GPU-0", "H100")
    backend = _OneBusySample(gpu, PID)
    meter = Meter(
        PidResolver(lambda pid: cgroup_line(UIDS["a"], "server"), pods), max_period_us=5_000_000
    )
    meter.poll(backend)  # first sight of the GPU at t=0
    restored = Meter(meter.resolver, max_period_us=5_000_000)
    restore(restored, snapshot(meter))  # the agent stops here, and restarts an hour later
    backend.clock_us = 3_601_000_000
    restored.poll(backend)
    (series,) = restored.series.values()
    assert series.total_x100 // 100 == 5_000_000, "at most five polls' worth, not an hour"
    report = reporting.cut(restored, "agent", 1, "node", 0, 10_000)
    assert report.series[0].active_us == 5_000_000
    assert report.unmetered_us == 3_596_000_000, "the rest of the gap, reported as unmetered"
    assert reporting.cut(restored, "agent", 2, "node", 10_000, 20_000).unmetered_us == 0


def test_init_sidecar_ephemeral_and_unknown_containers_count_for_their_pod() -> None:
    pods = PodIndex()
    pod = _pod("a")
    pod["spec"] = {
        "containers": [{"name": "server"}, {"name": "metrics"}],
        "initContainers": [
            {"name": "warmup"},
            {"name": "gpu-sidecar", "restartPolicy": "Always"},
        ],
        "ephemeralContainers": [{"name": "debugger"}],
    }
    statuses = {
        "containerStatuses": [("server", "c1"), ("metrics", "c2")],
        "initContainerStatuses": [("warmup", "i1"), ("gpu-sidecar", "i2")],
        "ephemeralContainerStatuses": [("debugger", "e1")],
    }
    pod["status"] = {
        kind: [{"name": name, "containerID": f"containerd://{cid}"} for name, cid in items]
        for kind, items in statuses.items()
    }
    pods.upsert(pod)
    uid = UIDS["a"]
    found = {cid: pods.identity(uid, cid) for cid in ("c1", "i1", "i2", "e1", "not-listed")}
    assert {cid: (i.container, i.inference_deployment) for cid, i in found.items() if i} == {
        "c1": ("server", "m"),
        "i1": ("warmup", "m"),
        "i2": ("gpu-sidecar", "m"),
        "e1": ("debugger", "m"),
        "not-listed": ("unknown-container", "m"),
    }
    assert pods.identity("no-such-pod", "c1") is None, "only a PID of no pod is unattributed"


def test_a_minute_burst_that_ends_after_a_report_is_in_a_later_report() -> None:
    """The 1 s burst is reported at once; its 1 min burst ends a minute of idleness later,
    with no new active time, and must still reach a report (not wait for more traffic)."""
    pods = PodIndex()
    pods.upsert(_pod("a"))
    backend = SimulatedBackend(fake_gpus("node", 1, "H100"))
    (gpu,) = backend.gpus()
    intervals = Intervals()
    intervals.add(1_000_000, 1_500_000)
    backend.processes[PID] = SimProcess(PID, gpu.uuid, intervals, cgroup_line(UIDS["a"], "server"))
    meter = Meter(PidResolver(backend.cgroup, pods))
    reported: dict[str, int] = {"1ms": 0, "1s": 0, "1m": 0}
    for second in range(0, 80):
        backend.clock_us = second * 1_000_000
        meter.poll(backend)
        if second % 10 == 9:
            report = reporting.cut(meter, "agent", second, "node", 0, 10_000)
            for series in report.series:
                for name, ms in series.rounded_ms.to_wire().items():
                    reported[name] += ms
    assert reported == {"1ms": 500, "1s": 1000, "1m": 60_000}


class _Scripted:
    """A driver told, poll by poll, what runs, what it samples and which /proc entries
    still exist: the driver may report a process's samples after it exited."""

    def __init__(self, gpu: Gpu) -> None:
        self.gpu, self.clock_us = gpu, 0
        self.running: set[int] = set()
        self.samples: list[ProcessSample] = []
        self.alive: dict[int, str] = {}
        """PID -> the pod whose cgroup /proc/<pid>/cgroup shows, while the process lives."""
        self.reads: list[int] = []

    def refresh(self) -> None:
        return None

    def gpus(self) -> list[Gpu]:
        return [self.gpu]

    def now_us(self) -> int:
        return self.clock_us

    def utilization(self, gpu: Gpu, since_us: int) -> list[ProcessSample]:
        return [s for s in self.samples if s.timestamp_us > since_us]

    def running_pids(self, gpu: Gpu) -> set[int]:
        return set(self.running)

    def cgroup(self, pid: int) -> str | None:
        self.reads.append(pid)
        pod = self.alive.get(pid)
        return cgroup_line(UIDS[pod], "server") if pod else None

    def poll(self, meter: Meter, second: int, running: set[int], *busy: int) -> Any:
        self.clock_us = second * 1_000_000
        self.running = running
        self.samples = [ProcessSample(pid, 50, self.clock_us) for pid in busy]
        return meter.poll(self)


def test_a_process_shorter_than_a_poll_is_billed_to_its_pod_after_it_exited() -> None:
    """Seen running once, without samples yet; by the next poll it has exited (no /proc
    entry, its pod deleted too) and the driver reports its sample late."""
    pods = PodIndex()
    pods.upsert(_pod("a"))
    backend = _Scripted(Gpu(0, "GPU-0", "H100"))
    meter = Meter(PidResolver(backend.cgroup, pods))
    backend.poll(meter, 0, set())  # first sight of the GPU
    backend.alive[PID] = "a"
    backend.poll(meter, 1, {PID})  # running, no sample yet
    assert backend.reads == [PID], "resolved in the poll it was first seen"
    del backend.alive[PID]  # it exits: /proc/<pid> is gone
    pods.remove(_pod("a"))  # and its pod goes with it
    result = backend.poll(meter, 2, set(), PID)
    assert (result.samples, result.dropped) == (1, 0)
    (series,) = meter.series.values()
    assert series.identity.pod == "a"
    assert series.total_x100 == 50 * 1_000_000
    assert meter.unattributed_x100 == 0
    assert backend.reads == [PID], "no second read: the first one is remembered"


def test_late_samples_count_for_a_few_polls_after_the_process_was_last_seen() -> None:
    pods = PodIndex()
    pods.upsert(_pod("a"))
    backend = _Scripted(Gpu(0, "GPU-0", "H100"))
    meter = Meter(PidResolver(backend.cgroup, pods))
    backend.poll(meter, 0, set())
    backend.alive[PID] = "a"
    backend.poll(meter, 1, {PID})
    del backend.alive[PID]
    for second in range(2, 1 + EXITED_PID_POLLS):
        backend.poll(meter, second, set())
    last_chance = backend.poll(meter, 1 + EXITED_PID_POLLS, set(), PID)
    assert (last_chance.samples, last_chance.dropped) == (1, 0)
    assert meter.pid_last_seen["GPU-0"] == {}, "forgotten after its last chance"
    assert backend.poll(meter, 2 + EXITED_PID_POLLS, set(), PID).dropped == 1
    (series,) = meter.series.values()
    assert series.total_x100 == 50 * 1_000_000, "only the sample within the polls allowed"


def test_remembered_pids_are_bounded_per_gpu_the_longest_gone_forgotten_first() -> None:
    pods = PodIndex()
    pods.upsert(_pod("a"))
    backend = _Scripted(Gpu(0, "GPU-0", "H100"))
    meter = Meter(PidResolver(backend.cgroup, pods), max_pids_per_gpu=2)
    backend.poll(meter, 0, set())
    short_lived = [101, 102, 103, 104]  # one a poll, each gone by the next
    for second, pid in enumerate(short_lived, start=1):
        backend.alive[pid] = "a"
        backend.poll(meter, second, {pid})
        del backend.alive[pid]
        assert len(meter.pid_last_seen["GPU-0"]) <= 2
    assert list(meter.pid_last_seen["GPU-0"]) == [103, 104]
    assert set(meter.resolver._resolved) == {103, 104}  # type: ignore[attr-defined]
    result = backend.poll(meter, 5, set(), 101, 104)
    assert (result.samples, result.dropped) == (1, 1), "101 was forgotten, 104 was not"
    (series,) = meter.series.values()
    assert series.identity.pod == "a"
    assert backend.reads == short_lived, "nothing re-read after its process exited"
