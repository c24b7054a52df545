"""The record store: the one place that reads and writes BillingRecords for the ledger.

It knows what the rest of billing should not have to: resourceVersions (a write that
conflicts is re-read and applied again), the seal (records are created sealed, adopted
only when sealed by this ledger or exactly what it would create), where a record lives
(its namespace, or the operator's once moved: a foreign record under its name, or its
namespace being deleted), and the Final rule (never written once Final). It keeps the
open records as last read or written; the ledger decides what changes, the store makes
the change durable. Outcomes that are not API errors are exceptions of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from payper.api.billing_record import (
    FINAL,
    KIND,
    OPEN,
    PLURAL,
    BillingRecordSpec,
    BillingRecordStatus,
    Window,
)
from payper.api.common import API_VERSION
from payper.billing import flush, metrics, outbox, seal
from payper.billing.flush import BillingWindows
from payper.billing.pricing import Plan
from payper.billing.records import (
    ACCOUNT_LABEL,
    DEPLOYMENT_LABEL,
    EXPORTED,
    MOVED_FROM_LABEL,
    STATE_LABEL,
    WINDOW_LABEL,
    RecordChange,
    RecordKey,
    UnstorableChangeError,
    apply,
    moved_name,
    same_totals,
    window_label,
)
from payper.billing.tracking import ExportTracking, Location
from payper.clock import iso, parse_iso
from payper.kube import ApiError, Kube, resource_path
from payper.observed import UNMANAGED, Key

logger = logging.getLogger(__name__)
MAX_CONFLICT_RETRIES = 6
FOREIGN_RECORD = "ForeignBillingRecord"
"""Event reason, on a record someone else created under a name the ledger uses."""


class RecordError(Exception):
    """A record the store may not write now (the flush retries it later)."""


class RecordFinalError(RecordError):
    """The record is Final: it is never written again (cannot happen for a window still
    open by the ledger's clock)."""


class ForeignRecordError(RecordError):
    """A record in the operator's own namespace that this ledger did not seal."""


class TooManyConflictsError(RecordError):
    """Others kept writing the record between each read and write."""


@dataclass(frozen=True)
class Applied:
    """A change written to a record: its spec and its status before and after."""

    spec: BillingRecordSpec
    before: BillingRecordStatus
    after: BillingRecordStatus


class RecordStore:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        windows: BillingWindows,
        plan_for: Callable[[str, str], tuple[str, Plan]],
        exporter: ExportTracking,
        clock: Callable[[], int],
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        """The operator's namespace (where moved records go)."""
        self.windows = windows
        self.plan_for = plan_for
        self.exporter = exporter
        self.clock = clock
        self.records: dict[Location, dict[str, Any]] = {}
        """Open records as last read or written, by where they are."""
        self.moved: set[Location] = set()
        """(namespace, name) of records moved into the operator's namespace (their
        namespace deleted, or a foreign record under their name): usage goes to the copy."""
        self.key = b""
        """The key of the seals on records the store creates (``payper.billing.seal``)."""

    # -- start ---------------------------------------------------------------------------
    async def load(self) -> None:
        """The seal key and the records not yet done (after a restart too): Open ones are
        cached; Final ones are labelled so and handed to the exporter."""
        self.key = await seal.load_key(self.kube, self.namespace)
        self.exporter.use_key(self.key)
        # Only records not labelled Final (with sinks: not labelled Exported): the rest are
        # done. Records from before the label existed are listed (the selector matches a
        # missing label) and relabelled below.
        done = EXPORTED if self.exporter.enabled else FINAL
        listing = await self.kube.list(
            resource_path(API_VERSION, PLURAL), {"labelSelector": f"{STATE_LABEL}!={done}"}
        )
        for item in listing["items"]:
            location = (item["metadata"]["namespace"], item["metadata"]["name"])
            if (item.get("status") or {}).get("state") == FINAL:
                self.exporter.observe(await self.label_final(location, item))
                continue
            if seal.verify(self.key, item) is False:
                logger.error("record %s/%s has a seal that does not verify: ignored", *location)
                continue  # unsealed ones are checked when first written
            self.records[location] = item
            moved_from = (item["metadata"].get("labels") or {}).get(MOVED_FROM_LABEL)
            if location[0] == self.namespace and moved_from:
                self.moved.add((moved_from, location[1].removeprefix(f"{moved_from}.")))
            self.exporter.observe(item)
        for original in self.moved:
            self.records.pop(original, None)  # its namespace is going: the copy is the record
            self.exporter.forget(original)

    def saw(self, location: Location, record: dict[str, Any]) -> None:
        """Someone else (the exporter) wrote a cached record: the next write starts there."""
        if location in self.records:
            self.records[location] = record

    # -- records -------------------------------------------------------------------------
    def location(self, key: RecordKey) -> Location:
        """Where a record is: in its namespace, or moved into the operator's."""
        if (key.namespace, key.name) in self.moved:
            return self.namespace, moved_name(key.namespace, key.name)
        return key.namespace, key.name

    def new_record(self, key: RecordKey, location: Location | None = None) -> dict[str, Any]:
        """The record the ledger creates for ``key`` at ``location`` (its own namespace
        and name unless moved), sealed."""
        namespace, name = location or (key.namespace, key.name)
        plan_name, plan = self.plan_for(key.namespace, key.deployment)
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
                "annotations": {seal.ANNOTATION: seal.seal(self.key, namespace, name, wire)},
                **self.exporter.finalizers(),
            },
            "spec": wire,
        }

    async def get_or_create(self, key: RecordKey) -> dict[str, Any]:
        location = self.location(key)
        path = resource_path(API_VERSION, PLURAL, *location)
        found = await self.kube.get_or_none(path)
        if found is None:
            try:
                found = await self.kube.create(
                    resource_path(API_VERSION, PLURAL, location[0]),
                    self.new_record(key, location),
                )
            except ApiError as error:
                if not error.conflict:
                    raise
                found = await self.kube.get(path)  # another writer created it first
        if await self._adopt(key, location, found):
            return dict(found)
        if location[0] == self.namespace:
            raise ForeignRecordError(f"{location[0]}/{location[1]}: not sealed by this ledger")
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
        self.moved.add((key.namespace, key.name))
        return await self.get_or_create(key)

    async def _adopt(self, key: RecordKey, location: Location, found: Any) -> bool:
        """Whether the ledger may write to ``found``: sealed by it, or unsealed from before
        seals (then it must be exactly the record the ledger would create; it is sealed)."""
        verified = seal.verify(self.key, found)
        if verified is not None:
            return verified
        expected = self.new_record(key, location)
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

    async def apply(
        self,
        key: RecordKey,
        change: RecordChange,
        now: int,
        durable: dict[str, int],
        namespace_ending: Callable[[str], bool],
    ) -> Applied | None:
        """Apply ``change`` to the record of ``key`` (read or created first), with
        optimistic concurrency: a conflict or a record gone is read again and the change
        applied again (``records.apply`` is idempotent per agent sequence). None: nothing
        to write (a resend the record holds already)."""
        location = self.location(key)
        record = self.records.get(location)
        for _ in range(MAX_CONFLICT_RETRIES):
            if record is None:
                record = await self.get_or_create(key)
            status = BillingRecordStatus.model_validate(record.get("status") or {})
            if status.state == FINAL:
                logger.error("record %s/%s is Final; its usage stays unacknowledged", *location)
                raise RecordFinalError(f"{location[0]}/{location[1]} is Final")
            spec = BillingRecordSpec.model_validate(record["spec"])
            try:
                updated, _ = apply(status, spec, change, now, durable)
            except (ValueError, ArithmeticError) as error:
                raise UnstorableChangeError(f"{location[0]}/{location[1]}: {error}") from error
            if same_totals(updated, status):
                self.records[location] = record
                return None
            try:
                record = await self.kube.replace_status(
                    resource_path(API_VERSION, PLURAL, *location, "status"), record, updated
                )
            except ApiError as error:
                if (
                    error.not_found
                    and location[0] == key.namespace
                    and namespace_ending(key.namespace)
                    and await self.move(*location)
                ):
                    # Deleted with its namespace before this flush moved it: moved now,
                    # from the state the ledger last wrote; the change is applied there.
                    location = self.location(key)
                    record = self.records[location]
                    continue
                if error.conflict or error.not_found:
                    # Someone else wrote it, or it is gone (its namespace being deleted):
                    # read (or create) it again and re-apply; a create that can never
                    # succeed raises what the dead-letter store recognises.
                    record = None
                    self.records.pop(location, None)
                    continue
                raise
            assert record is not None
            self.records[location] = record
            self.exporter.observe(record, updated, spec)
            return Applied(spec, status, updated)
        raise TooManyConflictsError(f"{key.name}: too many conflicts")

    def recorded_pods(self, uids: set[str]) -> dict[str, tuple[Key, str]]:
        """Pods an open record holds (with their node) among ``uids``: those that ended
        before a restart, whose last usage may still be on its way."""
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

    # -- moving --------------------------------------------------------------------------
    async def move_ending(self, namespace_ending: Callable[[str], bool]) -> None:
        """Before a deleted namespace's records go (the namespace controller deletes them),
        copy each open one, as last written, into the operator's namespace; its later
        usage lands in the copy. A copy that exists already (a retry) is kept. With
        export sinks, so is every Final record not yet exported (their finalizer holds
        them until then)."""
        for namespace, name in list(self.records):
            if namespace != self.namespace and namespace_ending(namespace):
                await self.move(namespace, name)
        for namespace, name in self.exporter.final_records():
            if namespace != self.namespace and namespace_ending(namespace):
                found = await self.kube.get_or_none(
                    resource_path(API_VERSION, PLURAL, namespace, name)
                )
                if found is not None:
                    await self.move(namespace, name, found)

    async def move(self, namespace: str, name: str, record: dict[str, Any] | None = None) -> bool:
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
            seal.ANNOTATION: seal.seal(self.key, self.namespace, moved, record["spec"]),
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
        self.moved.add((namespace, name))
        if self.records.pop((namespace, name), None) is not None:
            self.records[(self.namespace, moved)] = copy
        self.exporter.forget((namespace, name))
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

    # -- finalising ----------------------------------------------------------------------
    async def finalize(self, now: int, durable: dict[str, int]) -> None:
        """Make the cached records whose window and grace are over Final (and labelled
        so), then out of the cache; each is handed to the exporter as it now is."""
        starts = {
            location: parse_iso(r["spec"]["window"]["start"])
            for location, r in self.records.items()
        }
        for location in flush.closing(starts, self.windows, now):
            record = self.records[location]
            status = BillingRecordStatus.model_validate(record.get("status") or {})
            if status.state == FINAL:
                self.exporter.observe(await self.label_final(location, record))
                self.records.pop(location)
                continue
            spec = BillingRecordSpec.model_validate(record["spec"])
            updated, _ = apply(status, spec, RecordChange(), now, durable)
            final = BillingRecordStatus.model_validate(
                {**updated.model_dump(), "state": FINAL, "finalized_at": iso(now)}
            )
            try:
                written = await self.kube.replace_status(
                    resource_path(API_VERSION, PLURAL, *location, "status"), record, final
                )
            except ApiError as error:
                if error.conflict:
                    # Written meanwhile (the exporter noting what a sink took): read again,
                    # finalised at the next flush. Dropping it from the cache instead left
                    # a record that got no more usage Open, and unexported, until a restart.
                    await self.reread(location)
                    continue
                logger.warning("finalizing %s/%s: %s", *location, error)
                continue
            self.exporter.observe(await self.label_final(location, written))
            self.records.pop(location)
            metrics.FINALIZED.inc()
            logger.info("record %s/%s is Final", *location)

    async def label_final(self, location: Location, record: dict[str, Any]) -> dict[str, Any]:
        """Mark a Final record by label, so that start-up no longer lists it (with sinks:
        once Exported). Should this fail, the next start-up lists it and finds it Final by
        its status: relabelled. Returns the record as it now is."""
        if (record["metadata"].get("labels") or {}).get(STATE_LABEL) in (FINAL, EXPORTED):
            return record
        try:
            labelled: dict[str, Any] = await self.kube.patch(
                resource_path(API_VERSION, PLURAL, *location),
                {"metadata": {"labels": {STATE_LABEL: FINAL}}},
            )
        except ApiError as error:
            logger.warning("labelling %s/%s Final: %s", *location, error)
            return record
        return labelled

    async def reread(self, location: Location) -> None:
        """The record as the API server holds it now, in the cache; gone (or with a seal
        that does not verify), out of it. On an error the cached copy stays: the next
        write conflicts again and comes back here."""
        try:
            found = await self.kube.get_or_none(resource_path(API_VERSION, PLURAL, *location))
        except (ApiError, OSError, TimeoutError) as error:
            logger.warning("re-reading %s/%s: %s", *location, error)
            return
        if found is None or seal.verify(self.key, found) is False:
            self.records.pop(location, None)
        else:
            self.records[location] = found
