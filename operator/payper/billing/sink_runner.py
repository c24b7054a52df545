"""One export sink's sending task: its own queue, its own backoff, nothing dropped.

The exporter (``payper.billing.exporter``) offers each runner what is owed to its sink
(the latest sealed delta per record, so the queue is bounded by the records not yet
Exported); the runner sends it in batches and records, per record, which delta the sink
acknowledged. A sink that is down backs off with jitter and delays no other sink and no
flush; a record whose events the sink refused is set aside and offered again after the
longest backoff, so it never blocks the others.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from payper.billing import metrics
from payper.billing.config import CloudEventsSinkConfig, ExportConfig, SinkConfig
from payper.billing.sinks import CloudEventsSink, Sent, Sink, SinkError, UsageEvent
from payper.billing.stripe_sink import StripeSink

logger = logging.getLogger(__name__)

Location = tuple[str, str]


@dataclass
class Work:
    """The events of one record's delta in flight to a sink, made once per delta."""

    sealed: int
    events: list[UsageEvent]
    taken: set[str] = field(default_factory=set)
    """Ids the sink already has (a delta half taken is not sent whole again)."""


def make_sink(config: SinkConfig, export: ExportConfig, clock: Callable[[], float]) -> Sink:
    if isinstance(config, CloudEventsSinkConfig):
        return CloudEventsSink(config, export.source)
    return StripeSink(config, clock)


@dataclass(frozen=True)
class _Refusal:
    sealed: int
    until: float
    reason: str


class SinkRunner:
    """One sink's sending task: its own queue (the latest sealed delta per record, so
    bounded by the records not yet Exported), its own backoff. A record whose events the
    sink refused is set aside (reported, kept) and offered again after the longest
    backoff, so it never blocks the others."""

    def __init__(
        self,
        config: SinkConfig,
        export: ExportConfig,
        sink: Sink,
        sleep: Callable[[float], Any] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = config.name
        self.config = config
        self.export = export
        self.sink = sink
        self.work: dict[Location, Work] = {}
        self.acknowledged: dict[Location, int] = {}
        self.refused: dict[Location, _Refusal] = {}
        self._told: dict[Location, int] = {}
        """The delta whose refusal was logged, per record (logged once, not per retry)."""
        self._wake = asyncio.Event()
        self._sleep = sleep
        self._clock = clock
        self.failures = 0

    def offer(self, work: dict[Location, Work]) -> None:
        """What is owed now (acknowledged deltas whose acknowledgement is not yet on the
        record are not sent again; refused ones not before their time)."""
        now = self._clock()
        self.refused = {
            location: refusal
            for location, refusal in self.refused.items()
            if location in work and work[location].sealed == refusal.sealed and refusal.until > now
        }
        self.work = {
            location: item
            for location, item in work.items()
            if self.acknowledged.get(location) != item.sealed and location not in self.refused
        }
        self._told = {k: v for k, v in self._told.items() if k in work}
        metrics.EXPORT_REFUSED_RECORDS.labels(self.name).set(len(self.refused))
        if self.work:
            self._wake.set()

    def backoff(self) -> float:
        ceiling = min(
            self.export.max_backoff_seconds,
            self.export.min_backoff_seconds * 2.0 ** min(self.failures - 1, 30),
        )
        return ceiling * (0.5 + random.random() / 2)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.work:
                if not await self.send_once():
                    await self._sleep(self.backoff())

    async def send_once(self) -> bool:
        """Send one batch of what is owed; whether nothing in it failed."""
        batch: list[tuple[Location, Work]] = []
        count = 0
        for location, work in list(self.work.items()):
            owed = len(work.events) - len(work.taken)
            if batch and count + owed > self.config.batch_size:
                break
            batch.append((location, work))
            count += owed
        events = [e for _, work in batch for e in work.events if e.id not in work.taken]
        try:
            sent = await self.sink.send(events)
        except SinkError as error:
            sent = Sent(failed={e.id: str(error) for e in events})
        unanswered = {e.id for e in events} - sent.taken - set(sent.refused) - set(sent.failed)
        sent.failed |= dict.fromkeys(unanswered, "the sink did not answer for it")
        for result, ids in (
            ("sent", sent.taken),
            ("refused", sent.refused),
            ("failed", sent.failed),
        ):
            metrics.EXPORTED_EVENTS.labels(self.name, result).inc(len(ids))
        until = self._clock() + self.export.max_backoff_seconds
        for location, work in batch:
            work.taken |= {e.id for e in work.events} & sent.taken
            if len(work.taken) == len(work.events):
                self.acknowledged[location] = work.sealed
                current = self.work.get(location)
                if current is not None and current.sealed == work.sealed:
                    del self.work[location]
                continue
            reasons = [sent.refused[e.id] for e in work.events if e.id in sent.refused]
            if reasons:
                self.refused[location] = _Refusal(work.sealed, until, reasons[0])
                self.work.pop(location, None)
                if self._told.get(location) == work.sealed:
                    continue
                self._told[location] = work.sealed
                logger.error(
                    "export to %s refused %s/%s (kept; offered again in %.0f s): %s",
                    self.name,
                    *location,
                    self.export.max_backoff_seconds,
                    reasons[0],
                )
        metrics.EXPORT_REFUSED_RECORDS.labels(self.name).set(len(self.refused))
        if sent.failed:
            self.failures += 1
            logger.warning(
                "export to %s failed (%d in a row): %s",
                self.name,
                self.failures,
                next(iter(sent.failed.values())),
            )
            return False
        self.failures = 0
        return True
