"""Where the per-GPU reconciliation is kept: one ConfigMap per node and billing window in
the operator's namespace, written by the ledger after the records, before the progress.

ConfigMaps because the object is small (at most 64 GPU rows and 64 agents, a few KiB),
only the operator reads and writes it, and ``payper reconcile`` lists a range of them
cheaply by label (``payper.dev/gpu-time``, the window and the node). Each is written
with optimistic concurrency, and holds the last report applied per agent, so the reports
are added exactly once (``payper.billing.reconciliation``). A write that fails keeps its
reports unacknowledged: they come again and are added then, never twice.

Retention: objects whose window ended more than ``reconciliationRetentionDays`` ago are
deleted, checked once per window. (BillingRecords are kept until the export work prunes
exported Final ones; both carry the window label for it.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from payper.api.reconciliation import NodeWindowReconciliation
from payper.billing import metrics, reconciliation
from payper.billing.flush import BillingWindows, FlushPlan
from payper.billing.records import WINDOW_LABEL, RecordKey, window_label
from payper.kube import ApiError, Kube, resource_path

logger = logging.getLogger(__name__)

KIND_LABEL = "payper.dev/gpu-time"
KIND_VALUE = "node-window"
NODE_LABEL = "payper.dev/node"
DATA_KEY = "reconciliation"
NAME_PREFIX = "payper-gpu-time"
MAX_CONFLICT_RETRIES = 6
MAX_CONCURRENT_WRITES = 16
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def node_label(node: str) -> str:
    """The node's name where it is a valid label value, else a digest of it."""
    if len(node) <= 63 and _LABEL_VALUE.match(node):
        return node
    return hashlib.sha256(node.encode()).hexdigest()[:40]


def object_name(node: str, window_start_ms: int) -> str:
    digest = hashlib.sha256(node.encode()).hexdigest()[:12]
    return f"{NAME_PREFIX}-{window_label(window_start_ms).lower()}-{digest}"


def parse(config_map: Mapping[str, Any]) -> NodeWindowReconciliation:
    raw = (config_map.get("data") or {}).get(DATA_KEY, "{}")
    return NodeWindowReconciliation.model_validate_json(raw)


def selector(window_start_ms: int | None = None, node: str | None = None) -> str:
    parts = [f"{KIND_LABEL}={KIND_VALUE}"]
    if window_start_ms is not None:
        parts.append(f"{WINDOW_LABEL}={window_label(window_start_ms)}")
    if node is not None:
        parts.append(f"{NODE_LABEL}={node_label(node)}")
    return ",".join(parts)


class ReconciliationStore:
    def __init__(
        self, kube: Kube, namespace: str, windows: BillingWindows, retention_ms: int
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.windows = windows
        self.retention_ms = retention_ms
        self.cache: dict[str, dict[str, Any]] = {}
        """Objects of open windows as last read or written, by name."""
        self._pruned_window: int | None = None
        self.durable: dict[str, int] = {}
        """The ledger's saved progress as of this flush (agents it lets objects forget)."""

    def _path(self, name: str | None = None) -> str:
        return resource_path("v1", "configmaps", self.namespace, name)

    async def record(
        self,
        planned: FlushPlan,
        acknowledged: Mapping[str, int],
        not_written: set[RecordKey],
        now_ms: int,
        durable: Mapping[str, int] | None = None,
    ) -> dict[str, int]:
        """Add the acknowledged reports' per-GPU times; returns the progress that may be
        saved: lowered, per agent, to before its first report whose object failed."""
        self.durable = dict(durable or {})
        grouped = reconciliation.collect(planned, acknowledged, not_written, self.windows, now_ms)
        progress = dict(acknowledged)
        if not grouped:
            return progress
        limit = asyncio.Semaphore(MAX_CONCURRENT_WRITES)

        async def write(target: reconciliation.NodeWindow) -> None:
            async with limit:
                try:
                    await self._write(target, now_ms)
                except (ApiError, OSError, TimeoutError, ValueError) as error:
                    logger.warning(
                        "GPU time of %s not saved this flush (its reports wait): %s",
                        target.node,
                        error,
                    )
                    for report in target.reports:
                        if progress.get(report.agent, 0) >= report.sequence:
                            progress[report.agent] = report.sequence - 1

        await asyncio.gather(*(write(target) for target in grouped.values()))
        self._forget_closed(now_ms)
        return progress

    async def _write(self, target: reconciliation.NodeWindow, now_ms: int) -> None:
        name = object_name(target.node, target.window_start_ms)
        found = self.cache.get(name)
        for _ in range(MAX_CONFLICT_RETRIES):
            if found is None:
                found = await self.kube.get_or_none(self._path(name))
            stored = (
                parse(found)
                if found is not None
                else reconciliation.empty(
                    target.node, target.window_start_ms, self.windows.window_ms
                )
            )
            updated, new = reconciliation.merge(stored, target.reports, now_ms, self.durable)
            if not new:
                if found is not None:
                    self.cache[name] = found
                return  # resends only: already here
            body = self._body(name, target, updated, found)
            try:
                if found is None:
                    written = await self.kube.create(self._path(), body)
                else:
                    written = await self.kube.replace(self._path(name), body)
            except ApiError as error:
                if error.conflict or error.not_found:
                    found = None  # another write won, or it was created meanwhile: re-read
                    self.cache.pop(name, None)
                    continue
                raise
            self.cache[name] = written
            self._count(target.node, new)
            return
        raise ApiError(409, {"reason": "Conflict"}, "WRITE", f"{name}: too many conflicts")

    def _body(
        self,
        name: str,
        target: reconciliation.NodeWindow,
        updated: NodeWindowReconciliation,
        found: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "labels": {
                "app.kubernetes.io/part-of": "payper",
                KIND_LABEL: KIND_VALUE,
                WINDOW_LABEL: window_label(target.window_start_ms),
                NODE_LABEL: node_label(target.node),
            },
        }
        if found is not None:
            metadata["resourceVersion"] = found["metadata"]["resourceVersion"]
        data = json.dumps(updated.model_dump(mode="json", by_alias=True), sort_keys=True)
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata,
            "data": {DATA_KEY: data},
        }

    @staticmethod
    def _count(node: str, new: list[reconciliation.ReportTimes]) -> None:
        for report in new:
            for row in report.gpus:
                metrics.GPU_WALL.labels(node, row.gpu).inc(row.wall_us / 1e6)
                for use, us in reconciliation.amounts(row).items():
                    metrics.GPU_TIME.labels(node, row.gpu, use).inc(us / 1e6)
            if report.gpus:
                metrics.GPU_ATTRIBUTED_IN_RECORDS.labels(node).inc(report.in_records_us / 1e6)

    def _forget_closed(self, now_ms: int) -> None:
        oldest = self.windows.start(now_ms - self.windows.window_ms - self.windows.grace_ms)
        stale = [
            name
            for name, obj in self.cache.items()
            if parse(obj).window_start.timestamp() * 1000 < oldest
        ]
        for name in stale:
            del self.cache[name]

    async def prune(self, now_ms: int) -> int:
        """Once per window: delete the objects past retention; how many were deleted."""
        window = self.windows.start(now_ms)
        if self._pruned_window == window:
            return 0
        listing = await self.kube.list(self._path(), {"labelSelector": selector()})
        deleted = 0
        for item in listing["items"]:
            try:
                end_ms = int(parse(item).window_end.timestamp() * 1000)
            except ValueError:
                continue  # not ours to judge: left for a person
            if end_ms + self.retention_ms <= now_ms:
                await self.kube.delete(self._path(item["metadata"]["name"]))
                deleted += 1
        self._pruned_window = window
        if deleted:
            logger.info("deleted %d GPU time objects past retention", deleted)
        return deleted
