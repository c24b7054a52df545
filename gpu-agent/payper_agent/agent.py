"""The agent's loop: poll, meter, cut reports on wall-clock boundaries, checkpoint.

Sampling never waits for the network: reports go to disk and the sender delivers them
on its own schedule. After every poll the meter's checkpoint is written atomically; at
each report boundary (multiples of the report interval, default 10 s, so a report never
straddles a billing window) a report is cut and written with the state that follows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from payper.clock import now_ms
from payper_agent import metrics, reporting
from payper_agent.backends import Backend, Gpu
from payper_agent.meter import MAX_PERIOD_POLLS, Meter, Resolver, restore, snapshot
from payper_agent.store import Checkpoint, Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentSettings:
    node: str
    state_dir: Path
    poll_interval_s: float = 1.0
    report_interval_s: int = 10
    simulated: bool = False
    """The backend is simulated: every report says so (a real operator refuses them)."""


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        backend: Backend,
        resolver: Resolver,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.clock_ms = clock_ms
        self.store = Store(settings.state_dir)
        checkpoint, note = self.store.load()
        self.note = note
        self.agent_id = checkpoint.agent_id
        self.next_sequence = checkpoint.next_sequence
        self.last_report_end_ms = checkpoint.last_report_end_ms
        self.meter = Meter(
            resolver,
            max_period_us=int(MAX_PERIOD_POLLS * settings.poll_interval_s * 1_000_000),
            poll_interval_ms=round(settings.poll_interval_s * 1000),
        )
        if checkpoint.meter:
            restore(self.meter, checkpoint.meter)
        self.on_report: Callable[[], None] = lambda: None
        self.last_poll_monotonic = 0.0
        logger.info("agent %s on node %s: %s", self.agent_id, settings.node, note)

    def _checkpoint(self) -> Checkpoint:
        return Checkpoint(
            self.agent_id, self.next_sequence, snapshot(self.meter), self.last_report_end_ms
        )

    def _nvml_error(self, gpu: Gpu, error: Exception) -> None:
        metrics.NVML_ERRORS.labels(gpu.uuid).inc()
        logger.warning("NVML failed on %s: %r", gpu.uuid, error)

    def poll_once(self) -> None:
        started = time.perf_counter()
        self.backend.refresh()
        result = self.meter.poll(self.backend, self._nvml_error)
        metrics.DROPPED_SAMPLES.inc(result.dropped)
        for gpu in self.backend.gpus():
            metrics.UNMETERED_GPUS.labels(gpu.uuid).set(
                1 if gpu.uuid in self.meter.unmetered else 0
            )
        if result.unmetered:
            logger.warning(
                "unmetered GPUs this poll (not billed, see the report): %s", result.unmetered
            )
        written = self._maybe_report()
        self.store.save(written or self._checkpoint(), durable=written is not None)
        self.last_poll_monotonic = time.monotonic()
        metrics.POLL_DURATION.observe(time.perf_counter() - started)

    def _maybe_report(self) -> Checkpoint | None:
        """Cut a report at a boundary; the state written with it, if one was written."""
        interval_ms = self.settings.report_interval_s * 1000
        boundary = self.clock_ms() // interval_ms * interval_ms
        if self.last_report_end_ms is None:
            self.last_report_end_ms = boundary
            return None
        if boundary <= self.last_report_end_ms:
            return None
        start = max(self.last_report_end_ms, boundary - interval_ms)
        report = reporting.cut(
            self.meter,
            self.agent_id,
            self.next_sequence,
            self.settings.node,
            start,
            boundary,
            simulated=self.settings.simulated,
        )
        self.last_report_end_ms = boundary
        if not (
            report.series
            or report.unattributed_us
            or report.unmetered_gpus
            or report.unmetered_us
            or report.gpus
        ):
            # Nothing happened (no GPU either): no report, and no sequence number used. A
            # node with GPUs reports every interval: its idle time is accounted too, and
            # the operator tells a node with GPU pods and no reports as unmetered.
            return None
        for series in report.series:
            metrics.ACTIVE_SECONDS.labels(
                series.namespace, series.pod, series.container, series.gpu
            ).inc(series.active_us / 1e6)
        metrics.UNATTRIBUTED_SECONDS.inc(report.unattributed_us / 1e6)
        self.next_sequence += 1
        state_after = self._checkpoint()
        self.store.write_report(reporting.report_json(report), state_after)
        self.on_report()
        return state_after
