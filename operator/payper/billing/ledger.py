"""The ledger: usage reports and the operator's own observations become BillingRecords.

Every flush interval (default 10 s) the ledger gathers what it needs (the reports that
arrived, the operator's drained observations, the GPU product labels of nodes it has not
seen), lets the pure core ``payper.billing.flush`` decide (which reports apply, per
agent only the next ones in sequence; how their usage groups by record, deployment x
window x GPU product; what each record gains; which counts wait), and writes each
touched record once, with optimistic concurrency on its resourceVersion. Records are
independent objects, so they are written several at a time (``recordWriteConcurrency``,
16 by default; ``write_each``): one after another, their API round trips add up, and at
4,000 agents the flush outgrew its interval (``bench/README.md``). The totals and
the per-agent last applied sequence go in the same update
(``payper.billing.records.apply``), so a crash, a retry or a second writer can neither
lose nor repeat a report's usage in any record.

Only after the records are written does the ledger advance, per agent, the sequence
through which reports are applied *everywhere* (``payper.billing.progress``), and
acknowledge: an agent that sees the acknowledgement may forget the report. A report that
can never be applied is refused alone (``payper.billing.intake``), a record that can
never be written is isolated to itself (``payper.billing.deadletter``): one bad report or
record never stops the flush for the others.

The ledger orchestrates parts with one job each: the record store (every read and write
of a BillingRecord), progress, the dead-letter store, retention, the per-GPU
reconciliation, attribution (``payper.attribution``) and the exporter, which it uses
through ``record_store.ExportTracking`` only.

Windows: usage counts in the window its report was observed in. Once a window has ended
and its grace period passed, its records become Final, and usage that arrives later for
it goes into the current window's record as an adjustment naming the original window.

Provisioned GPU time is kept per pod inside each record as the span of that window in
which the pod held its GPUs (scheduled -> gone), so re-applying it is harmless and a
restart continues the spans of pods that still run. Request and cold-start counts are the
operator's own observations and best effort across an operator crash; GPU time is exact.
Counts that arrive before the GPU product is known (a first request, counted before its
pod lands on a node) wait for it, up to a window and its grace, rather than opening a
record for an unknown product.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from payper.api.usage import RefusedReport, UsageReport, refusal
from payper.attribution import Attribution
from payper.billing import deadletter, flush, intake, metrics
from payper.billing.config import BillingConfig
from payper.billing.events import BillingEvents, Observed
from payper.billing.exporter import Exporter
from payper.billing.flush import BillingWindows, FlushPlan, Observations
from payper.billing.pricing import UNKNOWN_PRODUCT, Plan, product_key
from payper.billing.progress import Progress
from payper.billing.reconciliation_store import ReconciliationStore
from payper.billing.record_store import RecordError, RecordStore
from payper.billing.records import RecordChange, RecordKey
from payper.billing.retention import Retention
from payper.billing.writes import write_each
from payper.clock import now_ms
from payper.kube import ApiError, Kube
from payper.observed import Key, PodView

logger = logging.getLogger(__name__)
REFUSED_BEFORE = "refused before: its claim is filed in the dead-letter store"


class PlanningFaultError(Exception):
    """Planning a flush fails, and no one node's reports explain it."""


class Ledger:
    def __init__(
        self,
        kube: Kube,
        config: BillingConfig,
        namespace: str,
        observed: Observed,
        events: BillingEvents,
        clock: Callable[[], int] = now_ms,
        synced: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.synced = synced
        """Whether the operator's watches have delivered the cluster once
        (``payper.operator.synced``): until then no flush runs, so no record is priced
        from a view that does not know the namespace's labels or the deployment's plan."""
        self.namespace = namespace
        self.observed = observed
        self.events = events
        self.clock = clock
        self.windows = BillingWindows(config.window_seconds * 1000, config.grace_seconds * 1000)
        self.exporter = Exporter(
            kube,
            config.export,
            b"",
            lambda location, record: self.store.saw(location, record),  # noqa: PLW0108 - made below
            lambda: self.clock() / 1000,
            config.retention_days,
            config.record_write_concurrency,
        )
        self.store = RecordStore(kube, namespace, self.windows, self._plan, self.exporter, clock)
        self.progress = Progress(kube, namespace, config.ledger_config_map)
        self.dead_letters = deadletter.DeadLetters(kube, namespace)
        self.retention = Retention(kube, namespace, config.retention_days, self.exporter)
        self.attribution = Attribution(kube)
        self.gpu_time = ReconciliationStore(
            kube, namespace, self.windows, config.reconciliation_retention_days * 86_400_000
        )
        self._queue: list[intake.Batch] = []
        self.filed: dict[tuple[str, str, int], str] = {}
        """Refused reports filed in the dead-letter store whose sequence the progress has
        not passed yet, (node, agent id, sequence) -> progress key: they stay refused."""
        self._nodes: dict[str, str] = {}
        """Node -> the GPU product key of its label."""
        self._unplaced_since: dict[Key, int] = {}
        self._waiting_since: dict[str, int] = {}
        """Deployments whose counts wait for a known GPU product, since when (ms)."""
        self.reported_at: dict[str, int] = {}
        """Per node, when a report from it last arrived (ms): a node with GPU pods and
        none for a while has no agent (``payper.operator.capacity``)."""

    @property
    def applied_through(self) -> dict[str, int]:
        """Per agent (progress key), the last sequence applied everywhere, durably."""
        return self.progress.through

    # -- start -------------------------------------------------------------------------
    async def load(self) -> None:
        """Read the per-agent progress and the records not yet Final (after a restart too)."""
        await self.progress.load()
        await self.store.load()
        for node, agent, sequence in await self.dead_letters.filed_reports():
            marker = intake.gap_marker(
                node, RefusedReport(agent_id=agent, sequence=sequence, reason=""), 0
            )
            self.filed[(node, agent, sequence)] = flush.progress_key(marker)
        self._forget_filed()
        if self.config.retention_days is None:
            logger.warning(
                "billing.recordRetentionDays is not set: Final BillingRecords are kept for "
                "ever, and etcd grows by one record per deployment, GPU product and window "
                "(docs/architecture.md, Retention)"
            )
        logger.info(
            "ledger: %d agents, %d open records",
            len(self.applied_through),
            len(self.store.records),
        )

    # -- intake --------------------------------------------------------------------------
    async def submit(
        self,
        reports: list[UsageReport],
        refused: list[RefusedReport] | None = None,
        node: str | None = None,
    ) -> intake.Receipt:
        """Queue one agent's batch for the next flush: its valid reports and those refused
        on arrival (``node``: where its token runs; by default the reports' node). Returns,
        per agent, what is applied durably, and the batch's refused reports."""
        future: asyncio.Future[intake.Receipt] = asyncio.get_running_loop().create_future()
        for report in reports:
            self.reported_at[report.node] = self.clock()
            report.runs  # noqa: B018 - summed now, as reports arrive, not all in the flush
        node = node or (reports[0].node if reports else "")
        self._queue.append(intake.Batch(list(reports), list(refused or []), node, future))
        return await future

    # -- flush ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Flush, and send what the flushes seal to the sinks (``payper.billing.exporter``)."""
        exporting = asyncio.create_task(self.exporter.run(), name="exporter")
        try:
            await self._flush_on_cadence()
        finally:
            exporting.cancel()
            await self.exporter.close()

    async def _flush_on_cadence(self) -> None:
        """Flush on a fixed cadence: each flush starts one interval after the previous one
        started (at once if that one took longer), not one interval after it ended. A
        report then waits at most about an interval and a flush for its acknowledgement;
        sleeping a whole interval after each flush added the flush's own duration to
        every wait, and an agent's next report, sent only once the previous one is
        acknowledged, missed the next flush as well (``bench/README.md``)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due = flush.next_due(due, loop.time(), self.config.flush_interval_seconds)
            await asyncio.sleep(due - loop.time())
            try:
                await self.flush()
            except Exception:
                logger.exception("billing flush failed; reports stay unacknowledged")

    async def _attribute(
        self, reports: list[UsageReport], events: BillingEvents
    ) -> tuple[dict[Key, dict[str, PodView]], dict[str, Key], dict[str, str | None]]:
        """The pods this flush bills (holding GPUs, or reported) grouped by the key their
        owner chain gives; that key, and the node, for every pod it may meet (ended, lately
        gone)."""
        current = self.observed.all_pods
        gone = self.observed.gone_pods
        reported = {s.pod_uid for r in reports for s in r.series}
        billed = [p for p in current.values() if p.gpus > 0 or p.uid in reported]
        others = [pod for pod, _ in events.ended_pods] + [
            gone[uid] for uid in reported if uid in gone and uid not in current
        ]
        owners = {pod.uid: await self.attribution.owner_key(pod) for pod in billed + others}
        nodes = {pod.uid: pod.node for pod in others + billed}  # the current view wins
        for uid, (key, node) in self.store.recorded_pods(reported - owners.keys()).items():
            owners[uid], nodes[uid] = key, node
        grouped: dict[Key, dict[str, PodView]] = {}
        for pod in billed:
            grouped.setdefault(owners[pod.uid], {})[pod.uid] = pod
        live = {pod.owner.uid for pod in (*current.values(), *gone.values()) if pod.owner}
        self.attribution.keep_only(live)
        placed = {p.node for p in billed + [pod for pod, _ in events.ended_pods] if p.node}
        labels = await self.attribution.gpu_product_labels(placed)
        for node in placed - self._nodes.keys():
            self._nodes[node] = product_key(labels[node] or UNKNOWN_PRODUCT)
        return grouped, owners, nodes

    def _observations(
        self,
        events: BillingEvents,
        pods: dict[Key, dict[str, PodView]],
        owners: dict[str, Key],
        nodes: dict[str, str | None],
    ) -> Observations:
        keys = {*pods, *owners.values(), *events.requests, *events.cold_starts}
        return Observations(
            events=events,
            pods=pods,
            deployment_products={
                key: product_key(spec.gpu.product)
                for key in keys
                if (spec := self.observed.spec_of(key)) is not None and spec.gpu.product
            },
            node_products=self._nodes,
            unplaced_since=self._unplaced_since,
            owners=owners,
            pod_nodes=nodes,
            waiting_since=self._waiting_since,
        )

    async def flush(self) -> None:
        """Apply what arrived; answer every waiting request, whatever happens."""
        queued, self._queue = self._queue, []
        if not self.synced():
            metrics.USAGE_REPORTS.labels("waiting_for_sync").inc(len(queued))
            logger.info("flush deferred: the operator's watches have not caught up yet")
            for batch in queued:
                batch.future.set_result(batch.receipt(self.applied_through))
            return
        try:
            with metrics.FLUSH_DURATION.time():
                await self._flush(queued, self.clock())
        finally:
            for batch in queued:
                if not batch.future.done():
                    batch.future.set_result(batch.receipt(self.applied_through))

    async def _refuse(self, batches: list[intake.Batch], now: int) -> None:
        """File the refused reports next in line in the dead-letter store, each node's on
        its own (one node's full quota holds back only its own agents), and give each
        filed one its gap marker, so its agent moves past it."""
        for batch in batches:
            batch.markers = []
        by_node: dict[str, intake.Filing] = {}
        for item in intake.next_in_line(batches, self.applied_through, now):
            by_node.setdefault(item[0].node, []).append(item)
        for node, items in by_node.items():
            new = [r for _, r, _ in items if (node, r.agent_id, r.sequence) not in self.filed]
            if new and not await self.dead_letters.file_reports([(node, r) for r in new], now):
                continue  # this node's refused reports wait; the others go on
            for batch, _, marker in items:
                self.filed[(node, marker.agent_id, marker.sequence)] = flush.progress_key(marker)
                batch.markers.append(marker)

    def _refused_before(self, batches: list[intake.Batch]) -> None:
        """A report once filed as refused stays refused, whatever comes under its sequence
        later (a resend after a failed flush, another order of agents): its claim is in
        the dead-letter store, and is never also billed."""
        for batch in batches:
            again = [r for r in batch.reports if (batch.node, r.agent_id, r.sequence) in self.filed]
            if again:
                batch.reports = [r for r in batch.reports if r not in again]
                batch.refused.extend(refusal(r.to_wire(), REFUSED_BEFORE) for r in again)

    def _forget_filed(self) -> None:
        """Filed refusals whose sequence the durable progress has passed: done."""
        for key, agent in list(self.filed.items()):
            if self.applied_through.get(agent, 0) >= key[2]:
                del self.filed[key]

    async def _plan_flush(
        self, batches: list[intake.Batch], seen: Observations, now: int
    ) -> FlushPlan:
        """The flush's plan. Should planning raise, the reports of one node that make it
        raise are refused (filed, moved past) and the rest planned: one report never stops
        the flush. A fault no one node's reports explain is the operator's: raised."""

        def plan(reports: Sequence[UsageReport]) -> FlushPlan:
            return flush.plan(reports, self.applied_through, seen, self.windows, now)

        await self._refuse(batches, now)
        reports = [r for batch in batches for r in (*batch.reports, *batch.markers)]
        try:
            return plan(reports)
        except Exception:
            logger.exception("planning the flush failed: looking for the reports that fail it")
        poisoned = intake.poisoned(reports, plan)
        nodes = {reports[index].node for index in poisoned}
        if len(nodes) != 1:
            raise PlanningFaultError(
                f"planning fails, and not for the reports of one node ({len(nodes)} nodes): "
                "a fault of the operator's; nothing is acknowledged until it is fixed"
            )
        bad = {id(reports[index]): reason for index, reason in poisoned.items()}
        for batch in batches:
            refused = [refusal(r.to_wire(), bad[id(r)]) for r in batch.reports if id(r) in bad]
            batch.reports = [r for r in batch.reports if id(r) not in bad]
            batch.refused.extend(refused)
        await self._refuse(batches, now)
        return plan([r for batch in batches for r in (*batch.reports, *batch.markers)])

    async def _flush(self, batches: list[intake.Batch], now: int) -> None:
        await self.store.move_ending(self.observed.namespace_ending)
        await self.retention.release_abandoned_exports(self.observed.ending_namespaces_now)
        self._refused_before(batches)
        intake.refuse_out_of_time(batches, now)
        intake.limit_agents_per_node(
            batches, lambda r: flush.progress_key(r) in self.applied_through
        )
        reports = [r for batch in batches for r in batch.reports]
        events = self.events.drain()
        pods, owners, nodes = await self._attribute(reports, events)
        seen = self._observations(events, pods, owners, nodes)
        planned = await self._plan_flush(batches, seen, now)
        selection = planned.selection
        metrics.USAGE_REPORTS.labels("duplicate").inc(selection.duplicates)
        metrics.USAGE_REPORTS.labels("out_of_order").inc(selection.out_of_order)
        for report in selection.accepted:
            metrics.USAGE_LAG.observe(max(0, now - report.interval_end_ms) / 1000)
            if report.lost_reason is not None:
                metrics.USAGE_LOST.labels(report.node, report.lost_reason).inc(report.lost_us / 1e6)
                logger.warning(
                    "agent %s on %s dropped report %d (%s): %.3f GPU-seconds lost, not billed",
                    report.agent_id,
                    report.node,
                    report.sequence,
                    report.lost_reason,
                    report.lost_us / 1e6,
                )
        metrics.USAGE_REPORTS.labels("waiting_for_pod").inc(selection.waiting)
        self._waiting_since = planned.waiting_since
        for report, series, why in planned.refused:
            metrics.SERIES_REFUSED.labels(report.node, why).inc()
            node = seen.pod_nodes.get(series.pod_uid)
            logger.warning(
                "agent %s on %s claimed %.3f GPU-seconds for pod %s/%s, but %s: not applied",
                report.agent_id,
                report.node,
                series.active_us / 1e6,
                series.namespace,
                series.pod,
                f"the operator sees the pod on {node}"
                if node
                else f"the operator did not see the pod on a node within "
                f"{flush.UNSEEN_POD_WAIT_MS // 1000} s",
            )
        for deployment, count in planned.held_requests.items():  # counted at the next flush
            self.events.requests[deployment] = self.events.requests.get(deployment, 0) + count
        for deployment, count in planned.held_cold_starts.items():
            self.events.cold_starts[deployment] = self.events.cold_starts.get(deployment, 0) + count
        self._unplaced_since = planned.unplaced_since
        for key, change in planned.changes.items():
            if change.pods:
                _, plan = self._plan(key.namespace, key.deployment)
                metrics.prime(key.namespace, key.deployment, key.product, plan.currency)

        failed: set[RecordKey] = set()
        refused: list[tuple[RecordKey, RecordChange, str]] = [
            (key, change, reason)
            for reason, changes in planned.refused_changes.items()
            for key, change in changes.items()
        ]
        outcomes = await write_each(
            planned.changes,
            lambda key, change: self._write(key, change, now),
            self.config.record_write_concurrency,
        )
        for key, error in outcomes.items():
            if error is None:
                continue
            reason = deadletter.refused_for_good(error)
            if reason is not None:
                refused.append((key, planned.changes[key], reason))
                continue
            failed.add(key)
            logger.warning(
                "record %s/%s not written this flush: %s",
                key.namespace,
                key.name,
                error,
                exc_info=not isinstance(error, (ApiError, OSError, TimeoutError, RecordError)),
            )
        if refused:
            failed |= await self.dead_letters.file_changes(refused, now)

        progress = flush.acknowledge(planned, self.applied_through, failed)
        # The per-GPU reconciliation of what is acknowledged, before the progress is
        # saved: a report whose object is not written is not acknowledged either.
        not_written = failed | {key for key, _, _ in refused}
        progress = await self.gpu_time.record(
            planned, progress, not_written, now, self.applied_through
        )
        advanced = sum(
            1
            for r in planned.selection.accepted
            if progress.get(flush.progress_key(r), 0) >= r.sequence
        )
        if advanced:
            # Acknowledged (the futures answer from applied_through) only once durable.
            await self.progress.save(progress)
            self._forget_filed()
            metrics.USAGE_REPORTS.labels("applied").inc(advanced)
        await self.store.finalize(now, self.applied_through)
        await self.exporter.step()
        try:
            await self.retention.delete_exported_past_retention()
            await self.retention.delete_expired(now)
        except (ApiError, OSError, TimeoutError) as error:
            logger.warning("deleting Final records past their retention: %s", error)
        try:
            await self.gpu_time.prune(now)
        except (ApiError, OSError, TimeoutError) as error:
            logger.warning("pruning GPU time objects: %s", error)

    def _plan(self, namespace: str, deployment: str) -> tuple[str, Plan]:
        """The plan that prices a deployment: its own if granted to its namespace, else the
        namespace's default (never a price the tenant picked, never zero by default)."""
        spec = self.observed.spec_of((namespace, deployment))
        choice = self.config.plan_for(
            namespace, self.observed.labels_of(namespace), spec.billing.plan if spec else None
        )
        return choice.name, self.config.plans[choice.name]

    async def _write(self, key: RecordKey, change: RecordChange, now: int) -> None:
        applied = await self.store.apply(
            key, change, now, self.applied_through, self.observed.namespace_ending
        )
        if applied is not None:
            labels = (key.namespace, key.deployment, key.product)
            metrics.count_applied(labels, applied.spec, applied.before, applied.after)
