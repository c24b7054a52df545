"""PID -> container resolution across polls: cached while a process runs, never reused.

The kernel hands an exited process's PID to a later one; its GPU time must go to the
new process's pod, not to the pod the PID belonged to before.
"""

from __future__ import annotations

from typing import Any

from payper.api.inference_deployment import POD_LABEL
from payper_agent.meter import Meter
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
