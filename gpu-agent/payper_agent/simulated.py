"""Simulated NVML: per-process utilization computed from busy intervals.

It answers like the driver: for each process, the integer percent (rounded to nearest,
halves up) of the period (lastSeen, now] during which it had a kernel running, and nothing
at all for a process that was idle. Two sources of busy intervals:

- a *scenario* (``payper-agent replay``): GPUs, processes and intervals from a JSON file,
  on a simulated clock, so a run is deterministic and takes no wall time;
- *live* model servers on the local cluster, which append a ``start`` line (epoch ms)
  when a kernel starts and a ``start end`` line when it ends to ``<dir>/<stem>.busy``, and
  describe themselves in ``<dir>/<stem>.json`` (PID, start time, pod, node, GPU).

A model server in a container knows only its PID in its own PID namespace, while the
driver (and the agent, with hostPID) speak host PIDs; it also publishes its start time
in clock ticks since boot (``/proc/self/stat``, the same in every PID namespace), and the
backend finds the host process with that start time whose innermost PID (``NSpid``) is
the published one. On kwok nodes the model servers are host processes, and the backend
gives each the cgroup line a real containerd container of its pod would have
(``cgroups="published"``); on a real node it reads the process's real
``/proc/<pid>/cgroup`` (``cgroups="proc"``), so PID → cgroup → pod → container
resolution runs on what the kubelet and containerd made.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from payper_agent.backends import Gpu, ProcessSample, read_proc_cgroup

UNRESOLVED_GRACE_US = 30_000_000
"""How long a published process may stay unmatched to a host process before it is
ignored (it exited, or it was never on this machine)."""


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


def start_ticks(pid: int | str = "self", proc: str = "/proc") -> int | None:
    """A process's start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``)."""
    try:
        with open(f"{proc}/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may contain spaces
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def innermost_pid(pid: int, proc: str = "/proc") -> int | None:
    """The PID a process has in its own (innermost) PID namespace (``NSpid``)."""
    try:
        with open(f"{proc}/{pid}/status") as handle:
            for line in handle:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def host_pid(pid: int, ticks: int | None, proc: str = "/proc") -> int | None:
    """The host PID of the process that calls itself ``pid`` and started at ``ticks``.

    Without a start time (an older publisher) the PID is taken as a host PID."""
    if ticks is None:
        return pid
    if start_ticks(pid, proc) == ticks and innermost_pid(pid, proc) == pid:
        return pid  # the same PID namespace as ours
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        candidate = int(entry.name)
        if start_ticks(candidate, proc) == ticks and innermost_pid(candidate, proc) == pid:
            return candidate
    return None


class LiveBackend(SimulatedBackend):
    """Busy intervals published by model-server processes on this machine, for one node."""

    def __init__(
        self,
        directory: Path,
        node: str,
        gpus: list[Gpu],
        cgroups: str = "published",
        proc: str = "/proc",
    ) -> None:
        super().__init__(gpus)
        if cgroups not in ("published", "proc"):
            raise ValueError(f"cgroups must be 'published' or 'proc', not {cgroups!r}")
        self.directory = directory
        self.node = node
        self.cgroups = cgroups
        self.proc = proc
        self._stems: dict[str, int] = {}
        """Published stem -> host PID, for the processes being metered."""
        self._ignored: set[str] = set()
        """Stems of other nodes, other GPUs, or never matched to a host process."""
        self._offsets: dict[str, int] = {}

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

    def cgroup(self, pid: int) -> str | None:
        if self.cgroups == "proc":
            return read_proc_cgroup(pid, self.proc) if pid in self.processes else None
        return super().cgroup(pid)

    def _discover(self, identity_file: Path) -> None:
        stem = identity_file.stem
        try:
            identity: dict[str, Any] = json.loads(identity_file.read_text())
            published_pid = int(identity.get("pid", stem))
            ticks = identity.get("startTicks")
            ticks = None if ticks is None else int(ticks)
        except (OSError, ValueError, TypeError):
            return  # half-written: read again next time
        known_uuids = {g.uuid for g in self._gpus}
        if identity.get("node") != self.node or identity.get("gpu") not in known_uuids:
            self._ignored.add(stem)
            return
        pid = host_pid(published_pid, ticks, self.proc)
        if pid is None:
            started_us = int(identity.get("startedMs", 0)) * 1000
            if self.now_us() - started_us > UNRESOLVED_GRACE_US:
                self._ignored.add(stem)
            return
        pod = identity.get("pod") or {}
        cgroup = None
        if self.cgroups == "published" and pod.get("uid"):
            cgroup = cgroup_line(pod["uid"], pod.get("container", "server"))
        self._stems[stem] = pid
        self.processes[pid] = SimProcess(pid, identity["gpu"], Intervals(), cgroup)

    def refresh(self) -> None:
        """Pick up new processes and new busy lines; forget processes that exited."""
        present = set()
        for identity_file in self.directory.glob("*.json"):
            stem = identity_file.stem
            present.add(stem)
            if stem not in self._stems and stem not in self._ignored:
                self._discover(identity_file)
        self._ignored &= present  # bounded by the files there are
        for stem, pid in list(self._stems.items()):
            process = self.processes[pid]
            busy_file = self.directory / f"{stem}.busy"
            try:
                with busy_file.open("rb") as handle:
                    handle.seek(self._offsets.get(stem, 0))
                    data = handle.read()
            except OSError:
                data = b""
            complete = data.rfind(b"\n") + 1
            self._offsets[stem] = self._offsets.get(stem, 0) + complete
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
                del self._stems[stem]
                self._offsets.pop(stem, None)
                self._ignored.add(stem)

    def running_pids(self, gpu: Gpu) -> set[int]:
        return {pid for pid in super().running_pids(gpu) if self._alive(pid)}
