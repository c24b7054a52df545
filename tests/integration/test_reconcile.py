"""The per-GPU reconciliation end to end: real traffic -> simulated GPU time -> agents'
per-GPU times -> the ledger's node/window objects -> ``payper reconcile``; and a GPU node
with a GPU pod and no agent, reported as unmetered capacity (gauge and one event)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from conftest import CRDS, own_cluster
from payper.billing.pricing import product_key
from payper.operator.capacity import EVENT_NAMESPACE, EVENT_REASON
from payper_dev.cluster.local import gpu_node
from payper_dev.loopback import get_text
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import (
    SYSTEM_NAMESPACE,
    Stack,
    StackOptions,
    inference_deployment,
    running,
    scraped_sum,
)

H100 = "NVIDIA-H100-80GB-HBM3"
UNMETERED_AFTER_S = 10


@pytest.fixture(scope="module")
def reconcile_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHandle]:
    """A cluster of its own: the comparison covers every BillingRecord and reconciliation
    object in the cluster, which other modules' records (and their namespaces' deletion)
    would change under it."""
    with own_cluster(tmp_path_factory.mktemp("reconcile-cluster"), CRDS) as handle:
        yield handle


@pytest.fixture(scope="module")
def stack(
    reconcile_cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    billing = {"flushIntervalSeconds": 1, "unmeteredAfterSeconds": UNMETERED_AFTER_S}
    options = StackOptions(agents=True, operator_extra={"billing": billing})
    with running(reconcile_cluster, tmp_path_factory.mktemp("reconcile"), options) as started:
        yield started


@pytest.fixture
def namespace(stack: Stack) -> Iterator[str]:
    """A namespace in this module's own cluster."""
    name = stack.cluster.namespace("reconcile")
    yield name
    stack.cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def reconcile(stack: Stack, *args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "payper.cli",
            "reconcile",
            "--kubeconfig",
            str(stack.cluster.kubeconfig),
            "--operator-namespace",
            SYSTEM_NAMESPACE,
            "-o",
            "json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


async def test_reconcile_equals_the_records_plus_unattributed_unmetered_and_idle(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    rng = random.Random(11)
    stack.deploy(namespace, inference_deployment("recon", idle_timeout_s=120, max_replicas=1))
    statuses = []
    for _ in range(12):
        ms = rng.choice([150, 400, 900])
        async with http.post(
            f"{stack.gateway_url}/{namespace}/recon/v1/infer", json={"ms": ms}
        ) as response:
            statuses.append(response.status)
        await asyncio.sleep(rng.choice([0.2, 0.8, 1.5]))
    assert set(statuses) == {200}
    await stack.settle()

    code, result = reconcile(stack)
    records = stack.cluster.get_json("brec", "-A")["items"]
    records_us = sum(int((r.get("status") or {}).get("activeUs", 0)) for r in records)
    total = result["total"]
    assert records_us > 0
    assert result["recordsActiveUs"] == records_us
    assert result["inRecordsUs"] == records_us, "the objects say the records hold what they do"
    # Every pod here is billed: attributed time is exactly what the records hold, so the
    # wall clock is the records plus unattributed, unmetered and idle, to the microsecond.
    assert total["attributedUs"] == records_us
    assert total["wallUs"] + total["excessUs"] == (
        records_us + total["unattributedUs"] + total["unmeteredUs"] + total["idleUs"]
    )
    assert total["excessUs"] == 0
    assert result["addsUp"] is True and code == 0
    # Both nodes, all 8 GPUs each, accounted for the whole run (idle ones too).
    assert set(result["nodes"]) == {"gpu-node-0", "gpu-node-1"}
    for node in result["nodes"].values():
        assert len(node["gpus"]) == 8
        assert all(row["addsUp"] and row["wallUs"] > 0 for row in node["gpus"])
        assert {product_key(row["gpuProduct"]) for row in node["gpus"]} == {H100}
    assert total["idleUs"] > total["attributedUs"] > 0
    # The agents' own totals: attributed is what they measured for pods, nothing less.
    measured = sum(v["activeUs"] for v in stack.agent_truth().values())
    assert total["attributedUs"] == measured
    # The metrics say the same (floats: to the microsecond's rounding).
    attributed = scraped_sum(
        stack.metrics_url, "payper_gpu_time_seconds_total", {"use": "attributed"}
    )
    assert abs(attributed - records_us / 1e6) < 1e-3
    wall = scraped_sum(stack.metrics_url, "payper_gpu_wall_seconds_total")
    assert wall >= total["wallUs"] / 1e6 - 1e-3  # later idle reports only add to it

    # One node only: its rows, and no comparison with records (they are not per node).
    _, one = reconcile(stack, "--node", "gpu-node-0")
    assert set(one["nodes"]) == {"gpu-node-0"} and one["recordsMatch"] is None


def _events(cluster: ClusterHandle, node: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json(
        "events",
        "-n",
        EVENT_NAMESPACE,
        "--field-selector",
        f"involvedObject.kind=Node,involvedObject.name={node},reason={EVENT_REASON}",
    )["items"]
    return items


async def test_a_gpu_node_without_an_agent_is_unmetered_capacity(
    stack: Stack, namespace: str
) -> None:
    node = "gpu-node-no-agent"
    cluster = stack.cluster
    cluster.apply_items([gpu_node(node, H100, 4)])
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "stray-gpu-pod"},
        "spec": {
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "train",
                    "image": "example/train:1",
                    "resources": {"limits": {"nvidia.com/gpu": "2"}},
                }
            ],
        },
    }
    gauge = ("payper_gpu_unmetered_capacity_gpus", {"node": node})
    try:
        cluster.apply_items([pod], "-n", namespace)
        await asyncio.to_thread(
            eventually,
            lambda: scraped_sum(stack.metrics_url, *gauge) == 2,
            UNMETERED_AFTER_S * 4,
            0.5,
            "unmetered capacity on the node",
        )
        # Metered nodes with GPU pods (the other test's) are not reported.
        assert scraped_sum(stack.metrics_url, "payper_gpu_unmetered_capacity_gpus") == 2
        await asyncio.to_thread(
            eventually, lambda: len(_events(cluster, node)) == 1, 10, 0.5, "the event"
        )
        # One event per episode: later checks keep the gauge and post nothing new.
        flushes = stack.flushes()
        await asyncio.to_thread(
            eventually, lambda: stack.flushes() >= flushes + 5, 30, 0.5, "more checks"
        )
        assert len(_events(cluster, node)) == 1
        assert "no payper-agent" in _events(cluster, node)[0]["message"]
        cluster.kubectl("delete", "pod", "stray-gpu-pod", "-n", namespace, "--wait=true")
        await asyncio.to_thread(
            eventually,
            lambda: "payper_gpu_unmetered_capacity_gpus{" not in _metrics_text(stack),
            30,
            0.5,
            "the gauge removed once the GPU pod is gone",
        )
    finally:
        cluster.kubectl("delete", "pod", "stray-gpu-pod", "-n", namespace, check=False)
        cluster.kubectl("delete", "node", node, check=False)


def _metrics_text(stack: Stack) -> str:
    return get_text(stack.metrics_url) or ""
