"""The meter: active GPU time per (container, GPU), bursts, and rounded counters.

Active time += smUtil/100 x dt for every sample, with dt from the backend's timestamps:
the time since the last sample timestamp seen on that GPU (NVML averages a process's
utilization over its samples since that timestamp). A poll without samples moves it to
the poll's time, so an idle stretch never inflates the next dt. It is kept as integer
"percent-microseconds" so nothing is lost to rounding; reports carry whole microseconds
and carry the remainder forward.

Bursts and the rounding rule: at granularity g (1 ms, 1 s, 1 min) a series' burst ends
only once it has been idle for at least g (counted in whole idle polls). Its active time
is billed in whole units of g *as they complete*: each time it reaches another multiple
of g, one unit is added to that granularity's counter, in the poll (and so the report,
and the billing window) in which it completed; when the burst ends, its remainder is
rounded up to one unit. Per burst that is ``ceil(A / g) * g``, what per-ms, per-second
and per-minute billing would charge for the same work; at any moment a burst's billed
time lies between ``floor(A / g) * g`` and ``ceil(A / g) * g`` of its active time so far.
So a server that is never idle is still billed as it computes, window by window, and a
tenant cannot defer its bill by keeping a kernel running. Requests closer together than
g share the unit, so a series is never billed more than its wall-clock time plus one unit
per burst; a lone 200 ms request still pays 0.2 s, 1 s or 60 s. (With 1 s polls, 1 ms and
1 s bursts end at the first idle poll.) ``bursts`` counts the finest ones.

A MIG instance shared by several processes gives one sample for the whole instance with
the processes' shares (``ProcessSample.shares``): its time is divided exactly, to the
percent-microsecond, by ``divide``, and each series keeps how much of its time was split
and how ("proportional" or "equal"), which the report carries to the record.

Garbage is dropped, never guessed: samples with smUtil > 100, for PIDs never seen
running on that GPU (now or in the last ``EXITED_PID_POLLS`` polls), or with timestamps
not after the last one seen.

Short-lived processes: the driver reports samples late, and may report them for a process
that has already exited, when ``/proc/<pid>`` (and so its pod) can no longer be read. So
every poll asks every GPU for its running PIDs, samples or not, and a PID is resolved to
its container in the poll it is first seen (the one cgroup read, before it can exit).
The meter remembers, per GPU, the poll each PID was last seen running and keeps its
resolution for ``EXITED_PID_POLLS`` polls after that, so a late sample of an exited
process is still billed to its pod. The memory is bounded (``max_pids_per_gpu``, the
longest gone forgotten first). A PID seen again after a poll without it may be a new
process the kernel gave the same number: it is resolved afresh, never billed to the
container it had. (A PID reused within one poll interval is not told apart.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from payper.api.billing_record import GRANULARITY_MS, RoundedMs, Split
from payper_agent.backends import Backend, Gpu, ProcessSample, Unmetered
from payper_agent.gputime import GpuClock


@dataclass(frozen=True)
class SeriesIdentity:
    namespace: str
    pod: str
    pod_uid: str
    container: str
    inference_deployment: str | None = None


class Resolver(Protocol):
    def __call__(self, pid: int) -> SeriesIdentity | None:
        """Host PID -> the container it runs in, or None for a process outside any pod."""
        ...

    def first_seen(self, pid: int) -> None:
        """A process was just seen with this PID: resolve it now (it may exit before its
        samples arrive), replacing whatever was cached for the PID."""
        ...

    def forget_pids_except(self, kept: set[int]) -> None:
        """Drop what is cached about the PIDs not in ``kept`` (a PID can be reused)."""
        ...


@dataclass(frozen=True)
class KnownPids:
    """A resolver for PIDs whose containers are known up front (replay, benchmarks)."""

    identities: Mapping[int, SeriesIdentity]

    def __call__(self, pid: int) -> SeriesIdentity | None:
        return self.identities.get(pid)

    def first_seen(self, pid: int) -> None:
        return None

    def forget_pids_except(self, kept: set[int]) -> None:
        return None


def round_up_ms(active_us: int, granularity_ms: int) -> int:
    unit_us = granularity_ms * 1000
    return -(-active_us // unit_us) * granularity_ms


def divide(amount: int, weights: Sequence[int]) -> list[int]:
    """``amount`` in integer parts proportional to ``weights`` (not all zero) that add up
    to it exactly: the units left over go to the largest remainders, ties to the first."""
    total = sum(weights)
    parts = [amount * w // total for w in weights]
    left = amount - sum(parts)
    by_remainder = sorted(range(len(weights)), key=lambda i: -(amount * weights[i] % total))
    for i in by_remainder[:left]:
        parts[i] += 1
    return parts


@dataclass
class Series:
    identity: SeriesIdentity
    gpu: str
    product: str
    total_x100: int = 0
    """Cumulative active time in percent-microseconds."""
    reported_us: int = 0
    open_x100: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GRANULARITY_MS, 0))
    """Active time of the burst still open at each granularity (percent-microseconds)."""
    open_billed_ms: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GRANULARITY_MS, 0))
    """Of each open burst, the whole units already billed (ms): they completed."""
    active_now: bool = False
    rounded_ms: RoundedMs = field(default_factory=RoundedMs)
    """Billed time not yet reported: units completed in open bursts, and the rounded-up
    remainders of closed ones."""
    bursts: int = 0
    idle_polls: int = 0
    reported_rounded_ms: RoundedMs = field(default_factory=RoundedMs)
    """Cumulative rounded time already reported (for audits: the agent's own totals)."""
    reported_bursts: int = 0
    split_x100: dict[str, int] = field(default_factory=dict)
    """Of ``total_x100``, the time of shared MIG instances, per split ("proportional",
    "equal"); cumulative, like ``total_x100``."""
    reported_split_us: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.identity.pod_uid, self.identity.container, self.gpu)

    @cached_property
    def identity_json(self) -> dict[str, Any]:
        """The identity as checkpoint data, built once (it never changes)."""
        i = self.identity
        return {
            "namespace": i.namespace,
            "pod": i.pod,
            "pod_uid": i.pod_uid,
            "container": i.container,
            "inference_deployment": i.inference_deployment,
        }

    @property
    def has_unreported_bursts(self) -> bool:
        """Closed bursts not yet in a report, at any granularity."""
        rounded = self.rounded_ms
        return bool(
            self.bursts or rounded.per_millisecond or rounded.per_second or rounded.per_minute
        )

    @property
    def in_burst(self) -> bool:
        # Every granularity gains the same time and the coarsest ends last: it is open
        # whenever any is.
        return self.open_x100[COARSEST] > 0

    def add_active(self, amount_x100: int) -> None:
        self.total_x100 += amount_x100
        open_x100 = self.open_x100
        billed = self.open_billed_ms
        for name, unit_x100 in UNIT_X100.items():
            open_x100[name] += amount_x100
            completed_ms = open_x100[name] // unit_x100 * GRANULARITY_MS[name]
            if completed_ms > billed[name]:
                self.rounded_ms.add_at(name, completed_ms - billed[name])
                billed[name] = completed_ms
        self.active_now = True

    def close_bursts(self, idle_ms: int | None = None) -> None:
        """End the open bursts of every granularity the series has been idle for (all of
        them when ``idle_ms`` is None), rounding each up to its unit."""
        for name, granularity in GRANULARITY_MS.items():
            open_x100 = self.open_x100[name]
            if open_x100 and (idle_ms is None or idle_ms >= granularity):
                rest = round_up_ms(open_x100 // 100, granularity) - self.open_billed_ms[name]
                self.rounded_ms.add_at(name, rest)
                self.open_x100[name] = 0
                self.open_billed_ms[name] = 0
                if name == FINEST:
                    self.bursts += 1


@dataclass
class PollResult:
    samples: int = 0
    dropped: int = 0
    unmetered: list[str] = field(default_factory=list)


FINEST = min(GRANULARITY_MS, key=GRANULARITY_MS.__getitem__)
COARSEST = max(GRANULARITY_MS, key=GRANULARITY_MS.__getitem__)
UNIT_X100 = {name: ms * 1000 * 100 for name, ms in GRANULARITY_MS.items()}
"""One unit of each granularity in percent-microseconds."""
MAX_PERIOD_POLLS = 5
"""A sample covers at most this many poll intervals; the rest of a longer gap is unmetered."""
EXITED_PID_POLLS = 5
"""How many polls after a PID was last seen running its late samples are still accepted
(and billed to the pod it was resolved to)."""
MAX_PIDS_PER_GPU = 4096
"""PIDs remembered per GPU (running or recently exited); beyond it the longest gone are
forgotten first. A GPU runs far fewer processes: this only bounds a PID storm."""


class Meter:
    def __init__(
        self,
        resolver: Resolver,
        forget_after_polls: int = 3600,
        max_period_us: int = MAX_PERIOD_POLLS * 1_000_000,
        poll_interval_ms: int = 1000,
        max_pids_per_gpu: int = MAX_PIDS_PER_GPU,
    ) -> None:
        """``max_period_us``: the longest time one sample may account for. After a gap
        (the agent was down, the driver failed) a busy sample would otherwise be taken to
        cover the whole gap: an hour down and one busy second would bill an hour. The
        time beyond it is counted as unmetered, per GPU, and reported as such."""
        self.resolver = resolver
        self.poll_interval_ms = poll_interval_ms
        """Idle time is counted in whole polls of this length (bursts end by it)."""
        self.forget_after_polls = forget_after_polls
        self.max_period_us = max_period_us
        self.unmetered_us = 0
        """Cumulative GPU time (per GPU, summed) that gaps left unmetered."""
        self.unmetered_reported_us = 0
        self.series: dict[tuple[str, str, str], Series] = {}
        self.last_seen_us: dict[str, int] = {}
        self.unattributed_x100 = 0
        self.unattributed_reported_us = 0
        self.unmetered: set[str] = set()
        self.polls = 0
        self.max_pids_per_gpu = max_pids_per_gpu
        self.pid_last_seen: dict[str, dict[int, int]] = {}
        """Per GPU: PID -> the poll it was last seen running, the longest gone first."""
        self.gpu_time = GpuClock()
        """Per GPU, where its wall-clock time went (``payper_agent.gputime``)."""

    def _series(self, identity: SeriesIdentity, gpu: Gpu, sample: ProcessSample) -> Series:
        gpu_id = sample.device or gpu.uuid
        key = (identity.pod_uid, identity.container, gpu_id)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series(identity, gpu_id, sample.product or gpu.product)
        return series

    def _attribute(
        self, pid: int, amount_x100: int, gpu: Gpu, sample: ProcessSample, split: Split | None
    ) -> None:
        identity = self.resolver(pid)
        if identity is None:
            self.unattributed_x100 += amount_x100
            self.gpu_time.unattributed(gpu.uuid, gpu.product, amount_x100)
            return
        series = self._series(identity, gpu, sample)
        series.add_active(amount_x100)
        if split is not None:
            series.split_x100[split] = series.split_x100.get(split, 0) + amount_x100

    def poll(
        self, backend: Backend, on_error: Callable[[Gpu, Exception], None] | None = None
    ) -> PollResult:
        """One poll of every GPU; closes the bursts of series that went idle."""
        result = PollResult()
        resolved_now: set[int] = set()
        for series in self.series.values():
            series.active_now = False
        for gpu in backend.gpus():
            now = backend.now_us()
            last = self.last_seen_us.get(gpu.uuid)
            if last is None:
                self.last_seen_us[gpu.uuid] = now  # first sight: no period to account yet
                continue
            try:
                samples = backend.utilization(gpu, last)
                running = backend.running_pids(gpu)
            except Unmetered:
                result.unmetered.append(gpu.uuid)
                self.unmetered.add(gpu.uuid)
                self.gpu_time.unmetered(gpu.uuid, gpu.product, last, now)
                self.last_seen_us[gpu.uuid] = now
                continue
            except Exception as error:  # a driver error on one GPU must not stop the others
                if on_error is not None:
                    on_error(gpu, error)
                continue
            self.unmetered.discard(gpu.uuid)
            known = self._see_running(gpu.uuid, running, resolved_now)
            if now - last > self.max_period_us:
                self.unmetered_us += now - last - self.max_period_us
            # The next period starts at the newest sample the driver gave, not at our own
            # clock: the driver's samples lag the poll, and time between its last sample
            # and now would otherwise fall between two periods (measured on an H200).
            newest = 0
            for sample in samples:
                if not self._valid(sample, last, known):
                    result.dropped += 1
                    continue
                result.samples += 1
                newest = max(newest, sample.timestamp_us)
                if sample.sm_util == 0:
                    continue
                period = min(sample.timestamp_us - last, self.max_period_us)
                amount = sample.sm_util * period
                if sample.device is not None:
                    self.gpu_time.device(sample.device, gpu.uuid)
                if not sample.shares:
                    self._attribute(sample.pid, amount, gpu, sample, None)
                    continue
                parts = divide(amount, [weight for _, weight in sample.shares])
                for (pid, _), part in zip(sample.shares, parts, strict=True):
                    self._attribute(pid, part, gpu, sample, sample.split)
            self.gpu_time.metered(gpu.uuid, gpu.product, last, newest or now, self.max_period_us)
            self.last_seen_us[gpu.uuid] = newest or now
        self._forget_pids()
        self._end_of_poll()
        return result

    def _see_running(
        self, gpu_uuid: str, running: set[int], resolved_now: set[int]
    ) -> Mapping[int, int]:
        """Note the PIDs running on a GPU in this poll; resolve those not running in the
        previous one (new processes, or a PID the kernel handed on) before they can exit.
        Returns the PIDs whose samples count on this GPU, with their last poll."""
        seen = self.pid_last_seen.setdefault(gpu_uuid, {})
        poll = self.polls
        for pid in running:
            previous = seen.pop(pid, None)  # re-inserted last: the dict stays oldest-first
            if (previous is None or previous < poll - 1) and pid not in resolved_now:
                self.resolver.first_seen(pid)
                resolved_now.add(pid)
            seen[pid] = poll
        return seen

    def _forget_pids(self) -> None:
        """Forget PIDs gone for more than EXITED_PID_POLLS polls, and the longest gone
        beyond the bound; the resolver keeps only what some GPU still remembers."""
        oldest = self.polls - EXITED_PID_POLLS + 1  # the next poll still accepts these
        kept: set[int] = set()
        for seen in self.pid_last_seen.values():
            excess = len(seen) - self.max_pids_per_gpu
            for pid in list(seen):
                if seen[pid] >= oldest and excess <= 0:
                    break  # oldest first: the rest are recent enough, and within bounds
                del seen[pid]
                excess -= 1
            kept.update(seen)
        self.resolver.forget_pids_except(kept)

    @staticmethod
    def _valid(sample: ProcessSample, last_us: int, known: Mapping[int, int]) -> bool:
        # A shared instance's processes come from the driver's own process list of that
        # instance, read with the sample.
        return (
            0 <= sample.sm_util <= 100
            and sample.timestamp_us > last_us
            and (sample.pid in known or bool(sample.shares))
        )

    def _end_of_poll(self) -> None:
        self.polls += 1
        stale = []
        for key, series in self.series.items():
            if series.active_now:
                series.idle_polls = 0
                continue
            series.idle_polls += 1
            if series.in_burst:
                series.close_bursts(series.idle_polls * self.poll_interval_ms)
            settled = (
                series.total_x100 // 100 == series.reported_us
                and not series.has_unreported_bursts
                and not series.in_burst
            )
            if settled and series.idle_polls > self.forget_after_polls:
                stale.append(key)
        for key in stale:
            del self.series[key]

    def close_all_bursts(self) -> None:
        for series in self.series.values():
            series.close_bursts()


def snapshot(meter: Meter) -> dict[str, Any]:
    """Everything needed to continue metering after a restart, as JSON-ready data."""
    return {
        "polls": meter.polls,
        "lastSeenUs": dict(meter.last_seen_us),
        "unattributedX100": meter.unattributed_x100,
        "unattributedReportedUs": meter.unattributed_reported_us,
        "unmeteredUs": meter.unmetered_us,
        "unmeteredReportedUs": meter.unmetered_reported_us,
        "series": [_series_snapshot(s) for s in meter.series.values()],
        "gpuTime": meter.gpu_time.to_json(),
    }


def _series_snapshot(s: Series) -> dict[str, Any]:
    data = {
        "identity": s.identity_json,
        "gpu": s.gpu,
        "product": s.product,
        "totalX100": s.total_x100,
        "reportedUs": s.reported_us,
        "roundedMs": s.rounded_ms.to_wire(),
        "bursts": s.bursts,
        "reportedRoundedMs": s.reported_rounded_ms.to_wire(),
        "reportedBursts": s.reported_bursts,
    }
    if s.split_x100:  # only series of shared MIG instances
        data["splitX100"] = dict(s.split_x100)
        data["reportedSplitUs"] = dict(s.reported_split_us)
    if s.in_burst:  # written every poll for every series: only what is not zero
        # What is not billed yet of each open burst, and what is: an agent of the last
        # release (a rollback) reads only ``openX100`` and rounds it up when the burst
        # ends, so it bills exactly the rest, never the completed units again.
        data["openX100"] = {
            name: x100 - s.open_billed_ms[name] * 100_000 for name, x100 in s.open_x100.items()
        }
        data["openBilledMs"] = dict(s.open_billed_ms)
        data["idlePolls"] = s.idle_polls
    return data


def restore(meter: Meter, data: dict[str, Any]) -> None:
    meter.polls = int(data["polls"])
    meter.last_seen_us = {str(k): int(v) for k, v in data["lastSeenUs"].items()}
    meter.unattributed_x100 = int(data["unattributedX100"])
    meter.unattributed_reported_us = int(data["unattributedReportedUs"])
    meter.unmetered_us = int(data.get("unmeteredUs", 0))
    meter.unmetered_reported_us = int(data.get("unmeteredReportedUs", 0))
    meter.gpu_time = GpuClock.from_json(data.get("gpuTime"))
    meter.series = {}
    for item in data["series"]:
        series = Series(
            identity=SeriesIdentity(**item["identity"]),
            gpu=str(item["gpu"]),
            product=str(item["product"]),
            total_x100=int(item["totalX100"]),
            reported_us=int(item["reportedUs"]),
            open_x100={
                name: x100 + _open_billed(item)[name] * 100_000
                for name, x100 in _open_bursts(item).items()
            },
            open_billed_ms=_open_billed(item),
            idle_polls=int(item.get("idlePolls", 0)),
            rounded_ms=RoundedMs.model_validate(item["roundedMs"]),
            bursts=int(item["bursts"]),
            reported_rounded_ms=RoundedMs.model_validate(item.get("reportedRoundedMs", {})),
            reported_bursts=int(item.get("reportedBursts", 0)),
            split_x100={str(k): int(v) for k, v in item.get("splitX100", {}).items()},
            reported_split_us={str(k): int(v) for k, v in item.get("reportedSplitUs", {}).items()},
        )
        meter.series[series.key] = series


def _open_billed(item: Mapping[str, Any]) -> dict[str, int]:
    """What open bursts billed already; a checkpoint from before units were billed as
    they complete billed nothing of an open burst (its whole is billed when it ends)."""
    billed = item.get("openBilledMs") or {}
    return {name: int(billed.get(name, 0)) for name in GRANULARITY_MS}


def _open_bursts(item: Mapping[str, Any]) -> dict[str, int]:
    """Open bursts per granularity; a checkpoint from before the rounding rule has one
    open burst (``burstX100``), the same at every granularity."""
    if "openX100" in item:
        return {name: int(item["openX100"][name]) for name in GRANULARITY_MS}
    return dict.fromkeys(GRANULARITY_MS, int(item.get("burstX100", 0)))
