"""The ledger: usage reports and the operator's own observations become BillingRecords.

Every flush interval (default 10 s) the ledger takes the reports that arrived, keeps per
agent only the next ones in sequence (resends are recognised, a report after a gap waits
for the one before it), groups their usage by record (deployment x window x GPU
product), and writes each touched record once, with optimistic concurrency on its
resourceVersion. The totals and the per-agent last applied sequence go in the same
update (``payper.billing.records.apply``), so a crash, a retry or a second writer can
neither lose nor repeat a report's usage in any record.

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
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from payper.api.billing_record import (
    FINAL,
    GRANULARITY_MS,
    KIND,
    PLURAL,
    BillingRecordSpec,
    BillingRecordStatus,
    Window,
)
from payper.api.common import API_VERSION
from payper.api.inference_deployment import GPU_PRODUCT_LABEL
from payper.api.usage import UsageReport
from payper.billing import metrics
from payper.billing.config import BillingConfig
from payper.billing.events import BillingEvents, Observed
from payper.billing.pricing import UNKNOWN_PLAN, UNKNOWN_PRODUCT, Plan, amount, product_key
from payper.billing.records import (
    ACCOUNT_LABEL,
    DEPLOYMENT_LABEL,
    WINDOW_LABEL,
    PodSpan,
    RecordChange,
    RecordKey,
    UsageDelta,
    apply,
    same_totals,
    window_label,
    window_start,
)
from payper.clock import iso, now_ms, parse_iso
from payper.kube import ApiError, Kube, resource_path
from payper.observed import Key, PodView

logger = logging.getLogger(__name__)
MAX_CONFLICT_RETRIES = 6


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
        self.events = events
        self.clock = clock
        self.window_ms = config.window_seconds * 1000
        self.grace_ms = config.grace_seconds * 1000
        self.applied_through: dict[str, int] = {}
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        """Open records as last read or written, by (namespace, name)."""
        self._queue: list[tuple[list[UsageReport], asyncio.Future[dict[str, int]]]] = []
        self._nodes: dict[str, str] = {}
        self._unplaced_since: dict[Key, int] = {}
        """Deployments whose counts wait for a known GPU product, since when (ms)."""
        self._ledger_version: str | None = None

    # -- start -------------------------------------------------------------------------
    @property
    def _ledger_path(self) -> str:
        return resource_path("v1", "configmaps", self.namespace, self.config.ledger_config_map)

    async def load(self) -> None:
        """Read the per-agent progress and every open record (after a restart too)."""
        stored = await self.kube.get_or_none(self._ledger_path)
        if stored is not None:
            self._ledger_version = stored["metadata"]["resourceVersion"]
            raw = (stored.get("data") or {}).get("appliedThrough", "{}")
            self.applied_through = {str(k): int(v) for k, v in json.loads(raw).items()}
        listing = await self.kube.list(resource_path(API_VERSION, PLURAL))
        for item in listing["items"]:
            if (item.get("status") or {}).get("state") != FINAL:
                self.records[(item["metadata"]["namespace"], item["metadata"]["name"])] = item
        logger.info(
            "ledger: %d agents, %d open records", len(self.applied_through), len(self.records)
        )

    # -- intake --------------------------------------------------------------------------
    async def submit(self, reports: list[UsageReport]) -> dict[str, int]:
        """Queue reports for the next flush; returns, per agent, what is applied durably."""
        future: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
        self._queue.append((reports, future))
        return await future

    # -- flush ---------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval_seconds)
            try:
                await self.flush()
            except Exception:
                logger.exception("billing flush failed; reports stay unacknowledged")

    def _closed(self, start_ms: int, now: int) -> bool:
        return start_ms + self.window_ms + self.grace_ms <= now

    def _select(self, reports: list[UsageReport], now: int) -> list[UsageReport]:
        by_agent: dict[str, dict[int, UsageReport]] = defaultdict(dict)
        for report in reports:
            by_agent[report.agent_id].setdefault(report.sequence, report)
        accepted = []
        for agent, numbered in by_agent.items():
            expected = self.applied_through.get(agent, 0) + 1
            for sequence in sorted(numbered):
                report = numbered[sequence]
                if sequence < expected:
                    metrics.USAGE_REPORTS.labels("duplicate").inc()
                elif sequence == expected:
                    accepted.append(report)
                    expected += 1
                else:
                    # A gap: the missing report must come first. Not acknowledged, so
                    # the agent sends this one again after it.
                    later = sum(1 for n in numbered if n >= sequence)
                    metrics.USAGE_REPORTS.labels("out_of_order").inc(later)
                    break
        for report in accepted:
            metrics.USAGE_LAG.observe(max(0, now - report.interval_end_ms) / 1000)
        return accepted

    async def _product(self, pod: PodView | None, key: Key) -> str:
        """The product the deployment asks for, else the one its pod's node carries."""
        spec = self.observed.spec_of(key)
        if spec is not None and spec.gpu.product:
            return product_key(spec.gpu.product)
        if pod is None or pod.node is None:
            return UNKNOWN_PRODUCT
        if pod.node not in self._nodes:
            node = await self.kube.get_or_none(resource_path("v1", "nodes", name=pod.node))
            labels = (node or {}).get("metadata", {}).get("labels") or {}
            self._nodes[pod.node] = product_key(labels.get(GPU_PRODUCT_LABEL, UNKNOWN_PRODUCT))
        return self._nodes[pod.node]

    async def _count_product(self, key: Key, now: int) -> str | None:
        """The product a deployment's request and cold-start counts go under; None: hold
        them for a later flush, as no pod of it is on a node yet."""
        pods = self.observed.pods.get(key, {}).values()
        product = await self._product(next((p for p in pods if p.node is not None), None), key)
        if product != UNKNOWN_PRODUCT:
            self._unplaced_since.pop(key, None)
            return product
        since = self._unplaced_since.setdefault(key, now)
        if now - since < self.window_ms + self.grace_ms:
            return None
        self._unplaced_since.pop(key, None)  # no pod ever landed: file them as they are
        return product

    async def _pod_spans(
        self, changes: dict[RecordKey, RecordChange], events: BillingEvents, now: int
    ) -> None:
        spans: list[tuple[Key, PodView, int]] = list(events.ended_pods)
        for (namespace, deployment), pods in self.observed.pods.items():
            for pod in pods.values():
                if pod.scheduled_ms is not None and pod.gpus > 0:
                    spans.append(((namespace, deployment), pod, now))
        oldest_open = window_start(now - self.window_ms - self.grace_ms, self.window_ms)
        for key, pod, end in spans:
            if pod.scheduled_ms is None or end <= pod.scheduled_ms:
                continue
            product = await self._product(pod, key)
            start = max(window_start(pod.scheduled_ms, self.window_ms), oldest_open)
            while start < end:
                stop = start + self.window_ms
                if not self._closed(start, now) and pod.scheduled_ms < stop:
                    record = RecordKey(key[0], key[1], start, product)
                    changes[record].pods[pod.uid] = PodSpan(
                        pod.uid, pod.name, pod.gpus, max(pod.scheduled_ms, start), min(end, stop)
                    )
                start = stop

    def _usage_changes(
        self, accepted: list[UsageReport], now: int
    ) -> tuple[dict[RecordKey, RecordChange], dict[tuple[str, int], set[RecordKey]]]:
        changes: dict[RecordKey, RecordChange] = defaultdict(RecordChange)
        touched: dict[tuple[str, int], set[RecordKey]] = defaultdict(set)
        current = window_start(now, self.window_ms)
        for report in accepted:
            observed = window_start(report.interval_start_ms, self.window_ms)
            late = self._closed(observed, now)
            for series in report.series:
                if series.inference_deployment is None:
                    continue  # a GPU pod Payper does not manage: metered, not billed
                key = RecordKey(
                    series.namespace,
                    series.inference_deployment,
                    current if late else observed,
                    product_key(series.gpu_product),
                )
                changes[key].usage.append(
                    UsageDelta(
                        agent_id=report.agent_id,
                        sequence=report.sequence,
                        active_us=series.active_us,
                        rounded_ms=series.rounded_ms,
                        bursts=series.bursts,
                        original_window_ms=observed if late else None,
                    )
                )
                touched[(report.agent_id, report.sequence)].add(key)
        return changes, touched

    async def flush(self) -> None:
        """Apply what arrived; answer every waiting request, whatever happens."""
        queued, self._queue = self._queue, []
        try:
            with metrics.FLUSH_DURATION.time():
                await self._flush([r for batch, _ in queued for r in batch], self.clock())
        finally:
            for batch, future in queued:
                if not future.done():
                    future.set_result(
                        {r.agent_id: self.applied_through.get(r.agent_id, 0) for r in batch}
                    )

    async def _flush(self, reports: list[UsageReport], now: int) -> None:
        accepted = self._select(reports, now)
        changes, touched = self._usage_changes(accepted, now)
        events = self.events.drain()
        current = window_start(now, self.window_ms)
        products: dict[tuple[str, str, int], str] = {}
        for key in changes:
            products.setdefault((key.namespace, key.deployment, key.window_start_ms), key.product)
        for field, counts, held in (
            ("requests", events.requests, self.events.requests),
            ("cold_starts", events.cold_starts, self.events.cold_starts),
        ):
            for deployment, count in counts.items():
                product = products.get((*deployment, current))
                if product is None:
                    product = await self._count_product(deployment, now)
                    if product is None:  # counted again at the next flush
                        held[deployment] = held.get(deployment, 0) + count
                        continue
                    products[(*deployment, current)] = product
                change = changes[RecordKey(*deployment, current, product)]
                setattr(change, field, getattr(change, field) + count)
        await self._pod_spans(changes, events, now)
        for key, change in changes.items():
            if change.pods:
                _, plan = self._plan(key.namespace, key.deployment)
                metrics.prime(key.namespace, key.deployment, key.product, plan.currency)

        failed: set[RecordKey] = set()
        for key, change in changes.items():
            try:
                await self._apply_record(key, change, now)
            except (ApiError, OSError, TimeoutError) as error:
                failed.add(key)
                logger.warning(
                    "record %s/%s not written this flush: %s", key.namespace, key.name, error
                )

        advanced = False
        for report in accepted:
            agent = report.agent_id
            if self.applied_through.get(agent, 0) != report.sequence - 1:
                continue  # an earlier report of this agent failed in this flush
            if touched.get((agent, report.sequence), set()) & failed:
                continue
            self.applied_through[agent] = report.sequence
            metrics.USAGE_REPORTS.labels("applied").inc()
            advanced = True
        if advanced:
            await self._save_progress()
        await self._finalize(now)

    # -- records -----------------------------------------------------------------------
    def _plan(self, namespace: str, deployment: str) -> tuple[str, Plan]:
        spec = self.observed.spec_of((namespace, deployment))
        name = spec.billing.plan if spec else "default"
        return name, self.config.plans.get(name, UNKNOWN_PLAN)

    def _new_record(self, key: RecordKey) -> dict[str, Any]:
        plan_name, plan = self._plan(key.namespace, key.deployment)
        spec = BillingRecordSpec(
            inference_deployment=key.deployment,
            account=key.namespace,
            window=Window.model_validate(
                {
                    "start": iso(key.window_start_ms),
                    "end": iso(key.window_start_ms + self.window_ms),
                }
            ),
            plan=plan_name,
            granularity=plan.granularity,
            currency=plan.currency,
            price_per_gpu_second=plan.price(key.product),
            reserved_price_per_gpu_hour=plan.reserved_price(key.product),
            gpu_product=key.product,
        )
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": key.name,
                "namespace": key.namespace,
                "labels": {
                    DEPLOYMENT_LABEL: key.deployment,
                    ACCOUNT_LABEL: key.namespace,
                    WINDOW_LABEL: window_label(key.window_start_ms),
                },
            },
            "spec": spec.to_wire(),
        }

    async def _get_or_create(self, key: RecordKey) -> dict[str, Any]:
        path = resource_path(API_VERSION, PLURAL, key.namespace, key.name)
        found = await self.kube.get_or_none(path)
        if found is not None:
            return dict(found)
        try:
            created: dict[str, Any] = await self.kube.create(
                resource_path(API_VERSION, PLURAL, key.namespace), self._new_record(key)
            )
        except ApiError as error:
            if not error.conflict:
                raise
            created = await self.kube.get(path)  # another writer created it first
        return created

    async def _apply_record(self, key: RecordKey, change: RecordChange, now: int) -> None:
        cache_key = (key.namespace, key.name)
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
            updated, _ = apply(status, spec, change, now)
            if same_totals(updated, status):
                self.records[cache_key] = record
                return  # a resend already in this record, or no change at all
            try:
                record = await self.kube.replace_status(
                    resource_path(API_VERSION, PLURAL, key.namespace, key.name, "status"),
                    record,
                    updated,
                )
            except ApiError as error:
                if error.conflict:
                    record = None  # someone else wrote it: read again and re-apply
                    continue
                raise
            assert record is not None
            self.records[cache_key] = record
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

    async def _save_progress(self) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.config.ledger_config_map,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/part-of": "payper"},
            },
            "data": {"appliedThrough": json.dumps(self.applied_through, sort_keys=True)},
        }
        if self._ledger_version is None:
            try:
                created = await self.kube.create(
                    resource_path("v1", "configmaps", self.namespace), body
                )
                self._ledger_version = created["metadata"]["resourceVersion"]
                return
            except ApiError as error:
                if not error.conflict:
                    raise
                existing = await self.kube.get(self._ledger_path)
                self._ledger_version = existing["metadata"]["resourceVersion"]
        body["metadata"]["resourceVersion"] = self._ledger_version
        # A conflict here means another operator is writing: stop rather than overwrite.
        replaced = await self.kube.replace(self._ledger_path, body)
        self._ledger_version = replaced["metadata"]["resourceVersion"]

    async def _finalize(self, now: int) -> None:
        for cache_key, record in list(self.records.items()):
            start = parse_iso(record["spec"]["window"]["start"])
            if not self._closed(start, now):
                continue
            status = BillingRecordStatus.model_validate(record.get("status") or {})
            if status.state == FINAL:
                self.records.pop(cache_key)
                continue
            spec = BillingRecordSpec.model_validate(record["spec"])
            updated, _ = apply(status, spec, RecordChange(), now)
            final = updated.model_copy(update={"state": FINAL, "finalized_at": iso(now)})
            try:
                await self.kube.replace_status(
                    resource_path(API_VERSION, PLURAL, cache_key[0], cache_key[1], "status"),
                    record,
                    BillingRecordStatus.model_validate(final.model_dump()),
                )
            except ApiError as error:
                if error.conflict:
                    self.records.pop(cache_key)  # re-read next time
                    continue
                logger.warning("finalizing %s/%s: %s", *cache_key, error)
                continue
            self.records.pop(cache_key)
            metrics.FINALIZED.inc()
            logger.info("record %s/%s is Final", *cache_key)
