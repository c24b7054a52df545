"""Per-agent progress: through which sequence each agent's reports are applied everywhere.

Kept in one ConfigMap (``billing.ledgerConfigMap``), one write per flush, only after the
flush's records are written: an agent that sees the acknowledgement may forget the
report. Keys are ``flush.progress_key`` (node and agent id).
"""

from __future__ import annotations

import json
from typing import Any

from payper.kube import ApiError, Kube, resource_path

MAX_CONFLICT_RETRIES = 6


class Progress:
    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.path = resource_path("v1", "configmaps", namespace, name)
        self.through: dict[str, int] = {}
        """What is durable: per progress key, the last sequence applied everywhere."""
        self._version: str | None = None

    async def load(self) -> None:
        stored = await self.kube.get_or_none(self.path)
        if stored is not None:
            self._version = stored["metadata"]["resourceVersion"]
            self.through = _progress_of(stored)

    async def save(self, progress: dict[str, int]) -> None:
        """Store the per-agent progress; ``through`` is then what is durable.

        Optimistic concurrency on the ConfigMap's resourceVersion. A conflict (a save
        that committed although its answer was lost, or another writer) is resolved by
        reading the stored progress and merging by maximum: progress only ever grows,
        and every sequence in either copy was applied to every record it touches.
        """
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                await self._write(progress)
            except ApiError as error:
                if not error.conflict:
                    raise
            else:
                self.through = progress
                return
            existing = await self.kube.get(self.path)
            self._version = existing["metadata"]["resourceVersion"]
            stored = _progress_of(existing)
            progress = {
                agent: max(progress.get(agent, 0), stored.get(agent, 0))
                for agent in {*progress, *stored}
            }
        raise ApiError(409, {"reason": "Conflict"}, "SAVE", "progress: too many conflicts")

    async def _write(self, progress: dict[str, int]) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/part-of": "payper"},
            },
            "data": {"appliedThrough": json.dumps(progress, sort_keys=True)},
        }
        if self._version is None:
            # A conflict here: someone created it first; ``save`` merges.
            created = await self.kube.create(
                resource_path("v1", "configmaps", self.namespace), body
            )
            self._version = created["metadata"]["resourceVersion"]
            return
        body["metadata"]["resourceVersion"] = self._version
        replaced = await self.kube.replace(self.path, body)
        self._version = replaced["metadata"]["resourceVersion"]


def _progress_of(config_map: dict[str, Any]) -> dict[str, int]:
    raw = (config_map.get("data") or {}).get("appliedThrough", "{}")
    return {str(agent): int(sequence) for agent, sequence in json.loads(raw).items()}
