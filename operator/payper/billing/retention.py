"""Retention: Final records leave etcd once kept long enough, and nothing holds a namespace.

Records are the recent, Kubernetes-native view, not a ledger of record for years: a Final
record (with sinks: Exported, acknowledged by every sink) whose window ended
``recordRetentionDays`` ago is deleted, each only if it is still the object that was read
(UID precondition). And with no sink configured, an export finalizer an earlier
configuration left on an ending namespace's records is dropped, or it would hold the
namespace's deletion for good.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from payper.api.billing_record import FINAL, PLURAL
from payper.api.common import API_VERSION
from payper.billing import flush, metrics, outbox
from payper.billing.records import EXPORTED, STATE_LABEL
from payper.billing.tracking import ExportTracking, Location
from payper.clock import parse_iso
from payper.kube import ApiError, Kube, resource_path

logger = logging.getLogger(__name__)
CHECK_EVERY_MS = 3_600_000
"""How often Final records past ``recordRetentionDays`` are looked for (and at start)."""
PAGE = 500
"""Final records read per page when looking: never all of them at once."""
MAX_ABANDONED_CHECKED = 10_000


class Retention:
    def __init__(
        self, kube: Kube, namespace: str, days: int | None, exporter: ExportTracking
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.days = days
        self.exporter = exporter
        self._next_check_ms = 0
        self._abandoned_checked: OrderedDict[str, None] = OrderedDict()
        """Ending namespaces whose export finalizers were looked at (no sinks), bounded."""

    async def delete_exported_past_retention(self) -> None:
        """Records that were past their retention when they became Exported (exported
        late: a sink that was down, a namespace moved): deleted now."""
        for location, uid in self.exporter.take_expired():
            await self._delete(location, uid)

    async def _delete(self, location: Location, uid: str) -> None:
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
        logger.info("record %s/%s deleted: past its retention of %s days", *location, self.days)

    async def delete_expired(self, now: int) -> None:
        """Delete the Final records (with sinks: Exported) whose window ended
        ``recordRetentionDays`` ago, page by page, at most once per ``CHECK_EVERY_MS``."""
        if self.days is None or now < self._next_check_ms:
            return
        self._next_check_ms = now + CHECK_EVERY_MS
        done = EXPORTED if self.exporter.enabled else FINAL
        query = {"labelSelector": f"{STATE_LABEL}={done}", "limit": str(PAGE)}
        while True:
            page = await self.kube.get(resource_path(API_VERSION, PLURAL), query)
            items = {
                (item["metadata"]["namespace"], item["metadata"]["name"]): item
                for item in page["items"]
                if (item.get("status") or {}).get("state") == FINAL
            }
            ends = {key: parse_iso(item["spec"]["window"]["end"]) for key, item in items.items()}
            for key in flush.expired(ends, self.days * 86_400_000, now):
                finalizers = items[key]["metadata"].get("finalizers") or []
                if not self.exporter.enabled and outbox.FINALIZER in finalizers:
                    await self.exporter.release(key)  # no sink left to wait for
                await self._delete(key, items[key]["metadata"]["uid"])
            token = page.get("metadata", {}).get("continue")
            if not token:
                return
            query["continue"] = token

    async def release_abandoned_exports(self, ending: Callable[[], list[str]]) -> None:
        """With no sink configured (any more: a platform admin removed them), nothing will
        ever export a record, so the export finalizer an earlier configuration put on a
        deleted namespace's Final records would hold the namespace's deletion for good:
        it goes, with a warning (they leave with their namespace, as records always do
        without sinks). Each ending namespace (``ending()``) is looked at once."""
        if self.exporter.enabled:
            return
        for namespace in ending():
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
