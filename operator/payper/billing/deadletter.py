"""The dead-letter store: what can never be billed automatically, kept, not lost.

Some record writes can never succeed: the record's namespace was deleted (or is being
deleted), the change is invalid for the CRD, or the record cannot hold it. Retrying them
would hold back every later report of the agents whose usage they carry, for ever.
Instead the ledger files such a change here, durably, and acknowledges the reports: the
usage is not billed automatically, but kept with its size, its record and the reason, for
the platform team to settle (`kubectl get configmap payper-dead-letters -o yaml`). So are
reports that can never be applied (not valid, or their application raises:
``payper.billing.intake``), one entry each under its node, agent and sequence, with their
content (bounded).

One ConfigMap in the operator's namespace, one data key per refused record (later changes
to the same record merge into its entry), bounded in entries and bytes. Should it ever
fill, ``add`` answers False and the ledger stops acknowledging those reports and says so
loudly: losing money silently is worse than stalling loudly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from payper.api.usage import RefusedReport
from payper.billing import metrics
from payper.billing.flush import REFUSAL_REASONS
from payper.billing.records import RecordChange, RecordKey, UnstorableChangeError
from payper.clock import iso
from payper.kube import (
    ApiError,
    InvalidError,
    Kube,
    NamespaceTerminatingError,
    NotFoundError,
    resource_path,
)

logger = logging.getLogger(__name__)
NAME = "payper-dead-letters"
FILED = "UsageDeadLettered"
FULL = "DeadLetterStoreFull"
"""Event reasons, on the dead-letter ConfigMap."""
MAX_ENTRIES = 1000
MAX_BYTES = 800_000
"""Below the 1 MiB an object may have in etcd, with room for metadata."""
MAX_CONFLICT_RETRIES = 6


UNSTORABLE = "unstorable"
"""Why a change is refused: applying it gives a record the CRD cannot hold (an amount past
its digits, more agents than it keeps sequences for)."""


def refused_for_good(error: Exception) -> str | None:
    """Why a record write can never succeed, or None if a retry may (or RBAC must be fixed,
    or the error is a fault of the operator's own, logged for a person to see)."""
    if isinstance(error, UnstorableChangeError):
        return UNSTORABLE
    if isinstance(error, NotFoundError):
        return "namespace-gone"
    if isinstance(error, NamespaceTerminatingError):
        return "namespace-terminating"
    if isinstance(error, InvalidError):
        return "invalid"
    return None


def _entry_key(key: RecordKey, reason: str) -> str:
    """One entry per record, and one more per record and reason for series the flush
    refused (a pod on another node, or not seen on a node: so an agent's unproven claims
    never mix with the record's own refused usage). All parts are DNS names or plain
    words: a valid ConfigMap key."""
    entry = f"{key.namespace}.{key.name}"
    return f"{entry}.{reason}" if reason in REFUSAL_REASONS else entry


REPORT_ENTRY_PREFIX = PREFIX = "report."
MAX_REPORTS_PER_NODE = 100
"""Refused reports one node may have in the store: past it, only that node's refused
reports wait (its agents stall, loudly); every other node's, and record changes, go on."""


def report_entry_key(node: str, report: RefusedReport) -> str:
    """A refused report's entry: its node and agent id digested (any string, not a valid
    key), then its sequence."""
    digest = hashlib.sha256(f"{node}/{report.agent_id}".encode()).hexdigest()[:20]
    return f"{REPORT_ENTRY_PREFIX}{digest}.{report.sequence}"


def _merged(
    previous: str | None, key: RecordKey, change: RecordChange, reason: str, now: int
) -> str:
    entry: dict[str, Any] = (
        json.loads(previous)
        if previous
        else {
            "namespace": key.namespace,
            "inferenceDeployment": key.deployment,
            "windowStart": iso(key.window_start_ms),
            "gpuProduct": key.product,
            "activeUs": 0,
            "roundedMs": {"1ms": 0, "1s": 0, "1m": 0},
            "bursts": 0,
            "requests": 0,
            "coldStarts": 0,
            "reports": [],
        }
    )
    for delta in change.usage:
        report = f"{delta.agent_id}/{delta.sequence}"
        if report in entry["reports"]:
            continue  # filed before, and its acknowledgement was lost: never twice
        entry["reports"].append(report)
        entry["activeUs"] += delta.active_us
        for granularity, ms in delta.rounded_ms.to_wire().items():
            entry["roundedMs"][granularity] += ms
        entry["bursts"] += delta.bursts
    entry["requests"] += change.requests
    entry["coldStarts"] += change.cold_starts
    entry["reason"] = reason
    entry["lastRefusedAt"] = iso(now)
    return json.dumps(entry, sort_keys=True)


class DeadLetters:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.path = resource_path("v1", "configmaps", namespace, NAME)
        self._evented: set[tuple[RecordKey, str]] = set()
        """Entries an event was posted for (in this process)."""
        self._full = False
        self._store = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": NAME,
            "namespace": namespace,
        }

    async def _report_full(self, message: str, now: int) -> None:
        metrics.DEAD_LETTERS_FULL.set(1)
        logger.critical(message)
        if not self._full:
            self._full = True
            await self.kube.post_event(self._store, self.namespace, FULL, message, iso(now))

    async def file_changes(
        self, refused: list[tuple[RecordKey, RecordChange, str]], now: int
    ) -> set[RecordKey]:
        """File record changes that can never be written, logged and counted, with one
        event per entry; the keys that could not be filed (the store full)."""
        if not await self.add(refused, now):
            await self._report_full(
                f"the dead-letter store {self.namespace}/{NAME} is full: reports for "
                f"{len(refused)} refused records stay unacknowledged until it is emptied",
                now,
            )
            return {key for key, _, _ in refused}
        self._full = False
        metrics.DEAD_LETTERS_FULL.set(0)
        for key, change, reason in refused:
            metrics.DEAD_LETTERS.labels(reason).inc()
            active_us = sum(d.active_us for d in change.usage)
            message = (
                f"{active_us} µs of GPU time for {key.namespace}/{key.name} cannot be billed "
                f"({reason}): filed in {self.namespace}/{NAME} for the platform team to settle"
            )
            logger.error(message)
            if (key, reason) in self._evented or len(self._evented) >= MAX_ENTRIES:
                continue  # one event per entry (and no more than the store holds entries)
            self._evented.add((key, reason))
            await self.kube.post_event(self._store, self.namespace, FILED, message, iso(now))
        return set()

    async def file_reports(self, refused: list[tuple[str, RefusedReport]], now: int) -> bool:
        """File refused reports (by the node whose token sent them), logged and counted;
        whether they are filed (False: the store is full or could not be written; their
        agents resend them, and nothing else waits)."""
        try:
            filed = await self.add_reports(refused, now)
        except (ApiError, OSError, TimeoutError) as error:
            logger.error("filing %d refused reports: %s (kept unacknowledged)", len(refused), error)
            return False
        if not filed:
            await self._report_full(
                f"the dead-letter store {self.namespace}/{NAME} is full: {len(refused)} "
                "refused reports stay unacknowledged until it is emptied",
                now,
            )
            return False
        for node, report in refused:
            metrics.REPORTS_REFUSED.labels(node).inc()
            logger.error(
                "report %d of agent %s on %s refused (%s): %.3f GPU-seconds claimed, filed in "
                "%s/%s",
                report.sequence,
                report.agent_id,
                node,
                report.reason,
                report.claimed_us / 1e6,
                self.namespace,
                NAME,
            )
        return True

    async def add(self, refused: list[tuple[RecordKey, RecordChange, str]], now: int) -> bool:
        """File the changes durably; False (nothing filed) when that would overflow."""

        def merge(data: dict[str, str]) -> None:
            for key, change, reason in refused:
                entry = _entry_key(key, reason)
                data[entry] = _merged(data.get(entry), key, change, reason, now)

        return await self._update(merge)

    async def add_reports(self, refused: list[tuple[str, RefusedReport]], now: int) -> bool:
        """File refused reports (by reporting node) durably, one entry each: what they
        claimed, why they were refused and their content (bounded); False (nothing filed)
        when that would overflow. Filing one again replaces its entry: never twice."""

        def merge(data: dict[str, str]) -> bool:
            for node, report in refused:
                data[report_entry_key(node, report)] = json.dumps(
                    {
                        "node": node,
                        "agentId": report.agent_id,
                        "sequence": report.sequence,
                        "reason": report.reason,
                        "claimedUs": report.claimed_us,
                        "size": report.size,
                        "sha256": report.digest,
                        "content": report.content,
                        "refusedAt": iso(now),
                    },
                    sort_keys=True,
                )

            nodes = [json.loads(v).get("node") for k, v in data.items() if k.startswith(PREFIX)]
            return all(nodes.count(node) <= MAX_REPORTS_PER_NODE for node, _ in refused)

        return await self._update(merge)

    async def filed_reports(self) -> list[tuple[str, str, int]]:
        """(node, agent id, sequence) of every refused report the store holds."""
        stored = await self.kube.get_or_none(self.path)
        found = []
        for key, value in ((stored or {}).get("data") or {}).items():
            if key.startswith(REPORT_ENTRY_PREFIX):
                entry = json.loads(value)
                found.append((str(entry["node"]), str(entry["agentId"]), int(entry["sequence"])))
        return found

    async def _update(self, merge: Callable[[dict[str, str]], bool | None]) -> bool:
        """Merge entries into the store (optimistic concurrency, retried on conflict);
        False (nothing written) when the result would overflow, or ``merge`` says no."""
        for _ in range(MAX_CONFLICT_RETRIES):
            stored = await self.kube.get_or_none(self.path)
            data: dict[str, str] = dict((stored or {}).get("data") or {})
            if merge(data) is False:
                return False
            if len(data) > self.max_entries or sum(len(v) for v in data.values()) > self.max_bytes:
                return False
            body: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": NAME,
                    "namespace": self.namespace,
                    "labels": {"app.kubernetes.io/part-of": "payper"},
                },
                "data": data,
            }
            try:
                if stored is None:
                    await self.kube.create(resource_path("v1", "configmaps", self.namespace), body)
                else:
                    body["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
                    await self.kube.replace(self.path, body)
                return True
            except ApiError as error:
                if not error.conflict:
                    raise
        raise ApiError(409, {"reason": "Conflict"}, "ADD", f"{NAME}: too many conflicts")
