"""A ledger over the in-memory API, with GPU pods on nodes and agents that report them.

The unit tests of the money path's I/O shell (isolation of bad reports, API faults in any
call of a flush) drive the real ``Ledger`` through this: its clock is a number the test
moves, its API is ``payper_dev.testing.memory_api``, its reports are parsed by the
operator's own ``parse_batch``, exactly as the usage endpoint does.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from payper.api.billing_record import FINAL, PLURAL
from payper.api.common import API_VERSION
from payper.api.inference_deployment import GPU_PRODUCT_LABEL
from payper.api.usage import parse_batch
from payper.billing.config import BillingConfig
from payper.billing.events import BillingEvents
from payper.billing.intake import Receipt
from payper.billing.ledger import Ledger
from payper.kube import resource_path
from payper.observed import PodView
from payper.operator.state import Registry
from payper_dev.testing.memory_api import MemoryApi, MemoryKube

SYSTEM = "payper-system"
H100 = "NVIDIA H100 80GB HBM3"
WINDOW_S, GRACE_S = 60, 5
T0 = 1_795_000_020_000 // 60_000 * 60_000
"""The start of a window."""


@dataclass
class Agent:
    """One agent: its id, node and the next sequence it numbers a report with; what it
    measured (active µs) per namespace, its truth."""

    agent_id: str
    node: str
    sequence: int = 0
    truth: dict[str, int] = field(default_factory=dict)

    def report(self, start_ms: int, usage: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
        """The next report (wire form): per (pod, active µs), one series."""
        self.sequence += 1
        series = []
        for pod, active_us in usage:
            meta = pod["metadata"]
            series.append(
                {
                    "namespace": meta["namespace"],
                    "pod": meta["name"],
                    "podUid": meta["uid"],
                    "container": "server",
                    "gpu": f"GPU-{self.node}-0",
                    "gpuProduct": H100,
                    "activeUs": active_us,
                    "roundedMs": {"1ms": active_us // 1000, "1s": 1000, "1m": 60_000},
                    "bursts": 1,
                }
            )
            self.truth[meta["namespace"]] = self.truth.get(meta["namespace"], 0) + active_us
        return {
            "agentId": self.agent_id,
            "sequence": self.sequence,
            "node": self.node,
            "intervalStartMs": start_ms,
            "intervalEndMs": start_ms + 1000,
            "series": series,
        }


class World:
    """The ledger, its in-memory API, the pods the operator sees and the clock."""

    def __init__(self, config: BillingConfig | None = None) -> None:
        self.api = MemoryApi()
        self.kube = MemoryKube(self.api)
        self.registry = Registry()
        self.now = T0 + 2000
        self.config = config or BillingConfig(window_seconds=WINDOW_S, grace_seconds=GRACE_S)
        self.ledger = Ledger(
            self.kube,
            self.config,
            SYSTEM,
            self.registry,
            BillingEvents(),
            clock=lambda: self.now,
        )

    async def node(self, name: str) -> None:
        await self.kube.create(
            resource_path("v1", "nodes"),
            {"metadata": {"name": name, "labels": {GPU_PRODUCT_LABEL: H100.replace(" ", "-")}}},
        )

    async def pod(self, namespace: str, name: str, node: str) -> dict[str, Any]:
        """A running GPU pod on ``node`` (no owner: billed to its namespace), seen."""
        pod: dict[str, Any] = await self.kube.create(
            resource_path("v1", "pods", namespace),
            {
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "nodeName": node,
                    "containers": [
                        {"name": "server", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
                    ],
                },
                "status": {"phase": "Running"},
            },
        )
        self.registry.observe_pod(PodView.from_object(pod), None, deleted=False)
        return pod

    async def send(self, node: str, reports: list[Any]) -> Receipt:
        """A batch as the usage endpoint takes it (from its token's ``node``), answered at
        the next flush."""
        valid, refused = parse_batch(json.dumps({"reports": reports}).encode())
        return await self.ledger.submit(valid, refused, node)

    async def flush_with(self, *batches: tuple[str, list[Any]]) -> list[Receipt]:
        """Send the batches, flush once, and return their answers."""
        sent = [asyncio.ensure_future(self.send(node, reports)) for node, reports in batches]
        await asyncio.sleep(0)
        await self.ledger.flush()
        return [await asyncio.wait_for(s, 5) for s in sent]

    def records(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.api.items(resource_path(API_VERSION, PLURAL, namespace))

    def billed_us(self, namespace: str) -> int:
        """Active µs in the namespace's records (moved ones included)."""
        return sum(
            r.get("status", {}).get("activeUs", 0)
            for r in self.records()
            if r["spec"]["account"] == namespace
        )

    def open_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("status", {}).get("state") != FINAL]

    def dead_letters(self) -> dict[str, Any]:
        found = self.api.get(resource_path("v1", "configmaps", SYSTEM, "payper-dead-letters"))
        return {k: json.loads(v) for k, v in ((found or {}).get("data") or {}).items()}
