"""Simulated NVML: per-process utilization computed from busy intervals.

It answers like the driver: for each process, the integer percent (rounded to nearest,
halves up) of the period (lastSeen, now] during which it had a kernel running, and nothing
at all for a process that was idle. Two sources of busy intervals:

- a *scenario* (``payper-agent replay``): GPUs, processes and intervals from a JSON file,
  on a simulated clock, so a run is deterministic and takes no wall time;
- *live* model servers on the local cluster, which append a ``start`` line (epoch ms)
  when a kernel starts and a ``start end`` line when it ends to ``<dir>/<pid>.busy``, and
  describe themselves in ``<dir>/<pid>.json`` (pod, node, GPU); the backend gives each the
  cgroup line a real containerd container of that pod would have.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from payper_agent.backends import Gpu, ProcessSample


@dataclass
class Intervals:
    """Busy intervals [start, end) in microseconds; merged as they are added."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        index = bisect.bisect_left(self.ends, start)
        while index < len(self.starts) and self.starts[index] <= end:
            start = min(start, self.starts[index])
            end = max(end, self.ends[index])
            del self.starts[index]
            del self.ends[index]
        self.starts.insert(index, start)
        self.ends.insert(index, end)

    def overlap(self, after: int, until: int) -> int:
        """Busy microseconds within (after, until]."""
        total = 0
        index = bisect.bisect_right(self.ends, after)
        while index < len(self.starts) and self.starts[index] < until:
            total += min(self.ends[index], until) - max(self.starts[index], after)
            index += 1
        return total


def busy_percent(intervals: Intervals, last_us: int, now_us: int) -> int:
    period = now_us - last_us
    if period <= 0:
        return 0
    return (200 * intervals.overlap(last_us, now_us) + period) // (2 * period)


@dataclass
class SimProcess:
    pid: int
    gpu: str
    busy: Intervals
    cgroup: str | None
    open_starts: set[int] = field(default_factory=set)
    """Kernels still running: busy from each start until now."""

    def percent(self, last_us: int, now_us: int) -> int:
        if not self.open_starts:
            return busy_percent(self.busy, last_us, now_us)
        snapshot = Intervals(list(self.busy.starts), list(self.busy.ends))
        for start in self.open_starts:
            snapshot.add(start, now_us)
        return busy_percent(snapshot, last_us, now_us)


def cgroup_line(pod_uid: str, container: str) -> str:
    """The cgroup v2 line a containerd container of this pod would show (systemd driver)."""
    import hashlib

    container_id = hashlib.sha256(f"{pod_uid}/{container}".encode()).hexdigest()
    slug = pod_uid.replace("-", "_")
    return (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slug}.slice/"
        f"cri-containerd-{container_id}.scope\n"
    )


class SimulatedBackend:
    """The driver, simulated over a set of processes and a clock the caller controls."""

    def __init__(self, gpus: list[Gpu]) -> None:
        self._gpus = gpus
        self.processes: dict[int, SimProcess] = {}
        self.clock_us = 0

    def refresh(self) -> None:
        return None  # the caller changes the processes directly

    def gpus(self) -> list[Gpu]:
        return self._gpus

    def now_us(self) -> int:
        return self.clock_us

    def utilization(self, gpu: Gpu, last_seen_us: int) -> list[ProcessSample]:
        now = self.now_us()
        samples = []
        for process in self.processes.values():
            if process.gpu != gpu.uuid:
                continue
            percent = process.percent(last_seen_us, now)
            if percent > 0:
                samples.append(ProcessSample(process.pid, percent, now))
        return samples

    def running_pids(self, gpu: Gpu) -> set[int]:
        return {p.pid for p in self.processes.values() if p.gpu == gpu.uuid}

    def cgroup(self, pid: int) -> str | None:
        process = self.processes.get(pid)
        return process.cgroup if process else None

    def close(self) -> None:
        return None


def fake_gpus(node: str, count: int, product: str) -> list[Gpu]:
    return [Gpu(i, f"GPU-{node}-{i}", product) for i in range(count)]


class LiveBackend(SimulatedBackend):
    """Busy intervals published by model-server processes on this machine, for one node."""

    def __init__(self, directory: Path, node: str, gpus: list[Gpu]) -> None:
        super().__init__(gpus)
        self.directory = directory
        self.node = node
        self._offsets: dict[int, int] = {}

    def now_us(self) -> int:
        import time

        return time.time_ns() // 1000

    def _alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def refresh(self) -> None:
        """Pick up new processes and new busy lines; forget processes that exited."""
        known_uuids = {g.uuid for g in self._gpus}
        for identity_file in self.directory.glob("*.json"):
            try:
                pid = int(identity_file.stem)
            except ValueError:
                continue
            if pid in self.processes:
                continue
            try:
                identity: dict[str, Any] = json.loads(identity_file.read_text())
            except (OSError, ValueError):
                continue
            if identity.get("node") != self.node or identity.get("gpu") not in known_uuids:
                continue
            pod = identity.get("pod") or {}
            cgroup = (
                cgroup_line(pod["uid"], pod.get("container", "server")) if pod.get("uid") else None
            )
            self.processes[pid] = SimProcess(pid, identity["gpu"], Intervals(), cgroup)
        for pid, process in list(self.processes.items()):
            busy_file = self.directory / f"{pid}.busy"
            try:
                with busy_file.open("rb") as handle:
                    handle.seek(self._offsets.get(pid, 0))
                    data = handle.read()
            except OSError:
                data = b""
            complete = data.rfind(b"\n") + 1
            self._offsets[pid] = self._offsets.get(pid, 0) + complete
            for line in data[:complete].splitlines():
                start_ms, _, end_ms = line.partition(b" ")
                start = int(start_ms) * 1000
                if end_ms:
                    process.open_starts.discard(start)
                    process.busy.add(start, int(end_ms) * 1000)
                else:
                    process.open_starts.add(start)
            if (
                not self._alive(pid)
                and process.busy.overlap(self.now_us() - 60_000_000, 2**62) == 0
            ):
                del self.processes[pid]
                self._offsets.pop(pid, None)

    def running_pids(self, gpu: Gpu) -> set[int]:
        return {pid for pid in super().running_pids(gpu) if self._alive(pid)}
