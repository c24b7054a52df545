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
through which reports are applied *everywhere* (kept in one ConfigMap, one write per
flush), and acknowledge: an agent that sees the acknowledgement may forget the report.

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
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from payper.api.billing_record import (
    FINAL,
    GRANULARITY_MS,
    KIND,
    OPEN,
    PLURAL,
    BillingRecordSpec,
    BillingRecordStatus,
    Window,
)
from payper.api.common import API_VERSION
from payper.api.inference_deployment import GPU_PRODUCT_LABEL
from payper.api.inference_deployment import KIND as INFERENCE_DEPLOYMENT_KIND
from payper.api.usage import RefusedReport, UsageReport, refusal
from payper.billing import deadletter, flush, intake, metrics, outbox, seal
from payper.billing.config import BillingConfig
from payper.billing.events import BillingEvents, Observed
from payper.billing.exporter import Exporter
from payper.billing.flush import BillingWindows, FlushPlan, Observations
from payper.billing.pricing import UNKNOWN_PRODUCT, Plan, amount, product_key
from payper.billing.reconciliation_store import ReconciliationStore
from payper.billing.records import (
    ACCOUNT_LABEL,
    DEPLOYMENT_LABEL,
    EXPORTED,
    MOVED_FROM_LABEL,
    STATE_LABEL,
    WINDOW_LABEL,
    RecordChange,
    RecordKey,
    apply,
    moved_name,
    same_totals,
    window_label,
)
from payper.billing.writes import write_each
from payper.clock import iso, now_ms, parse_iso
from payper.kube import ApiError, Kube, resource_path
from payper.observed import UNMANAGED, Key, Owner, PodView, controller_of

logger = logging.getLogger(__name__)
MAX_CONFLICT_RETRIES = 6
MAX_ABANDONED_CHECKED = 10_000
DEAD_LETTERED = "UsageDeadLettered"
DEAD_LETTERS_FULL = "DeadLetterStoreFull"
FOREIGN_RECORD = "ForeignBillingRecord"
RETENTION_CHECK_MS = 3_600_000
"""How often Final records past ``recordRetentionDays`` are looked for (and at start)."""
RETENTION_PAGE = 500
"""Final records read per page when looking: never all of them at once."""
"""Event reasons, on the dead-letter ConfigMap."""


class Ledger:
    def __init__(
        self,
        kube: Kube,
        config: BillingConfig,
        namespace: str,
        observed: Observed,
        events: BillingEvents,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.kube = kube
        self.config = config
        self.namespace = namespace
        self.observed = observed
        self.dead_letters = deadletter.DeadLetters(kube, namespace)
        self.events = events
        self.clock = clock
        self.windows = BillingWindows(config.window_seconds * 1000, config.grace_seconds * 1000)
        self.applied_through: dict[str, int] = {}
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        """Open records as last read or written, by where they are: (namespace, name)."""
        self._moved: set[tuple[str, str]] = set()
        """(namespace, name) of records moved into the operator's namespace when their
        namespace was deleted: their usage goes to the moved copy."""
        self._queue: list[intake.Batch] = []
        self._nodes: dict[str, str] = {}
        self._replica_sets: dict[str, Key | None] = {}
        """ReplicaSet UID -> the InferenceDeployment it belongs to (None: to none)."""
        self._unplaced_since: dict[Key, int] = {}
        self._waiting_since: dict[str, int] = {}
        """Deployments whose counts wait for a known GPU product, since when (ms)."""
        self._ledger_version: str | None = None
        self._abandoned_checked: OrderedDict[str, None] = OrderedDict()
        """Ending namespaces whose export finalizers were looked at (no sinks), bounded."""
        self._evented: set[tuple[RecordKey, str]] = set()
        """Dead-letter entries an event was posted for (in this process)."""
        self._store_full = False
        self._seal_key = b""
        """The key of the seals on records the ledger creates (``payper.billing.seal``)."""
        self.gpu_time = ReconciliationStore(
            kube, namespace, self.windows, config.reconciliation_retention_days * 86_400_000
        )
        self._next_retention_check_ms = 0
        self.reported_at: dict[str, int] = {}
        """Per node, when a report from it last arrived (ms): a node with GPU pods and
        none for a while has no agent (``payper.operator.capacity``)."""
        self.exporter = Exporter(
            kube,
            config.export,
            b"",
            self._exporter_wrote,
            lambda: self.clock() / 1000,
            config.retention_days,
            config.record_write_concurrency,
        )

    def _exporter_wrote(self, location: tuple[str, str], record: dict[str, Any]) -> None:
        """The exporter patched a record: the ledger's next write starts from that."""
        if location in self.records:
            self.records[location] = record

    # -- start -------------------------------------------------------------------------
    @property
    def _ledger_path(self) -> str:
        return resource_path("v1", "configmaps", self.namespace, self.config.ledger_config_map)

    async def load(self) -> None:
        """Read the per-agent progress and the records not yet Final (after a restart too)."""
        stored = await self.kube.get_or_none(self._ledger_path)
        if stored is not None:
            self._ledger_version = stored["metadata"]["resourceVersion"]
            self.applied_through = _progress_of(stored)
        # Only records not labelled Final (with sinks: not labelled Exported): the rest are
        # done. Records from before the label existed are listed (the selector matches a
        # missing label) and relabelled below.
        done = EXPORTED if self.exporter.enabled else FINAL
        listing = await self.kube.list(
            resource_path(API_VERSION, PLURAL), {"labelSelector": f"{STATE_LABEL}!={done}"}
        )
        self._seal_key = await seal.load_key(self.kube, self.namespace)
        self.exporter.key = self._seal_key
        if self.config.retention_days is None:
            logger.warning(
                "billing.recordRetentionDays is not set: Final BillingRecords are kept for "
                "ever, and etcd grows by one record per deployment, GPU product and window "
                "(docs/architecture.md, Retention)"
            )
        for item in listing["items"]:
            key = (item["metadata"]["namespace"], item["metadata"]["name"])
            if (item.get("status") or {}).get("state") != FINAL:
                if seal.verify(self._seal_key, item) is False:
                    logger.error("record %s/%s has a seal that does not verify: ignored", *key)
                    continue  # unsealed ones are checked when first written
                self.records[key] = item
                moved_from = (item["metadata"].get("labels") or {}).get(MOVED_FROM_LABEL)
                if key[0] == self.namespace and moved_from:
                    self._moved.add((moved_from, key[1].removeprefix(f"{moved_from}.")))
                self.exporter.observe(item)
            else:
                self.exporter.observe(await self._label_final(key, item))
        for original in self._moved:
            self.records.pop(original, None)  # its namespace is going: the copy is the record
            self.exporter.tracked.pop(original, None)
        logger.info(
            "ledger: %d agents, %d open records", len(self.applied_through), len(self.records)
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

    async def _learn_nodes(self, pods: list[PodView]) -> None:
        """Read the GPU product label of nodes not seen before (cached: labels of a
        node's GPUs do not change while it runs)."""
        for node in {p.node for p in pods if p.node is not None} - set(self._nodes):
            found = await self.kube.get_or_none(resource_path("v1", "nodes", name=node))
            labels = (found or {}).get("metadata", {}).get("labels") or {}
            self._nodes[node] = product_key(labels.get(GPU_PRODUCT_LABEL, UNKNOWN_PRODUCT))

    async def _controller(
        self, api_version: str, plural: str, namespace: str, owner: Owner
    ) -> Owner | None:
        """The controller of the object ``owner`` names, if it still is that object."""
        path = resource_path(api_version, plural, namespace, owner.name)
        found = await self.kube.get_or_none(path)
        if found is None or found["metadata"].get("uid") != owner.uid:
            return None
        return controller_of(found["metadata"])

    async def _owner_key(self, pod: PodView) -> Key:
        """The InferenceDeployment a pod belongs to, through its owner chain as the API
        server holds it (ReplicaSet -> Deployment -> InferenceDeployment; each link
        checked by UID), else its namespace's UNMANAGED key. ReplicaSets are cached."""
        owner = pod.owner
        if owner is None or owner.kind != "ReplicaSet":
            return (pod.namespace, UNMANAGED)
        if owner.uid not in self._replica_sets:
            key: Key | None = None
            deployment = await self._controller("apps/v1", "replicasets", pod.namespace, owner)
            if deployment is not None and deployment.kind == "Deployment":
                top = await self._controller("apps/v1", "deployments", pod.namespace, deployment)
                if top is not None and top.kind == INFERENCE_DEPLOYMENT_KIND:
                    key = (pod.namespace, top.name)
            self._replica_sets[owner.uid] = key
        return self._replica_sets[owner.uid] or (pod.namespace, UNMANAGED)

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
        owners = {pod.uid: await self._owner_key(pod) for pod in billed + others}
        nodes = {pod.uid: pod.node for pod in others + billed}  # the current view wins
        for uid, (key, node) in self._recorded_pods(reported - owners.keys()).items():
            owners[uid], nodes[uid] = key, node
        grouped: dict[Key, dict[str, PodView]] = {}
        for pod in billed:
            grouped.setdefault(owners[pod.uid], {})[pod.uid] = pod
        live = {pod.owner.uid for pod in (*current.values(), *gone.values()) if pod.owner}
        for uid in [uid for uid in self._replica_sets if uid not in live]:
            del self._replica_sets[uid]  # bounded by the pods the operator knows
        return grouped, owners, nodes

    def _recorded_pods(self, uids: set[str]) -> dict[str, tuple[Key, str]]:
        """Pods this operator has not seen but an open record holds (with their node):
        those that ended before a restart, whose last usage may still be on its way."""
        found: dict[str, tuple[Key, str]] = {}
        if not uids:
            return found
        for record in self.records.values():
            spec = record["spec"]
            key = (spec["account"], spec.get("inferenceDeployment") or UNMANAGED)
            for interval in (record.get("status") or {}).get("podIntervals") or []:
                if interval["uid"] in uids and interval.get("node"):
                    found[interval["uid"]] = (key, interval["node"])
        return found

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
        try:
            with metrics.FLUSH_DURATION.time():
                await self._flush(queued, self.clock())
        finally:
            for batch in queued:
                if not batch.future.done():
                    batch.future.set_result(batch.receipt(self.applied_through))

    async def _refuse(self, batches: list[intake.Batch], now: int) -> None:
        """File the batches' refused reports in the dead-letter store and give each filed
        one its gap marker, so its agent moves past it. Refused reports already applied
        (resends) are not filed again; unfiled ones (the store full or unreachable) get no
        marker: their agent resends them, and the rest of the flush goes on."""
        filing: list[tuple[intake.Batch, RefusedReport, UsageReport]] = []
        for batch in batches:
            batch.markers = []
            for refused in batch.refused:
                if refused.agent_id is None or refused.sequence is None:
                    continue  # nothing to move past: answered only
                marker = intake.gap_marker(batch.node, refused, now)
                if flush.applied(self.applied_through, marker) < marker.sequence:
                    filing.append((batch, refused, marker))
        if not filing:
            return
        try:
            filed = await self.dead_letters.add_reports(
                [(batch.node, refused) for batch, refused, _ in filing], now
            )
        except (ApiError, OSError, TimeoutError) as error:
            logger.error("filing %d refused reports: %s (kept unacknowledged)", len(filing), error)
            return
        if not filed:
            metrics.DEAD_LETTERS_FULL.set(1)
            logger.critical(
                "the dead-letter store %s/%s is full: %d refused reports stay unacknowledged",
                self.namespace,
                deadletter.NAME,
                len(filing),
            )
            return
        for batch, refused, marker in filing:
            batch.markers.append(marker)
            metrics.REPORTS_REFUSED.labels(batch.node).inc()
            logger.error(
                "report %d of agent %s on %s refused (%s): %.3f GPU-seconds claimed, filed in "
                "%s/%s",
                refused.sequence,
                refused.agent_id,
                batch.node,
                refused.reason,
                refused.claimed_us / 1e6,
                self.namespace,
                deadletter.NAME,
            )

    async def _plan_flush(
        self, batches: list[intake.Batch], seen: Observations, now: int
    ) -> FlushPlan:
        """The flush's plan. Should planning raise, the reports that make it raise are
        refused (filed, moved past) and the rest planned: one report never stops the
        flush; a fault that is no report's is raised."""

        def plan(reports: Sequence[UsageReport]) -> FlushPlan:
            return flush.plan(reports, self.applied_through, seen, self.windows, now)

        await self._refuse(batches, now)
        reports = [r for batch in batches for r in (*batch.reports, *batch.markers)]
        try:
            return plan(reports)
        except Exception:
            logger.exception("planning the flush failed: looking for the reports that fail it")
        poisoned = intake.poisoned(reports, plan)
        bad = {id(reports[index]): reason for index, reason in poisoned.items()}
        for batch in batches:
            refused = [refusal(r.to_wire(), bad[id(r)]) for r in batch.reports if id(r) in bad]
            batch.reports = [r for r in batch.reports if id(r) not in bad]
            batch.refused.extend(refused)
        await self._refuse(batches, now)
        return plan([r for batch in batches for r in (*batch.reports, *batch.markers)])

    async def _flush(self, batches: list[intake.Batch], now: int) -> None:
        await self._move_records_of_ending_namespaces()
        intake.limit_agents_per_node(batches)
        reports = [r for batch in batches for r in batch.reports]
        events = self.events.drain()
        pods, owners, nodes = await self._attribute(reports, events)
        await self._learn_nodes(
            [p for grouped in pods.values() for p in grouped.values()]
            + [pod for pod, _ in events.ended_pods]
        )
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
            lambda key, change: self._apply_record(key, change, now),
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
                exc_info=not isinstance(error, (ApiError, OSError, TimeoutError)),
            )
        if refused:
            failed |= await self._file_dead_letters(refused, now)

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
            self.applied_through = await self._save_progress(progress)
            metrics.USAGE_REPORTS.labels("applied").inc(advanced)
        await self._finalize(now)
        await self.exporter.step()
        try:
            await self._delete_exported_past_retention()
            await self._delete_expired_records(now)
        except (ApiError, OSError, TimeoutError) as error:
            logger.warning("deleting Final records past their retention: %s", error)
        try:
            await self.gpu_time.prune(now)
        except (ApiError, OSError, TimeoutError) as error:
            logger.warning("pruning GPU time objects: %s", error)

    # -- records -----------------------------------------------------------------------
    def _plan(self, namespace: str, deployment: str) -> tuple[str, Plan]:
        """The plan that prices a deployment: its own if granted to its namespace, else the
        namespace's default (never a price the tenant picked, never zero by default)."""
        spec = self.observed.spec_of((namespace, deployment))
        choice = self.config.plan_for(
            namespace, self.observed.labels_of(namespace), spec.billing.plan if spec else None
        )
        return choice.name, self.config.plans[choice.name]

    def _new_record(
        self, key: RecordKey, location: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        """The record the ledger creates for ``key`` at ``location`` (its own namespace
        and name unless moved), sealed."""
        namespace, name = location or (key.namespace, key.name)
        plan_name, plan = self._plan(key.namespace, key.deployment)
        spec = BillingRecordSpec(
            inference_deployment=key.deployment or None,
            account=key.namespace,
            window=Window.model_validate(
                {
                    "start": iso(key.window_start_ms),
                    "end": iso(key.window_start_ms + self.windows.window_ms),
                }
            ),
            plan=plan_name,
            granularity=plan.granularity,
            currency=plan.currency,
            price_per_gpu_second=plan.price(key.product),
            reserved_price_per_gpu_hour=plan.reserved_price(key.product),
            gpu_product=key.product,
        )
        labels = {
            **({DEPLOYMENT_LABEL: key.deployment} if key.deployment else {}),
            ACCOUNT_LABEL: key.namespace,
            WINDOW_LABEL: window_label(key.window_start_ms),
            STATE_LABEL: OPEN,
        }
        if namespace != key.namespace:
            labels[MOVED_FROM_LABEL] = key.namespace
        wire = spec.to_wire()
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "annotations": {seal.ANNOTATION: seal.seal(self._seal_key, namespace, name, wire)},
                **self.exporter.finalizers(),
            },
            "spec": wire,
        }

    def _location(self, key: RecordKey) -> tuple[str, str]:
        """Where a record is: in its namespace, or moved into the operator's."""
        if (key.namespace, key.name) in self._moved:
            return self.namespace, moved_name(key.namespace, key.name)
        return key.namespace, key.name

    async def _get_or_create(self, key: RecordKey) -> dict[str, Any]:
        location = self._location(key)
        path = resource_path(API_VERSION, PLURAL, *location)
        found = await self.kube.get_or_none(path)
        if found is None:
            try:
                found = await self.kube.create(
                    resource_path(API_VERSION, PLURAL, location[0]),
                    self._new_record(key, location),
                )
            except ApiError as error:
                if not error.conflict:
                    raise
                found = await self.kube.get(path)  # another writer created it first
        if await self._adopt(key, location, found):
            return dict(found)
        if location[0] == self.namespace:
            raise ApiError(409, {"reason": "Foreign"}, "ADOPT", f"{location}: not sealed by us")
        # Someone else made a record under this name: leave it be; keep ours moved.
        metrics.FOREIGN_RECORDS.inc()
        message = (
            f"BillingRecord {key.namespace}/{key.name} was not created by payper-operator "
            f"(no valid seal): ignored; the ledger keeps this record as "
            f"{self.namespace}/{moved_name(key.namespace, key.name)}"
        )
        logger.error(message)
        involved = {"apiVersion": API_VERSION, "kind": KIND, "name": key.name}
        await self.kube.post_event(
            {**involved, "namespace": key.namespace},
            key.namespace,
            FOREIGN_RECORD,
            message,
            iso(self.clock()),
        )
        self._moved.add((key.namespace, key.name))
        return await self._get_or_create(key)

    async def _adopt(self, key: RecordKey, location: tuple[str, str], found: Any) -> bool:
        """Whether the ledger may write to ``found``: sealed by it, or unsealed from before
        seals (then it must be exactly the record the ledger would create; it is sealed)."""
        verified = seal.verify(self._seal_key, found)
        if verified is not None:
            return verified
        expected = self._new_record(key, location)
        if found.get("spec") != expected["spec"]:
            return False
        try:
            await self.kube.patch(
                resource_path(API_VERSION, PLURAL, *location),
                {"metadata": {"annotations": expected["metadata"]["annotations"]}},
            )
        except ApiError as error:
            logger.warning("sealing %s/%s: %s", *location, error)
        return True

    async def _move_records_of_ending_namespaces(self) -> None:
        """Before a deleted namespace's records go (the namespace controller deletes them),
        copy each open one, as last written, into the operator's namespace; its later
        usage lands in the copy. A copy that exists already (a retry) is kept. With
        export sinks, so is every Final record not yet exported (their finalizer holds
        them until then)."""
        for namespace, name in list(self.records):
            if namespace != self.namespace and self.observed.namespace_ending(namespace):
                await self._move_record(namespace, name)
        for namespace, name in self.exporter.final_records():
            if namespace != self.namespace and self.observed.namespace_ending(namespace):
                found = await self.kube.get_or_none(
                    resource_path(API_VERSION, PLURAL, namespace, name)
                )
                if found is not None:
                    await self._move_record(namespace, name, found)
        if not self.exporter.enabled:
            await self._release_abandoned_exports()

    async def _release_abandoned_exports(self) -> None:
        """With no sink configured (any more: a platform admin removed them), nothing will
        ever export a record, so the export finalizer an earlier configuration put on a
        deleted namespace's Final records would hold the namespace's deletion for good:
        it goes, with a warning (they leave with their namespace, as records always do
        without sinks). Each ending namespace is looked at once."""
        for namespace in self.observed.ending_namespaces_now():
            if namespace == self.namespace or namespace in self._abandoned_checked:
                continue
            try:
                listing = await self.kube.list(resource_path(API_VERSION, PLURAL, namespace))
            except (ApiError, OSError, TimeoutError) as error:
                logger.warning("records of %s: %s (retried next flush)", namespace, error)
                continue
            held = [
                item["metadata"]["name"]
                for item in listing["items"]
                if outbox.FINALIZER in (item["metadata"].get("finalizers") or [])
            ]
            if held:
                logger.warning(
                    "namespace %s is being deleted and no export sink is configured: the "
                    "export finalizer of its %d records not exported is dropped (%s)",
                    namespace,
                    len(held),
                    ", ".join(sorted(held)[:10]),
                )
            for name in held:
                await self.exporter.release((namespace, name))
            self._abandoned_checked[namespace] = None
            while len(self._abandoned_checked) > MAX_ABANDONED_CHECKED:
                self._abandoned_checked.popitem(last=False)

    async def _move_record(
        self, namespace: str, name: str, record: dict[str, Any] | None = None
    ) -> bool:
        """Move one record (a cached open one, or ``record``) into the operator's
        namespace; whether it moved. The original's export finalizer then goes: the copy
        is the record, and the namespace's deletion may finish."""
        record = record or self.records[(namespace, name)]
        moved = moved_name(namespace, name)
        target = resource_path(API_VERSION, PLURAL, self.namespace, moved)
        labels = {**(record["metadata"].get("labels") or {}), MOVED_FROM_LABEL: namespace}
        annotations = {
            **{
                name: value
                for name, value in (record["metadata"].get("annotations") or {}).items()
                if name.startswith(outbox.ANNOTATION_PREFIX)
            },
            outbox.IDENTITY_ANNOTATION: outbox.identity(record["metadata"]),
            seal.ANNOTATION: seal.seal(self._seal_key, self.namespace, moved, record["spec"]),
        }
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": moved,
                "namespace": self.namespace,
                "labels": labels,
                "annotations": annotations,
                **self.exporter.finalizers(),
            },
            "spec": record["spec"],
        }
        try:
            try:
                copy = await self.kube.create(
                    resource_path(API_VERSION, PLURAL, self.namespace), body
                )
            except ApiError as error:
                if not error.conflict:
                    raise
                copy = await self.kube.get(target)
            if not (copy.get("status") or {}).get("lastUpdateTime"):
                status = BillingRecordStatus.model_validate(record.get("status") or {})
                copy = await self.kube.replace_status(f"{target}/status", copy, status)
        except ApiError as error:
            logger.warning("moving record %s/%s: %s (retried next flush)", namespace, name, error)
            return False
        self._moved.add((namespace, name))
        if self.records.pop((namespace, name), None) is not None:
            self.records[(self.namespace, moved)] = copy
        self.exporter.tracked.pop((namespace, name), None)
        self.exporter.observe(copy)
        await self.exporter.release((namespace, name))
        metrics.RECORDS_MOVED.inc()
        logger.warning(
            "namespace %s is being deleted: its open record %s is now %s/%s",
            namespace,
            name,
            self.namespace,
            moved,
        )
        return True

    async def _apply_record(self, key: RecordKey, change: RecordChange, now: int) -> None:
        cache_key = self._location(key)
        record = self.records.get(cache_key)
        for _ in range(MAX_CONFLICT_RETRIES):
            if record is None:
                record = await self._get_or_create(key)
            status = BillingRecordStatus.model_validate(record.get("status") or {})
            if status.state == FINAL:
                # Cannot happen for a window still open by our clock; never write a Final record.
                logger.error("record %s/%s is Final; its usage stays unacknowledged", *cache_key)
                raise ApiError(409, {"reason": "Final"}, "APPLY", key.name)
            spec = BillingRecordSpec.model_validate(record["spec"])
            updated, _ = apply(status, spec, change, now, self.applied_through)
            if same_totals(updated, status):
                self.records[cache_key] = record
                return  # a resend already in this record, or no change at all
            try:
                record = await self.kube.replace_status(
                    resource_path(API_VERSION, PLURAL, *cache_key, "status"),
                    record,
                    updated,
                )
            except ApiError as error:
                if (
                    error.not_found
                    and cache_key[0] == key.namespace
                    and self.observed.namespace_ending(key.namespace)
                    and await self._move_record(*cache_key)
                ):
                    # Deleted with its namespace before this flush moved it: moved now,
                    # from the state the ledger last wrote; the change is applied there.
                    cache_key = self._location(key)
                    record = self.records[cache_key]
                    continue
                if error.conflict or error.not_found:
                    # Someone else wrote it, or it is gone (its namespace being deleted):
                    # read (or create) it again and re-apply; a create that can never
                    # succeed raises what the dead-letter store recognises.
                    record = None
                    self.records.pop(cache_key, None)
                    continue
                raise
            assert record is not None
            self.records[cache_key] = record
            self.exporter.observe(record, updated, spec)
            self._count(key, spec, status, updated)
            return
        raise ApiError(409, {"reason": "Conflict"}, "APPLY", f"{key.name}: too many conflicts")

    def _count(
        self,
        key: RecordKey,
        spec: BillingRecordSpec,
        before: BillingRecordStatus,
        after: BillingRecordStatus,
    ) -> None:
        labels = (key.namespace, key.deployment, key.product)
        metrics.ACTIVE.labels(*labels).inc(max(0, after.active_us - before.active_us) / 1e6)
        metrics.BILLED.labels(*labels).inc(max(0, after.billed_ms - before.billed_ms) / 1000)
        metrics.PROVISIONED.labels(*labels).inc(
            max(0, after.provisioned_ms - before.provisioned_ms) / 1000
        )
        for granularity in GRANULARITY_MS:
            now_ms = after.rounded_ms.at(granularity)
            was_ms = before.rounded_ms.at(granularity)
            metrics.ROUNDED.labels(*labels, granularity).inc(max(0, now_ms - was_ms) / 1000)
            priced = amount(now_ms, spec.price_per_gpu_second) - amount(
                was_ms, spec.price_per_gpu_second
            )
            if priced > 0:
                metrics.AMOUNT_AT_GRANULARITY.labels(*labels, granularity, spec.currency).inc(
                    float(priced)
                )
        # Prometheus samples are floats by definition; the records keep the exact decimals.
        for metric, was, now in (
            (metrics.BILLED_AMOUNT, before.amount, after.amount),
            (
                metrics.RESERVED_AMOUNT,
                before.reserved_equivalent_amount,
                after.reserved_equivalent_amount,
            ),
        ):
            money_delta = Decimal(now) - Decimal(was)
            if money_delta > 0:
                metric.labels(*labels, spec.currency).inc(float(money_delta))

    async def _save_progress(self, progress: dict[str, int]) -> dict[str, int]:
        """Store the per-agent progress; returns what is now durable.

        Optimistic concurrency on the ConfigMap's resourceVersion. A conflict (a save
        that committed although its answer was lost, or another writer) is resolved by
        reading the stored progress and merging by maximum: progress only ever grows,
        and every sequence in either copy was applied to every record it touches.
        """
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                return await self._write_progress(progress)
            except ApiError as error:
                if not error.conflict:
                    raise
            existing = await self.kube.get(self._ledger_path)
            self._ledger_version = existing["metadata"]["resourceVersion"]
            stored = _progress_of(existing)
            progress = {
                agent: max(progress.get(agent, 0), stored.get(agent, 0))
                for agent in {*progress, *stored}
            }
        raise ApiError(409, {"reason": "Conflict"}, "SAVE", "progress: too many conflicts")

    async def _write_progress(self, progress: dict[str, int]) -> dict[str, int]:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.config.ledger_config_map,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/part-of": "payper"},
            },
            "data": {"appliedThrough": json.dumps(progress, sort_keys=True)},
        }
        if self._ledger_version is None:
            created = await self.kube.create(
                resource_path("v1", "configmaps", self.namespace), body
            )  # a conflict here: someone created it first; the caller merges
            self._ledger_version = created["metadata"]["resourceVersion"]
            return progress
        body["metadata"]["resourceVersion"] = self._ledger_version
        replaced = await self.kube.replace(self._ledger_path, body)
        self._ledger_version = replaced["metadata"]["resourceVersion"]
        return progress

    async def _file_dead_letters(
        self, refused: list[tuple[RecordKey, RecordChange, str]], now: int
    ) -> set[RecordKey]:
        """File changes the API server refuses for good; the keys that could not be."""
        store = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": deadletter.NAME,
            "namespace": self.namespace,
        }
        if not await self.dead_letters.add(refused, now):
            metrics.DEAD_LETTERS_FULL.set(1)
            message = (
                f"the dead-letter store {self.namespace}/{deadletter.NAME} is full: reports "
                f"for {len(refused)} refused records stay unacknowledged until it is emptied"
            )
            logger.critical(message)
            if not self._store_full:
                self._store_full = True
                await self.kube.post_event(
                    store, self.namespace, DEAD_LETTERS_FULL, message, iso(now)
                )
            return {key for key, _, _ in refused}
        self._store_full = False
        metrics.DEAD_LETTERS_FULL.set(0)
        for key, change, reason in refused:
            metrics.DEAD_LETTERS.labels(reason).inc()
            active_us = sum(d.active_us for d in change.usage)
            message = (
                f"{active_us} µs of GPU time for {key.namespace}/{key.name} cannot be billed "
                f"({reason}): filed in {self.namespace}/{deadletter.NAME} for the platform "
                "team to settle"
            )
            logger.error(message)
            if (key, reason) in self._evented or len(self._evented) >= deadletter.MAX_ENTRIES:
                continue  # one event per entry (and no more than the store holds entries)
            self._evented.add((key, reason))
            await self.kube.post_event(store, self.namespace, DEAD_LETTERED, message, iso(now))
        return set()

    async def _label_final(
        self, cache_key: tuple[str, str], record: dict[str, Any]
    ) -> dict[str, Any]:
        """Mark a Final record by label, so that start-up no longer lists it (with sinks:
        once Exported). Should this fail, the next start-up lists it and finds it Final by
        its status: relabelled. Returns the record as it now is."""
        if (record["metadata"].get("labels") or {}).get(STATE_LABEL) in (FINAL, EXPORTED):
            return record
        try:
            labelled: dict[str, Any] = await self.kube.patch(
                resource_path(API_VERSION, PLURAL, *cache_key),
                {"metadata": {"labels": {STATE_LABEL: FINAL}}},
            )
        except ApiError as error:
            logger.warning("labelling %s/%s Final: %s", *cache_key, error)
            return record
        return labelled

    async def _delete_exported_past_retention(self) -> None:
        """Records that were past their retention when they became Exported (exported
        late: a sink that was down, a namespace moved): deleted now."""
        expired, self.exporter.expired = self.exporter.expired, []
        for location, uid in expired:
            await self._delete_record(location, uid)

    async def _delete_record(self, location: tuple[str, str], uid: str) -> None:
        """Delete one record past its retention, only if it is still the object that was
        read (UID precondition: one re-created under the name meanwhile is left alone)."""
        try:
            await self.kube.delete(
                resource_path(API_VERSION, PLURAL, *location),
                body={"preconditions": {"uid": uid}},
            )
        except ApiError as error:
            if not (error.conflict or error.not_found):
                raise
            return
        metrics.RECORDS_DELETED.inc()
        logger.info(
            "record %s/%s deleted: past its retention of %d days",
            *location,
            self.config.retention_days,
        )

    async def _delete_expired_records(self, now: int) -> None:
        """Delete the Final records (with sinks: Exported, acknowledged by every sink) whose
        window ended ``recordRetentionDays`` ago, page by page, each only if it is still
        the object that was read (UID precondition)."""
        days = self.config.retention_days
        if days is None or now < self._next_retention_check_ms:
            return
        self._next_retention_check_ms = now + RETENTION_CHECK_MS
        done = EXPORTED if self.exporter.enabled else FINAL
        query = {"labelSelector": f"{STATE_LABEL}={done}", "limit": str(RETENTION_PAGE)}
        while True:
            page = await self.kube.get(resource_path(API_VERSION, PLURAL), query)
            items = {
                (item["metadata"]["namespace"], item["metadata"]["name"]): item
                for item in page["items"]
                if (item.get("status") or {}).get("state") == FINAL
            }
            ends = {key: parse_iso(item["spec"]["window"]["end"]) for key, item in items.items()}
            for key in flush.expired(ends, days * 86_400_000, now):
                finalizers = items[key]["metadata"].get("finalizers") or []
                if not self.exporter.enabled and outbox.FINALIZER in finalizers:
                    await self.exporter.release(key)  # no sink left to wait for
                await self._delete_record(key, items[key]["metadata"]["uid"])
            token = page.get("metadata", {}).get("continue")
            if not token:
                return
            query["continue"] = token

    async def _finalize(self, now: int) -> None:
        starts = {key: parse_iso(r["spec"]["window"]["start"]) for key, r in self.records.items()}
        for cache_key in flush.closing(starts, self.windows, now):
            record = self.records[cache_key]
            status = BillingRecordStatus.model_validate(record.get("status") or {})
            if status.state == FINAL:
                self.exporter.observe(await self._label_final(cache_key, record))
                self.records.pop(cache_key)
                continue
            spec = BillingRecordSpec.model_validate(record["spec"])
            updated, _ = apply(status, spec, RecordChange(), now, self.applied_through)
            final = BillingRecordStatus.model_validate(
                {**updated.model_dump(), "state": FINAL, "finalized_at": iso(now)}
            )
            try:
                written = await self.kube.replace_status(
                    resource_path(API_VERSION, PLURAL, cache_key[0], cache_key[1], "status"),
                    record,
                    final,
                )
            except ApiError as error:
                if error.conflict:
                    # Written meanwhile (the exporter noting what a sink took): read again,
                    # finalised at the next flush. Dropping it from the cache instead left
                    # a record that got no more usage Open, and unexported, until a restart.
                    await self._reread(cache_key)
                    continue
                logger.warning("finalizing %s/%s: %s", *cache_key, error)
                continue
            self.exporter.observe(await self._label_final(cache_key, written))
            self.records.pop(cache_key)
            metrics.FINALIZED.inc()
            logger.info("record %s/%s is Final", *cache_key)

    async def _reread(self, cache_key: tuple[str, str]) -> None:
        """The record as the API server holds it now, in the cache; gone (or with a seal
        that does not verify), out of it. On an error the cached copy stays: the next
        write conflicts again and comes back here."""
        try:
            found = await self.kube.get_or_none(resource_path(API_VERSION, PLURAL, *cache_key))
        except (ApiError, OSError, TimeoutError) as error:
            logger.warning("re-reading %s/%s: %s", *cache_key, error)
            return
        if found is None or seal.verify(self._seal_key, found) is False:
            self.records.pop(cache_key, None)
        else:
            self.records[cache_key] = found


def _progress_of(config_map: dict[str, Any]) -> dict[str, int]:
    raw = (config_map.get("data") or {}).get("appliedThrough", "{}")
    return {str(agent): int(sequence) for agent, sequence in json.loads(raw).items()}
