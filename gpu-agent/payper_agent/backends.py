"""Where GPU samples come from: one interface, a real NVML backend and simulated ones.

The meter asks a backend three things per GPU and poll: which processes run on it, the
per-process SM utilization since the last timestamp it saw (NVML semantics: integer
percent of the period during which one of the process's kernels was executing), and the
clock those timestamps use. ``payper_agent.nvml`` talks to the driver;
``payper_agent.simulated`` answers from busy intervals (a scenario file, or live model
servers on the local cluster), behaving like the driver down to integer percents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from payper.api.billing_record import Split


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    product: str
    mig: bool = False


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    sm_util: int
    """Percent of the sampled period in which this process had a kernel executing."""
    timestamp_us: int
    device: str | None = None
    """Set for MIG instances: the instance UUID the time belongs to."""
    product: str | None = None
    """Set for MIG instances: the instance's product, which names its MIG profile
    (NVML: "NVIDIA H100 80GB HBM3 MIG 1g.10gb")."""
    shares: tuple[tuple[int, int], ...] = ()
    """Set when several processes share a MIG instance: (pid, weight) pairs. The sample's
    time is divided among them in proportion to the weights (``pid`` is then only one of
    them), and ``split`` says how the weights were found."""
    split: Split | None = None


class Unmetered(Exception):  # noqa: N818 - a state of a GPU, reported, not a crash
    """This GPU cannot be metered per process (say, MIG without GPM support)."""


class Backend(Protocol):
    def refresh(self) -> None:
        """Called before every poll, to pick up what changed since the last one."""
        ...

    def gpus(self) -> list[Gpu]: ...

    def now_us(self) -> int:
        """The clock of the sample timestamps (NVML: CPU time, microseconds)."""
        ...

    def utilization(self, gpu: Gpu, last_seen_us: int) -> list[ProcessSample]:
        """Samples newer than ``last_seen_us``; raises Unmetered when not measurable."""
        ...

    def running_pids(self, gpu: Gpu) -> set[int]:
        """Host PIDs of the processes using the GPU (NVML: compute, graphics and MPS)."""
        ...

    def cgroup(self, pid: int) -> str | None:
        """The contents of ``/proc/<pid>/cgroup`` (host PID), or None if it is gone."""
        ...

    def close(self) -> None: ...


def read_proc_cgroup(pid: int, proc: str = "/proc") -> str | None:
    try:
        with open(f"{proc}/{pid}/cgroup") as handle:
            return handle.read()
    except OSError:
        return None
