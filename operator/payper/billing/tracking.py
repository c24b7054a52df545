"""What the ledger's parts use of the exporter, as a protocol: no part reaches into its state.

The record store hands the exporter every record it reads or writes, the retention asks
it which records it has finished with, and the ledger drives its steps; all of them
through ``ExportTracking``, which ``payper.billing.exporter.Exporter`` implements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from payper.api.billing_record import BillingRecordSpec, BillingRecordStatus

Location = tuple[str, str]
"""Where a record is: (namespace, name)."""


class ExportTracking(Protocol):
    """What the record store and the ledger use of the exporter
    (``payper.billing.exporter.Exporter``): ``enabled``, ``observe`` (a record as last read
    or written), ``forget`` (a record that moved), ``release`` (drop the export finalizer
    of a moved record's original), ``finalizers`` (what a new record carries),
    ``final_records``, ``use_key`` (the seal key), ``take_expired``, ``step``, ``run`` and
    ``close``."""

    @property
    def enabled(self) -> bool: ...

    def observe(
        self,
        record: Mapping[str, Any],
        status: BillingRecordStatus | None = None,
        spec: BillingRecordSpec | None = None,
    ) -> None: ...

    def forget(self, location: Location) -> None: ...

    async def release(self, location: Location) -> None: ...

    def finalizers(self) -> dict[str, list[str]]: ...

    def final_records(self) -> list[Location]: ...

    def use_key(self, key: bytes) -> None: ...

    def take_expired(self) -> list[tuple[Location, str]]: ...

    async def step(self) -> None: ...

    async def run(self) -> None: ...

    async def close(self) -> None: ...
