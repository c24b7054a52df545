"""The dead-letter store: record changes the API server refuses for good, kept, not lost.

Some writes can never succeed: the record's namespace was deleted (or is being deleted),
or the change is invalid for the CRD. Retrying them would hold back every later report of
the agents whose usage they carry, for ever. Instead the ledger files such a change here,
durably, and acknowledges the reports: the usage is not billed automatically, but kept
with its size, its record and the reason, for the platform team to settle (`kubectl get
configmap payper-dead-letters -o yaml`).

One ConfigMap in the operator's namespace, one data key per refused record (later changes
to the same record merge into its entry), bounded in entries and bytes. Should it ever
fill, ``add`` answers False and the ledger stops acknowledging those reports and says so
loudly: losing money silently is worse than stalling loudly.
"""

from __future__ import annotations

import json
from typing import Any

from payper.billing.flush import REFUSAL_REASONS
from payper.billing.records import RecordChange, RecordKey
from payper.clock import iso
from payper.kube import ApiError, Kube, resource_path

NAME = "payper-dead-letters"
MAX_ENTRIES = 1000
MAX_BYTES = 800_000
"""Below the 1 MiB an object may have in etcd, with room for metadata."""
MAX_CONFLICT_RETRIES = 6


def refused_for_good(error: ApiError) -> str | None:
    """Why a record write can never succeed, or None if a retry may (or RBAC must be fixed)."""
    if error.status == 404:
        return "namespace-gone"
    if error.status == 403 and "being terminated" in error.message:
        return "namespace-terminating"
    if error.status == 422:
        return "invalid"
    return None


def _entry_key(key: RecordKey, reason: str) -> str:
    """One entry per record, and one more per record and reason for series the flush
    refused (a pod on another node, or not seen on a node: so an agent's unproven claims
    never mix with the record's own refused usage). All parts are DNS names or plain
    words: a valid ConfigMap key."""
    entry = f"{key.namespace}.{key.name}"
    return f"{entry}.{reason}" if reason in REFUSAL_REASONS else entry


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

    async def add(self, refused: list[tuple[RecordKey, RecordChange, str]], now: int) -> bool:
        """File the changes durably; False (nothing filed) when that would overflow."""
        for _ in range(MAX_CONFLICT_RETRIES):
            stored = await self.kube.get_or_none(self.path)
            data: dict[str, str] = dict((stored or {}).get("data") or {})
            for key, change, reason in refused:
                entry = _entry_key(key, reason)
                data[entry] = _merged(data.get(entry), key, change, reason, now)
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
