"""Usage leaves the cluster: each configured sink is sent every record's deltas once.

The ledger hands the exporter every record it wrote or read (``observe``) and, at the end
of each flush, lets it take a step (``step``): per record and sink, what the sink
acknowledged since is recorded and what the record gained since is sealed as the next
delta (``payper.billing.outbox``), all in one patch of the record's annotations with a
resourceVersion precondition. The step runs inside the flush, so the ledger's own writes
and the exporter's never race each other; the patched object goes back into the
ledger's cache.

Each sink sends on its own task (``payper.billing.sink_runner``), with its own backoff,
from the deltas sealed for it: a sink that is down delays no other sink and no flush,
and loses nothing (a record's next delta is sealed only once its last was acknowledged,
so a sink down for an hour is owed one delta per record, holding the whole hour). A
Final record every sink has acknowledged is labelled Exported; only Exported records are
deleted after their retention (``payper.billing.retention``).

Delivery is at least once: an operator killed after a sink answered and before the
acknowledgement was written resends the same deltas under the same ids.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from payper.api.billing_record import FINAL, PLURAL, BillingRecordSpec, BillingRecordStatus
from payper.api.common import API_VERSION
from payper.billing import metrics, outbox, seal
from payper.billing.config import ExportConfig
from payper.billing.outbox import OWN, Delta, Part, SinkState
from payper.billing.records import EXPORTED, STATE_LABEL, parse_window_label
from payper.billing.sink_runner import SinkRunner, Work, make_sink
from payper.billing.sinks import UsageEvent
from payper.billing.writes import write_each
from payper.kube import ApiError, Kube, resource_path

logger = logging.getLogger(__name__)

Location = tuple[str, str]


@dataclass
class Tracked:
    """What the exporter keeps of a record not yet Exported (not the whole object)."""

    location: Location
    resource_version: str
    identity: str
    spec: BillingRecordSpec
    final: bool
    totals: dict[str, Part]
    states: dict[str, SinkState]
    written: dict[str, str | None]
    """Per sink, the annotation as last read or written (what a patch replaces)."""
    finalizers: list[str] = field(default_factory=list)
    held: str | None = None
    """Why the record is not exported (an annotation it did not write): an alert."""
    sealed_at: dict[str, float] = field(default_factory=dict)
    changed: bool = True
    """Read or written since its last step (else a step only has acknowledgements to do)."""
    work: dict[str, Work] = field(default_factory=dict)
    """Per sink, the events of the delta in flight, made once per delta."""


def usage_event(tracked: Tracked, delta: Delta) -> UsageEvent:
    spec = tracked.spec
    corrects = None
    if delta.part != OWN:
        corrects = parse_window_label(delta.part)
    return UsageEvent(
        id=delta.id,
        account=spec.account,
        deployment=spec.inference_deployment,
        gpu_product=spec.gpu_product,
        plan=spec.plan,
        currency=spec.currency,
        granularity=spec.granularity,
        window_start_ms=int(spec.window.start.timestamp() * 1000),
        window_end_ms=int(spec.window.end.timestamp() * 1000),
        corrects_window_start_ms=corrects,
        active_ms=delta.usage.active_ms,
        billed_ms=delta.usage.billed_ms,
        amount=delta.usage.amount,
    )


# -- the exporter ------------------------------------------------------------------------
class Exporter:
    def __init__(
        self,
        kube: Kube,
        config: ExportConfig,
        key: bytes,
        on_written: Callable[[Location, dict[str, Any]], None],
        clock: Callable[[], float],
        retention_days: int | None = None,
        write_concurrency: int = 16,
    ) -> None:
        self.kube = kube
        self.config = config
        self.key = key
        self.on_written = on_written
        self.clock = clock
        self.tracked: dict[Location, Tracked] = {}
        self.retention_days = retention_days
        self.write_concurrency = write_concurrency
        self.expired: list[tuple[Location, str]] = []
        """Records just Exported whose retention had already passed (location, UID): the
        ledger deletes them at once rather than at its next hourly look."""
        self.releasing: set[Location] = set()
        """Moved records' originals whose finalizer is still to be dropped."""
        self.runners = {
            s.name: SinkRunner(s, config, make_sink(s, config, clock)) for s in config.sinks
        }

    @property
    def enabled(self) -> bool:
        return bool(self.runners)

    def use_key(self, key: bytes) -> None:
        """The ledger's seal key (read at start): records and export states verify with it."""
        self.key = key

    def forget(self, location: Location) -> None:
        """A record that moved: its copy is tracked from now on."""
        self.tracked.pop(location, None)

    def take_expired(self) -> list[tuple[Location, str]]:
        """Records just Exported whose retention had passed (location, UID), once each."""
        expired, self.expired = self.expired, []
        return expired

    async def run(self) -> None:
        await asyncio.gather(*(runner.run() for runner in self.runners.values()))

    async def close(self) -> None:
        for runner in self.runners.values():
            await runner.sink.close()

    # -- records in --------------------------------------------------------------------
    def observe(
        self,
        record: Mapping[str, Any],
        status: BillingRecordStatus | None = None,
        spec: BillingRecordSpec | None = None,
    ) -> None:
        """The record as the ledger last read or wrote it: track its totals. ``status``
        and ``spec``: the record's, where the caller has them validated already (the
        flush's hot path does)."""
        if not self.enabled:
            return
        meta = record["metadata"]
        location = (meta["namespace"], meta["name"])
        if (meta.get("labels") or {}).get(STATE_LABEL) == EXPORTED:
            self.tracked.pop(location, None)
            return
        if status is None:
            status = BillingRecordStatus.model_validate(record.get("status") or {})
        annotations = meta.get("annotations") or {}
        identity = outbox.identity(meta)
        previous = self.tracked.get(location)
        states: dict[str, SinkState] = {}
        written: dict[str, str | None] = {}
        if seal.verify(self.key, record) is not True:
            # A record the ledger did not create (a tenant's, in its own namespace) is
            # never anyone's bill, whatever account its spec names.
            logger.error("record %s/%s has no valid payper seal: not exported", *location)
            self.tracked.pop(location, None)
            return
        held = None
        for name in self.runners:
            text = annotations.get(outbox.annotation(name))
            written[name] = text
            if previous is not None and previous.written.get(name) == text:
                states[name] = previous.states[name]  # as this process knows it
                continue
            try:
                states[name] = outbox.decode(self.key, identity, name, text)
            except outbox.TamperedError as error:
                if previous is not None and previous.held is None:
                    states[name] = previous.states[name]  # ours, as this process wrote it
                    logger.error("record %s/%s: %s; rewritten", *location, error)
                    continue
                held = str(error)
                states[name] = SinkState()
        if previous is not None and held is None:
            held = previous.held  # no process knows this record's real export state
        if held is not None and (previous is None or previous.held != held):
            logger.error("record %s/%s is not exported: %s", *location, held)
        self.tracked[location] = Tracked(
            location=location,
            resource_version=meta["resourceVersion"],
            identity=identity,
            spec=spec if spec is not None else BillingRecordSpec.model_validate(record["spec"]),
            final=status.state == FINAL,
            totals=outbox.totals(status),
            states=states,
            written=written,
            finalizers=list(meta.get("finalizers") or []),
            held=held,
            sealed_at=previous.sealed_at if previous is not None else {},
            work=previous.work if previous is not None else {},
        )

    # -- a step, at the end of each flush ----------------------------------------------
    async def step(self) -> None:
        for location in list(self.releasing):  # with sinks or none (they were removed)
            await self._release(location)
        if not self.enabled:
            return
        live = {
            location: t
            for location, t in self.tracked.items()
            if t.held is None
            and (t.changed or any(location in r.acknowledged for r in self.runners.values()))
        }
        outcomes = await write_each(
            live, lambda _, tracked: self._advance(tracked), self.write_concurrency
        )
        for location, error in outcomes.items():
            if error is None:
                continue
            if isinstance(error, ApiError) and error.not_found:
                self.tracked.pop(location, None)
                continue
            logger.warning("export state of %s/%s: %s", *location, error)
            if isinstance(error, ApiError) and error.conflict:
                try:
                    await self._reread(location)
                except (ApiError, OSError, TimeoutError) as reread:
                    logger.warning("re-reading %s/%s: %s", *location, reread)
        self._offer()

    async def _advance(self, tracked: Tracked) -> None:
        states = {}
        for name, runner in self.runners.items():
            acknowledged = runner.acknowledged.get(tracked.location)
            states[name] = outbox.step(tracked.states[name], tracked.totals, acknowledged)
            if states[name].sealed != tracked.states[name].sealed:
                tracked.sealed_at[name] = self.clock()
        # What the record should say, where it says otherwise (a step, or someone else's
        # edit of the annotation: this process's own state is the truth it rewrites).
        wanted = {
            name: outbox.encode(self.key, tracked.identity, name, state)
            for name, state in states.items()
            if state != SinkState() or tracked.written[name] is not None
        }
        annotations = {
            outbox.annotation(name): text
            for name, text in wanted.items()
            if text != tracked.written[name]
        }
        exported = tracked.final and all(
            outbox.done(state, tracked.totals) for state in states.values()
        )
        if not annotations and not exported:
            tracked.changed = False
            return
        patch: dict[str, Any] = {"metadata": {"resourceVersion": tracked.resource_version}}
        if annotations:
            patch["metadata"]["annotations"] = annotations
        if exported:
            patch["metadata"]["labels"] = {STATE_LABEL: EXPORTED}
            if outbox.FINALIZER in tracked.finalizers:  # a merge patch sets the whole list
                patch["metadata"]["finalizers"] = [
                    f for f in tracked.finalizers if f != outbox.FINALIZER
                ]
        written = await self.kube.patch(
            resource_path(API_VERSION, PLURAL, *tracked.location), patch
        )
        for runner in self.runners.values():
            runner.acknowledged.pop(tracked.location, None)  # on the record now
        tracked.states = states
        tracked.changed = False
        tracked.resource_version = written["metadata"]["resourceVersion"]
        tracked.written = {
            name: (written["metadata"].get("annotations") or {}).get(outbox.annotation(name))
            for name in self.runners
        }
        self.on_written(tracked.location, written)
        if exported:
            del self.tracked[tracked.location]
            metrics.RECORDS_EXPORTED.inc()
            end_s = tracked.spec.window.end.timestamp()
            if (
                self.retention_days is not None
                and end_s + self.retention_days * 86_400 <= self.clock()
            ):
                self.expired.append((tracked.location, written["metadata"]["uid"]))
            logger.info("record %s/%s is Exported", *tracked.location)

    def finalizers(self) -> dict[str, list[str]]:
        """Metadata for a record the ledger creates: with sinks, a finalizer keeps it
        (from its namespace's deletion, from a careless ``kubectl delete``) until every
        sink has it."""
        return {"finalizers": [outbox.FINALIZER]} if self.enabled else {}

    def final_records(self) -> list[Location]:
        """Final records not yet exported (kept, and moved with a deleted namespace)."""
        return [location for location, tracked in self.tracked.items() if tracked.final]

    async def release(self, location: Location) -> None:
        """Drop the export finalizer of a record whose copy now stands for it (retried at
        each step until done: the namespace's deletion waits on it)."""
        self.releasing.add(location)
        await self._release(location)

    async def _release(self, location: Location) -> None:
        path = resource_path(API_VERSION, PLURAL, *location)
        try:
            found = await self.kube.get_or_none(path)
            finalizers = list((found or {}).get("metadata", {}).get("finalizers") or [])
            if found is not None and outbox.FINALIZER in finalizers:
                kept = [f for f in finalizers if f != outbox.FINALIZER]
                version = found["metadata"]["resourceVersion"]
                await self.kube.patch(
                    path, {"metadata": {"resourceVersion": version, "finalizers": kept}}
                )
        except (ApiError, OSError, TimeoutError) as error:
            logger.warning("releasing %s/%s: %s (retried)", *location, error)
            return
        self.releasing.discard(location)

    async def _reread(self, location: Location) -> None:
        found = await self.kube.get_or_none(resource_path(API_VERSION, PLURAL, *location))
        if found is None:
            self.tracked.pop(location, None)
        else:
            self.observe(found)
            self.on_written(location, found)

    def _offer(self) -> None:
        now = self.clock()
        for name, runner in self.runners.items():
            work = {}
            oldest = now
            for location, tracked in self.tracked.items():
                state = tracked.states[name]
                if tracked.held is not None or state.pending is None:
                    continue
                made = tracked.work.get(name)
                if made is None or made.sealed != state.sealed:
                    deltas = outbox.deltas(tracked.identity, state)
                    made = Work(state.sealed, [usage_event(tracked, d) for d in deltas])
                    tracked.work[name] = made
                work[location] = made
                oldest = min(oldest, tracked.sealed_at.get(name, now))
            runner.offer(work)
            metrics.EXPORT_BACKLOG.labels(name).set(len(work))
            metrics.EXPORT_LAG.labels(name).set(now - oldest)
            metrics.EXPORT_BACKLOG_EXCEEDED.labels(name).set(
                int(len(work) > self.config.max_backlog_records)
            )
        metrics.RECORDS_AWAITING_EXPORT.set(sum(1 for t in self.tracked.values() if t.final))
        held: dict[str, int] = {}
        for tracked in self.tracked.values():
            if tracked.held is not None:
                held[tracked.location[0]] = held.get(tracked.location[0], 0) + 1
        metrics.EXPORT_HELD_RECORDS.clear()  # a namespace with none held has no series
        for namespace, count in held.items():
            metrics.EXPORT_HELD_RECORDS.labels(namespace).set(count)
