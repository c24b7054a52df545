"""Benchmark: the operator's memory with 10,000 Final BillingRecords and 10,000 pods.

The operator watches every pod in the cluster (billing follows GPU time into any pod) and
keeps a small view of each; at start-up the ledger lists only records not labelled Final.
Both should leave its memory well inside the chart's limit (``operator.resources.limits
.memory`` in charts/payper/values.yaml). One local cluster, one run, each phase a fresh
operator process measured the same way (RSS once it has settled, and its peak, VmHWM):

1. baseline: an empty cluster (no records, only the system's own few pods);
2. ``--records`` Final BillingRecords (labelled Final, as the ledger leaves them, each
   with a realistic status: 64 agents' sequences, 16 pod intervals) in 100 namespaces
   exist before the operator starts;
3. ``--pods`` pods created while the operator runs (it sees them through its watch):
   bare pods of two containers bound to the kwok nodes, which play them to Running, 1 in
   10 holding a GPU, in 20 namespaces; measured once all are Running;
4. the operator restarted with those pods present (its initial listing: the peak).

Pod creation is bounded by ``--pods-timeout``: if fewer pods exist by then, the phase is
measured with those and the per-pod cost is extrapolated linearly to ``--pods`` (the
output says so).

    .venv/bin/python bench/operator_memory.py [--records 10000] [--pods 10000]

(``--records 0`` or ``--pods 0`` skips that part, to keep each run short.)
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from payper.api.billing_record import (
    FINAL,
    KIND,
    PLURAL,
    BillingRecordSpec,
    BillingRecordStatus,
    PodInterval,
    RoundedMs,
)
from payper.api.common import API_VERSION
from payper.billing.records import (
    ACCOUNT_LABEL,
    DEPLOYMENT_LABEL,
    STATE_LABEL,
    WINDOW_LABEL,
    record_name,
    window_label,
)
from payper.clock import iso
from payper.kube import Kube, resource_path
from payper_dev.cluster.local import ClusterConfig
from payper_dev.testing.cluster import ClusterHandle, eventually, local_cluster
from payper_dev.testing.stack import CHART, Process, Stack

CRDS = Path(__file__).resolve().parents[1] / "crds"
HOUR_MS = 3_600_000
RECORD_NAMESPACES = 100
POD_NAMESPACES = 20
NODES = ("gpu-node-0", "gpu-node-1")
WRITERS = 16


def chart_memory_limit_mib() -> float:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    limit = str(values["operator"]["resources"]["limits"]["memory"])
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", limit).groups()  # type: ignore[union-attr]
    return float(number) * (1024 if unit == "Gi" else 1)


def memory_mib(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    now = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return now / 1024, peak / 1024


def settled(process: Process, minimum_s: float = 20, limit_s: float = 120) -> tuple[float, float]:
    """RSS once it has stopped moving (10 s within 1 MiB, after ``minimum_s``), and peak."""
    assert process.popen is not None
    started = time.monotonic()
    samples: list[float] = []
    while True:
        time.sleep(2)
        samples.append(memory_mib(process.popen.pid)[0])
        elapsed = time.monotonic() - started
        recent = samples[-6:]
        if elapsed >= limit_s or (
            elapsed >= minimum_s and len(recent) == 6 and max(recent) - min(recent) < 1
        ):
            return memory_mib(process.popen.pid)


async def bounded(jobs: list[Callable[[], Awaitable[Any]]], deadline: float) -> int:
    """Run ``jobs`` at most ``WRITERS`` at a time until ``deadline``; how many ran."""
    pending = iter(jobs)
    done = 0

    async def worker() -> None:
        nonlocal done
        for job in pending:
            if time.monotonic() > deadline:
                return
            await job()
            done += 1

    await asyncio.gather(*(worker() for _ in range(WRITERS)))
    return done


def final_record(namespace: str, deployment: str, start_ms: int) -> tuple[dict[str, Any], Any]:
    product = "NVIDIA-H100-80GB-HBM3"
    spec = BillingRecordSpec(
        inference_deployment=deployment,
        account=namespace,
        window={"start": iso(start_ms), "end": iso(start_ms + HOUR_MS)},  # type: ignore[arg-type]
        plan="default",
        granularity="1s",
        currency="USD",
        price_per_gpu_second="0.0012",
        reserved_price_per_gpu_hour="3.20",
        gpu_product=product,
    )
    status = BillingRecordStatus(
        state=FINAL,
        active_us=1_234_567_890,
        active_ms=1_234_568,
        billed_ms=1_240_000,
        rounded_ms=RoundedMs(per_millisecond=1_234_568, per_second=1_240_000, per_minute=1_260_000),
        provisioned_ms=5_760_000,
        bursts=4321,
        requests=98_765,
        amount="1488.00",
        reserved_equivalent_amount="5120.00",
        active_gpu_seconds="1234.568",
        last_applied_sequence={f"gpu-node-{n:04d}/agent-{n:04d}": 360 + n for n in range(64)},
        pod_intervals=[
            PodInterval(
                uid=f"{deployment}-{start_ms}-{p:02d}-0000-0000-000000000000",
                name=f"{deployment}-7d9f8c6b5-{p:05d}",
                gpus=1,
                start_ms=start_ms,
                end_ms=start_ms + HOUR_MS,
            )
            for p in range(16)
        ],
        finalized_at=iso(start_ms + HOUR_MS + 300_000),
    )
    record = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": record_name(deployment, start_ms, product),
            "namespace": namespace,
            "labels": {
                DEPLOYMENT_LABEL: deployment,
                ACCOUNT_LABEL: namespace,
                WINDOW_LABEL: window_label(start_ms),
                STATE_LABEL: FINAL,
            },
        },
        "spec": spec.to_wire(),
    }
    return record, status


async def create_records(kube: Kube, count: int, deadline: float) -> int:
    first_window = (int(time.time() * 1000) // HOUR_MS - 48) * HOUR_MS  # two days ago
    per_namespace = -(-count // RECORD_NAMESPACES)
    deployments = 10
    jobs = []
    for index in range(count):
        namespace = f"records-{index // per_namespace:03d}"
        within = index % per_namespace
        start = first_window - (within // deployments) * HOUR_MS
        record, status = final_record(namespace, f"model-{within % deployments}", start)

        async def job(record: dict[str, Any] = record, status: Any = status) -> None:
            namespace = record["metadata"]["namespace"]
            created = await kube.create(resource_path(API_VERSION, PLURAL, namespace), record)
            path = resource_path(API_VERSION, PLURAL, namespace, record["metadata"]["name"])
            await kube.replace_status(f"{path}/status", created, status)

        jobs.append(job)
    return await bounded(jobs, deadline)


def pod(index: int) -> dict[str, Any]:
    gpu = index % 10 == 0
    resources: dict[str, Any] = {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"memory": "1Gi", **({"nvidia.com/gpu": "1"} if gpu else {})},
    }
    app = f"app-{index % 50:02d}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{app}-7d9f8c6b5-{index:05d}",
            "namespace": f"pods-{index % POD_NAMESPACES:02d}",
            "labels": {"app": app, "tier": "backend", "pod-template-hash": "7d9f8c6b5"},
            "annotations": {"example.com/revision": "42"},
        },
        "spec": {
            "nodeName": NODES[index % len(NODES)],
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "server",
                    "image": "registry.example.com/team/server:1.2.3",
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "env": [{"name": f"SETTING_{k}", "value": f"value-{k}"} for k in range(6)],
                    "resources": resources,
                },
                {
                    "name": "log-shipper",
                    "image": "registry.example.com/infra/shipper:0.9",
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                },
            ],
        },
    }


async def create_pods(kube: Kube, count: int, deadline: float) -> int:
    jobs = []
    for index in range(count):
        body = pod(index)

        async def job(body: dict[str, Any] = body) -> None:
            namespace = body["metadata"]["namespace"]
            await kube.create(resource_path("v1", "pods", namespace), body)

        jobs.append(job)
    return await bounded(jobs, deadline)


async def not_running(kube: Kube) -> int:
    """Pods not yet Running (at most 500 counted)."""
    listing = await kube.list(
        resource_path("v1", "pods"), {"fieldSelector": "status.phase!=Running", "limit": "500"}
    )
    return len(listing["items"])


def namespaces(handle: ClusterHandle, prefix: str, count: int) -> None:
    names = [f"{prefix}-{n:0{3 if prefix == 'records' else 2}d}" for n in range(count)]
    handle.apply_items(
        [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]
    )
    for name in names:  # pods need their namespace's default ServiceAccount
        eventually(
            lambda name=name: (
                handle.kubectl(
                    "get", "serviceaccount", "default", "-n", name, check=False
                ).returncode
                == 0
            ),
            60,
            0.2,
            f"default ServiceAccount in {name}",
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--records-timeout", type=float, default=240)
    parser.add_argument("--pods-timeout", type=float, default=240)
    args = parser.parse_args()
    limit = chart_memory_limit_mib()
    rows: list[tuple[str, float, float]] = []
    config = ClusterConfig(pod_cidr="127.12.0.0/16", crds_dir=str(CRDS), cold_start_ms=0)
    with (
        tempfile.TemporaryDirectory(prefix="payper-bench-memory-") as scratch,
        local_cluster(Path(scratch) / "cluster", config) as handle,
    ):
        stack = Stack(handle, Path(scratch) / "stack")
        stack.ensure_system()

        def measured(what: str) -> None:
            operator = stack.start_operator()
            try:
                rss, peak = settled(operator)
            finally:
                operator.stop()
            rows.append((what, rss, peak))
            print(f"  {what}: RSS {rss:.0f} MiB, peak {peak:.0f} MiB", flush=True)

        print("phase 1: baseline", flush=True)
        measured("baseline: no records, no pods")

        if args.records:
            print(f"phase 2: {args.records} Final records", flush=True)
            namespaces(handle, "records", RECORD_NAMESPACES)
            started = time.monotonic()

            async def records() -> int:
                async with handle.kube() as kube:
                    return await create_records(
                        kube, args.records, time.monotonic() + args.records_timeout
                    )

            made_records = asyncio.run(records())
            print(f"  {made_records} records in {time.monotonic() - started:.0f} s", flush=True)
            measured(f"{made_records} Final records present at start")

        made_pods = 0
        if args.pods:
            before_pods = rows[-1][1]
            print(f"phase 3: {args.pods} pods", flush=True)
            namespaces(handle, "pods", POD_NAMESPACES)
            operator = stack.start_operator()
            started = time.monotonic()

            async def pods() -> int:
                async with handle.kube() as kube:
                    deadline = time.monotonic() + args.pods_timeout
                    made = await create_pods(kube, args.pods, deadline)
                    while time.monotonic() < deadline + 120:  # kwok plays them to Running
                        if not await not_running(kube):
                            break
                        await asyncio.sleep(2)
                    return made

            try:
                made_pods = asyncio.run(pods())
                print(
                    f"  {made_pods} pods created and Running after "
                    f"{time.monotonic() - started:.0f} s",
                    flush=True,
                )
                rss, peak = settled(operator)
            finally:
                operator.stop()
            rows.append((f"{made_pods} pods, seen through the watch", rss, peak))
            print(f"  watching: RSS {rss:.0f} MiB, peak {peak:.0f} MiB", flush=True)
            print("phase 4: restart with the pods present", flush=True)
            measured(f"{made_pods} pods present at start")

    base = rows[0][1]
    print(f"chart limit (operator.resources.limits.memory): {limit:.0f} MiB")
    print("phase                                    RSS MiB  peak MiB  RSS/base  peak/limit")
    for what, rss, peak in rows:
        print(f"{what:<40} {rss:8.0f} {peak:9.0f} {rss / base:9.2f} {peak / limit:11.2f}")
    if made_pods:
        per_pod_kib = (rows[-1][1] - before_pods) * 1024 / made_pods
        at_target = before_pods + per_pod_kib * args.pods / 1024
        note = "" if made_pods >= args.pods else " (extrapolated linearly)"
        print(
            f"per pod (restart with pods vs the phase before): {per_pod_kib:.1f} KiB; at "
            f"{args.pods} pods: {at_target:.0f} MiB RSS{note}, {at_target / limit:.2f} of the limit"
        )
    print(
        f"goal: RSS at {args.records} Final records and at {args.pods} pods within the "
        f"chart's limit ({limit:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
