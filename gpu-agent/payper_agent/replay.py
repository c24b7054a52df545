"""``payper-agent replay SCENARIO.json``: the meter on a simulated clock, for audits and tests.

The meter, the burst logic and the rounding are the production code; only the backend
(simulated NVML) and the clock (stepped, never slept) differ. The same scenario always
gives the same totals, so a tenant can check a bill by replaying the usage it saw.
Format: ``docs/replay.md``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from payper.api.billing_record import GRANULARITY_MS
from payper.api.common import field_errors
from payper_agent.backends import Gpu
from payper_agent.meter import MAX_PERIOD_POLLS, KnownPids, Meter, SeriesIdentity
from payper_agent.simulated import Intervals, SimProcess, SimulatedBackend

MAX_DURATION_MS = 31 * 24 * 3600 * 1000


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ScenarioGpu(_Model):
    uuid: Annotated[str, Field(min_length=1, max_length=128)]
    product: Annotated[str, Field(min_length=1, max_length=128)]


class ScenarioPod(_Model):
    namespace: Annotated[str, Field(min_length=1, max_length=63)]
    name: Annotated[str, Field(min_length=1, max_length=253)]
    uid: Annotated[str, Field(min_length=1, max_length=64)]
    container: Annotated[str, Field(min_length=1, max_length=63)]
    inference_deployment: str | None = None


class ScenarioProcess(_Model):
    pid: Annotated[int, Field(ge=1)]
    gpu: str
    pod: ScenarioPod | None = None
    busy: list[tuple[int, int]]

    @model_validator(mode="after")
    def _intervals(self) -> ScenarioProcess:
        for index, (start, end) in enumerate(self.busy):
            if not 0 <= start < end:
                raise ValueError(f"busy[{index}]: need 0 <= start < end, got [{start}, {end}]")
        return self


class Scenario(_Model):
    poll_interval_ms: Annotated[int, Field(ge=1, le=60_000)] = 1000
    duration_ms: Annotated[int, Field(ge=1, le=MAX_DURATION_MS)]
    gpus: Annotated[list[ScenarioGpu], Field(min_length=1)]
    processes: list[ScenarioProcess]

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        uuids = {g.uuid for g in self.gpus}
        pids = set()
        for index, process in enumerate(self.processes):
            if process.gpu not in uuids:
                raise ValueError(f"processes[{index}].gpu: {process.gpu!r} is not in gpus")
            if process.pid in pids:
                raise ValueError(f"processes[{index}].pid: {process.pid} appears twice")
            pids.add(process.pid)
        return self


class ScenarioError(ValueError):
    """The scenario file is unreadable or invalid; the message names the field."""


def load(path: Path) -> Scenario:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ScenarioError(f"cannot read scenario {path}: {error}") from error
    try:
        return Scenario.model_validate(raw)
    except ValidationError as error:
        lines = [f"  {line}" for line in field_errors(error)]
        raise ScenarioError("\n".join([f"invalid scenario {path}:", *lines])) from error


@dataclass
class _Windows:
    """Reports cut every ``report_ms`` as the agent cuts them; what each billed, by the
    window its interval starts in (as the ledger places a report)."""

    window_ms: int
    report_ms: int
    count: int
    last_cut_ms: int = 0
    seen: dict[tuple[str, str, str], tuple[int, dict[str, int]]] = field(default_factory=dict)
    """Per series, the cumulative active (percent-µs) and rounded (ms) at the last cut."""
    windows: dict[tuple[str, str, str], list[dict[str, Any]]] = field(default_factory=dict)

    def cut(self, meter: Meter, boundary_ms: int, window: int | None = None) -> None:
        start = max(self.last_cut_ms, boundary_ms - self.report_ms)
        index = start // self.window_ms if window is None else window
        self.last_cut_ms = boundary_ms
        for key, series in meter.series.items():
            active, rounded = self.seen.get(key, (0, dict.fromkeys(GRANULARITY_MS, 0)))
            now_rounded = series.rounded_ms.to_wire()
            row = self.windows.setdefault(key, self._empty())[index]
            row["activeX100"] += series.total_x100 - active
            for name, ms in now_rounded.items():
                row["roundedMs"][name] += ms - rounded[name]
            self.seen[key] = (series.total_x100, now_rounded)

    def _empty(self) -> list[dict[str, Any]]:
        return [
            {
                "startMs": k * self.window_ms,
                "activeX100": 0,
                "roundedMs": dict.fromkeys(GRANULARITY_MS, 0),
            }
            for k in range(self.count)
        ]

    def of(self, key: tuple[str, str, str]) -> list[dict[str, Any]]:
        """The series' windows, active time as differences of cumulative milliseconds (so
        the windows add up to the totals exactly)."""
        rows, cumulative, shown = [], 0, 0
        for row in self.windows.get(key, self._empty()):
            cumulative += row["activeX100"]
            active_ms = _ms(cumulative) - shown
            shown += active_ms
            rows.append(
                {"startMs": row["startMs"], "activeMs": active_ms, "roundedMs": row["roundedMs"]}
            )
        return rows


def run(
    scenario: Scenario, window_seconds: int | None = None, report_interval_ms: int = 10_000
) -> dict[str, Any]:
    """The scenario's totals per container; with ``window_seconds``, also what the
    reports (cut every ``report_interval_ms``) billed in each window."""
    gpus = [Gpu(i, g.uuid, g.product) for i, g in enumerate(scenario.gpus)]
    backend = SimulatedBackend(gpus)
    identities: dict[int, SeriesIdentity] = {}
    for process in scenario.processes:
        intervals = Intervals()
        for start, end in process.busy:
            intervals.add(start * 1000, end * 1000)
        if process.pod is not None:
            pod = process.pod
            identities[process.pid] = SeriesIdentity(
                pod.namespace, pod.name, pod.uid, pod.container, pod.inference_deployment
            )
        backend.processes[process.pid] = SimProcess(process.pid, process.gpu, intervals, None)
    meter = Meter(
        KnownPids(identities),
        forget_after_polls=2**62,
        max_period_us=MAX_PERIOD_POLLS * scenario.poll_interval_ms * 1000,
        poll_interval_ms=scenario.poll_interval_ms,
    )
    windows = None
    if window_seconds is not None:
        window_ms = window_seconds * 1000
        windows = _Windows(window_ms, report_interval_ms, -(-scenario.duration_ms // window_ms))
    step = scenario.poll_interval_ms * 1000
    end = scenario.duration_ms * 1000
    backend.clock_us = 0
    meter.poll(backend)
    while backend.clock_us < end:
        backend.clock_us = min(end, backend.clock_us + step)
        meter.poll(backend)
        boundary = backend.clock_us // 1000 // report_interval_ms * report_interval_ms
        if windows is not None and boundary > windows.last_cut_ms:
            windows.cut(meter, boundary)
    meter.close_all_bursts()
    if windows is not None:  # what is left closes in the window holding durationMs - 1
        windows.cut(meter, scenario.duration_ms, (scenario.duration_ms - 1) // windows.window_ms)
    containers = []
    for series in sorted(
        meter.series.values(),
        key=lambda s: (s.identity.namespace, s.identity.pod, s.identity.container, s.gpu),
    ):
        row: dict[str, Any] = {
            "namespace": series.identity.namespace,
            "pod": series.identity.pod,
            "container": series.identity.container,
            "gpu": series.gpu,
            "activeMs": _ms(series.total_x100),
            "bursts": series.bursts,
            "roundedMs": series.rounded_ms.to_wire(),
        }
        if windows is not None:
            row["windows"] = windows.of(series.key)
        containers.append(row)
    return {"containers": containers, "unattributedMs": _ms(meter.unattributed_x100)}


def _ms(x100: int) -> int:
    """Percent-microseconds to milliseconds, rounded to nearest."""
    return (x100 + 50_000) // 100_000


def parser() -> argparse.ArgumentParser:
    parsed = argparse.ArgumentParser(
        prog="payper-agent replay",
        description="Run the agent's meter on a simulated driver and clock (docs/replay.md).",
    )
    parsed.add_argument("scenario", type=Path, help="the scenario, a JSON file")
    parsed.add_argument(
        "--window-seconds",
        type=int,
        help="also show what each billing window of this length billed, per container",
    )
    parsed.add_argument(
        "--report-interval-ms",
        type=int,
        default=10_000,
        help="how often reports are cut, as the agent does (default 10000; must divide the window)",
    )
    return parsed


def main(argv: Sequence[str]) -> int:
    import sys

    args = parser().parse_args(list(argv))  # --help, and usage errors (exit 2)
    window_s, report_ms = args.window_seconds, args.report_interval_ms
    if report_ms < 1 or (window_s is not None and (window_s < 1 or window_s * 1000 % report_ms)):
        print(
            "payper-agent: --report-interval-ms must be at least 1 and divide "
            "--window-seconds x 1000",
            file=sys.stderr,
        )
        return 2
    try:
        scenario = load(args.scenario)
    except ScenarioError as error:
        print(f"payper-agent: {error}", file=sys.stderr)
        return 2
    print(json.dumps(run(scenario, window_s, report_ms), indent=2))
    return 0
