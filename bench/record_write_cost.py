"""Benchmark: what one BillingRecord status write costs the control plane, by record size.

A BillingRecord holds the last applied sequence of every agent that reported to it
(``status.lastAppliedSequence``), and the ledger rewrites the whole status in each flush.
This writes one record's status ``--writes`` times, one write at a time, for records
holding 0, 64, 640 and 2,000 agents (640: every record at 4,000 agents in
bench/ingestion.py), and reports the API server's latency, the CPU kube-apiserver and
etcd spent per write (from /proc), and the object's size with its managedFields.

The shipped CRD marks ``lastAppliedSequence`` as ``x-kubernetes-map-type: atomic``, so the
API server tracks the map's owner as one field instead of one per agent. The baseline is
the same on a second cluster whose CRD is a copy without that marker (a granular map,
as shipped before), in the same run.

    .venv/bin/python bench/record_write_cost.py [--writes 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from payper.api.billing_record import PLURAL
from payper.api.common import API_VERSION
from payper.kube import Kube, resource_path
from payper_dev.cluster.local import ClusterConfig
from payper_dev.testing.cluster import local_cluster

CRDS = Path(__file__).resolve().parents[1] / "crds"
SIZES = (0, 64, 640, 2000)
NAMESPACE = "bench-writes"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def control_plane_cpu(cluster_dir: Path) -> float:
    pids = json.loads((cluster_dir / "state.json").read_text())["pids"]
    return sum(cpu_seconds(int(pids[name])) for name in ("kube-apiserver", "etcd"))


def granular_crds(directory: Path) -> Path:
    """The CRDs as shipped, but ``lastAppliedSequence`` a granular map (as before)."""
    target = directory / "crds"
    shutil.copytree(CRDS, target)
    (path,) = target.glob("*billingrecords*.yaml")
    text = path.read_text()
    marker = (
        "                maxProperties: 4096\n                type: object\n"
        "                x-kubernetes-map-type: atomic\n"
    )
    assert text.count(marker) == 1, "lastAppliedSequence's schema moved: update this benchmark"
    path.write_text(text.replace(marker, marker.rsplit("                x-", 1)[0]))
    return target


async def measure(
    kube: Kube, cluster_dir: Path, writes: int
) -> list[tuple[int, float, float, int, int]]:
    await kube.create(
        resource_path("v1", "namespaces"),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
    )
    rows = []
    for agents in SIZES:
        name = f"record-{agents}"
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": "BillingRecord",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "inferenceDeployment": "d",
                "account": NAMESPACE,
                "window": {"start": "2026-11-27T16:00:00Z", "end": "2026-11-27T17:00:00Z"},
                "plan": "default",
                "granularity": "1s",
                "currency": "USD",
                "pricePerGpuSecond": "0.0012",
                "reservedPricePerGpuHour": "3.20",
                "gpuProduct": "NVIDIA-H100-80GB-HBM3",
            },
        }
        record = await kube.create(resource_path(API_VERSION, PLURAL, NAMESPACE), body)
        path = resource_path(API_VERSION, PLURAL, NAMESPACE, name, "status")
        cpu0, started = control_plane_cpu(cluster_dir), time.perf_counter()
        for sequence in range(1, writes + 1):
            record["status"] = {
                "state": "Open",
                "activeUs": sequence,
                "lastAppliedSequence": {
                    f"gpu-node-{a:04d}/agent-{a:04d}": sequence for a in range(agents)
                },
            }
            record = await kube.request(
                "PUT", path, body=record, params={"fieldValidation": "Strict"}
            )
        elapsed = time.perf_counter() - started
        cpu = control_plane_cpu(cluster_dir) - cpu0
        size = len(json.dumps(record))
        managed = len(json.dumps(record["metadata"].get("managedFields")))
        rows.append((agents, elapsed / writes * 1000, cpu / writes * 1000, size, managed))
        print(f"  {agents} agents done", flush=True)
    return rows


async def written(
    kubeconfig: Path, cluster_dir: Path, writes: int
) -> list[tuple[int, float, float, int, int]]:
    async with Kube.connect(kubeconfig) as kube:
        return await measure(kube, cluster_dir, writes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--writes", type=int, default=100)
    args = parser.parse_args()
    results = {}
    for atomic in (False, True):
        with tempfile.TemporaryDirectory(prefix="payper-bench-writes-") as scratch:
            crds = CRDS if atomic else granular_crds(Path(scratch))
            config = ClusterConfig(pod_cidr="127.14.0.0/16", crds_dir=str(crds))
            cluster_dir = Path(scratch) / "cluster"
            print("atomic map (shipped)" if atomic else "granular (before)", flush=True)
            with local_cluster(cluster_dir, config) as handle:
                results[atomic] = asyncio.run(written(handle.kubeconfig, cluster_dir, args.writes))
    print(f"{args.writes} status writes per record size, one at a time")
    print(
        "lastAppliedSequence   agents  ms/write (API)  apiserver+etcd CPU ms/write  "
        "object KiB  managedFields KiB"
    )
    for atomic, rows in results.items():
        for agents, latency, cpu, size, managed in rows:
            print(
                f"{'atomic (shipped)' if atomic else 'granular (before)':<20} {agents:>7}  "
                f"{latency:>14.1f}  "
                f"{cpu:>27.1f}  {size / 1024:>10.0f}  {managed / 1024:>17.0f}"
            )
    for (agents, _, granular, _, _), (_, _, atomic_cpu, _, _) in zip(
        results[False], results[True], strict=True
    ):
        print(
            f"{agents} agents: atomic (shipped) vs granular (before), "
            f"control-plane CPU {atomic_cpu / granular:.2f}x"
        )


if __name__ == "__main__":
    main()
