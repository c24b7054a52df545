"""``payper-agent replay SCENARIO.json``: the meter on a simulated clock, for audits and tests.

The meter, the burst logic and the rounding are the production code; only the backend
(simulated NVML) and the clock (stepped, never slept) differ. The same scenario always
gives the same totals, so a tenant can check a bill by replaying the usage it saw.
Format: ``docs/replay.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

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


def run(scenario: Scenario) -> dict[str, Any]:
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
    step = scenario.poll_interval_ms * 1000
    end = scenario.duration_ms * 1000
    backend.clock_us = 0
    meter.poll(backend)
    while backend.clock_us < end:
        backend.clock_us = min(end, backend.clock_us + step)
        meter.poll(backend)
    meter.close_all_bursts()
    containers = []
    for series in sorted(
        meter.series.values(),
        key=lambda s: (s.identity.namespace, s.identity.pod, s.identity.container, s.gpu),
    ):
        containers.append(
            {
                "namespace": series.identity.namespace,
                "pod": series.identity.pod,
                "container": series.identity.container,
                "gpu": series.gpu,
                "activeMs": _ms(series.total_x100),
                "bursts": series.bursts,
                "roundedMs": series.rounded_ms.to_wire(),
            }
        )
    return {"containers": containers, "unattributedMs": _ms(meter.unattributed_x100)}


def _ms(x100: int) -> int:
    """Percent-microseconds to milliseconds, rounded to nearest."""
    return (x100 + 50_000) // 100_000


def main(argv: Sequence[str]) -> int:
    import sys

    if len(argv) != 1:
        print("usage: payper-agent replay SCENARIO.json", file=sys.stderr)
        return 2
    try:
        scenario = load(Path(argv[0]))
    except ScenarioError as error:
        print(f"payper-agent: {error}", file=sys.stderr)
        return 2
    print(json.dumps(run(scenario), indent=2))
    return 0
