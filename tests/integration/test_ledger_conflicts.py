"""A record written by someone else between the ledger's read and its finalisation (the
exporter noting what a sink took, in practice) still becomes Final.

The finalising write is a PUT with the resourceVersion the ledger last saw, so such a
write answers 409. The ledger used to drop the record from its cache, to "re-read next
time"; but only new usage for that window re-reads a record, so a window that got none
stayed Open, and unexported, until the operator restarted. The ledger here runs in this
process, as the operator's ServiceAccount, against the real API server; its clock is
moved past the window's grace instead of waiting for it."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from payper.api.usage import UsageReport
from payper.billing.config import BillingConfig
from payper.billing.events import BillingEvents
from payper.billing.ledger import Ledger
from payper.billing.records import STATE_LABEL
from payper.clock import now_ms
from payper.kube import Kube
from payper.observed import PodView
from payper.operator.state import Registry
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import SYSTEM_NAMESPACE, Stack, StackOptions

NODE = "gpu-node-0"
WINDOW_S, GRACE_S = 60, 5


def gpu_pod(cluster: ClusterHandle, namespace: str) -> dict[str, Any]:
    """A bare GPU pod bound to a kwok GPU node, once the node runs it."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "worker", "namespace": namespace},
        "spec": {
            "nodeName": NODE,
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "server",
                    "image": "payper/model-server:test",
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ],
        },
    }
    cluster.apply_items([pod])

    def running() -> dict[str, Any] | None:
        found: dict[str, Any] = cluster.get_json("pod", "worker", "-n", namespace)
        return found if found.get("status", {}).get("phase") == "Running" else None

    return eventually(running, 60, 0.2, "the GPU pod running")


def report(pod: dict[str, Any], start_ms: int) -> UsageReport:
    return UsageReport.model_validate(
        {
            "agentId": str(uuid.uuid4()),
            "sequence": 1,
            "node": NODE,
            "intervalStartMs": start_ms,
            "intervalEndMs": start_ms + 1000,
            "series": [
                {
                    "namespace": pod["metadata"]["namespace"],
                    "pod": pod["metadata"]["name"],
                    "podUid": pod["metadata"]["uid"],
                    "container": "server",
                    "gpu": f"GPU-{NODE}-0",
                    "gpuProduct": "NVIDIA H100 80GB HBM3",
                    "activeUs": 400_000,
                    "roundedMs": {"1ms": 400, "1s": 1000, "1m": 60000},
                    "bursts": 1,
                }
            ],
        }
    )


async def test_a_record_written_meanwhile_is_still_finalised(
    crds_installed: ClusterHandle, namespace: str, tmp_path: Path
) -> None:
    cluster = crds_installed
    stack = Stack(cluster, tmp_path, StackOptions())
    stack.ensure_system()
    pod = gpu_pod(cluster, namespace)
    registry = Registry()
    registry.observe_pod(PodView.from_object(pod), None, deleted=False)
    window_start = now_ms() // (WINDOW_S * 1000) * WINDOW_S * 1000
    clock = [window_start + 2000]
    config = BillingConfig(window_seconds=WINDOW_S, grace_seconds=GRACE_S)
    async with Kube.connect(stack.kubeconfig_of("payper-operator")) as kube:
        ledger = Ledger(
            kube, config, SYSTEM_NAMESPACE, registry, BillingEvents(), clock=lambda: clock[0]
        )
        await ledger.load()
        submitted = asyncio.ensure_future(ledger.submit([report(pod, window_start + 500)]))
        await asyncio.sleep(0)  # queued
        await ledger.flush()
        await asyncio.wait_for(submitted, 10)
        [record] = cluster.get_json("billingrecords", "-n", namespace)["items"]
        assert record["status"]["activeUs"] == 400_000
        assert record["metadata"]["labels"][STATE_LABEL] == "Open"
        # Written by another writer after the ledger's last write (as the operator: the
        # records' admission policy lets nobody else).
        name = record["metadata"]["name"]
        operator = ["--kubeconfig", str(stack.kubeconfig_of("payper-operator"))]
        cluster.kubectl(
            "annotate", "billingrecord", name, "-n", namespace, "test/written=meanwhile", *operator
        )
        clock[0] = window_start + (WINDOW_S + GRACE_S + 1) * 1000
        for _ in range(3):  # the conflicting write, the re-read, then one more flush
            await ledger.flush()
        final = cluster.get_json("billingrecord", name, "-n", namespace)
    assert final["status"].get("state") == "Final", final["status"]
    assert final["metadata"]["labels"][STATE_LABEL] == "Final"
    assert final["metadata"]["annotations"]["test/written"] == "meanwhile"
    assert final["status"]["activeUs"] == 400_000, "finalising changed no total"
