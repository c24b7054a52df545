"""Benchmark: usage ingestion at fleet scale, one operator pinned to one core.

Simulated agents (one load process) each post a report of 32 series every 10 s, as a
GPU node's agent does; their usage spreads over 200 InferenceDeployments. For each fleet
size the operator (flush every 10 s, pinned to CPU 1; the API server and the load share
CPU 0) runs a minute in steady state, and the benchmark records its CPU share, RSS, the
acknowledgement lag, whether the backlog grows, and the API writes per second it caused
(from the API server's own request counters), against records / flush interval.

Every simulated agent authenticates with a real projected token bound to an agent pod;
two tokens (one per GPU node) serve the whole fleet, since the operator checks the node
and TokenReview results are cached per token anyway.

    .venv/bin/python bench/ingestion.py [--fleets 250,500,1000,2000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from payper.kube import Kube
from payper_dev.cluster.local import ClusterConfig
from payper_dev.testing.cluster import local_cluster
from payper_dev.testing.stack import Stack, StackOptions

CRDS = Path(__file__).resolve().parents[1] / "crds"
NAMESPACE = "bench-usage"
DEPLOYMENTS = 200
SERIES = 32
REPORT_EVERY_S = 10
NODES = ("gpu-node-0", "gpu-node-1")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


async def writes(kube: Kube) -> float:
    """The API server's count of writes to BillingRecords and ConfigMaps so far."""
    text = await kube.request("GET", "/metrics")
    total = 0.0
    for line in str(text).splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        if re.search(r'verb="(PUT|POST|PATCH)"', line) and re.search(
            r'resource="(billingrecords|configmaps)"', line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def fleet(url: str, tokens: dict[str, str], agents: int, seconds: float) -> dict[str, float]:
    rng = random.Random(agents)
    lags: list[float] = []
    unacked = {"count": 0}
    stop = time.monotonic() + seconds

    async def agent(index: int, session: aiohttp.ClientSession) -> None:
        node = NODES[index % len(NODES)]
        agent_id = f"bench-{agents}-{index}"
        deployments = rng.sample(range(DEPLOYMENTS), SERIES)
        sequence = 0
        await asyncio.sleep(rng.uniform(0, REPORT_EVERY_S))
        while time.monotonic() < stop:
            sequence += 1
            now = int(time.time() * 1000)
            report = {
                "agentId": agent_id,
                "sequence": sequence,
                "node": node,
                "intervalStartMs": now - REPORT_EVERY_S * 1000,
                "intervalEndMs": now,
                "series": [
                    {
                        "namespace": NAMESPACE,
                        "pod": f"d{d}-0",
                        "podUid": f"uid-{d}-{index}",
                        "container": "server",
                        "gpu": f"GPU-{node}-{s % 8}",
                        "gpuProduct": "NVIDIA H100 80GB HBM3",
                        "inferenceDeployment": f"d{d}",
                        "activeUs": 1_234_567,
                        "roundedMs": {"1ms": 1235, "1s": 2000, "1m": 60000},
                        "bursts": 1,
                    }
                    for s, d in enumerate(deployments)
                ],
            }
            sent = time.monotonic()
            try:
                async with session.post(
                    url + "/v1/usage",
                    json={"reports": [report]},
                    headers={"Authorization": f"Bearer {tokens[node]}"},
                ) as response:
                    body = await response.json()
                    if body.get("acked", {}).get(agent_id) != sequence:
                        unacked["count"] += 1
                    lags.append(time.monotonic() - sent)
            except (aiohttp.ClientError, TimeoutError):
                unacked["count"] += 1
            await asyncio.sleep(max(0.0, REPORT_EVERY_S - (time.monotonic() - sent)))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        await asyncio.gather(*(agent(i, session) for i in range(agents)))
    return {
        "lag_p50": statistics.median(lags) if lags else float("nan"),
        "lag_max": max(lags) if lags else float("nan"),
        "acked": len(lags) - unacked["count"],
        "unacked": unacked["count"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fleets", default="250,500,1000,2000")
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    rows = []
    config = ClusterConfig(pod_cidr="127.10.0.0/16", crds_dir=str(CRDS))
    with (
        tempfile.TemporaryDirectory(prefix="payper-bench-usage-") as scratch,
        local_cluster(Path(scratch) / "cluster", config) as handle,
    ):
        handle.kubectl("create", "namespace", NAMESPACE)
        stack = Stack(
            handle,
            Path(scratch) / "stack",
            StackOptions(operator_extra={"billing": {"flushIntervalSeconds": 10}}),
        )
        stack.ensure_system()
        tokens = {node: stack.agent_token_file(node).read_text() for node in NODES}
        for size in [int(x) for x in args.fleets.split(",")]:
            operator = stack.start_operator()
            assert operator.popen is not None
            subprocess.run(
                ["taskset", "-acp", "1", str(operator.popen.pid)],
                check=True,
                capture_output=True,
            )

            pid = operator.popen.pid

            async def measured(
                size: int = size, pid: int = pid
            ) -> tuple[dict[str, float], float, float, float]:
                async with handle.kube() as kube:
                    warm = asyncio.create_task(
                        fleet(stack.operator_url, tokens, size, args.seconds + 20)
                    )
                    await asyncio.sleep(20)  # every agent has reported; the first flushes ran
                    cpu0, writes0, t0 = cpu_seconds(pid), await writes(kube), time.monotonic()
                    result = await warm
                    cpu1, writes1, t1 = cpu_seconds(pid), await writes(kube), time.monotonic()
                elapsed = t1 - t0
                cpu_share = (cpu1 - cpu0) / elapsed
                return result, cpu_share, (writes1 - writes0) / elapsed, rss_mib(pid)

            result, cpu, writes_per_s, rss = asyncio.run(measured())
            rows.append((size, cpu, rss, writes_per_s, result))
            operator.stop()
    bound = DEPLOYMENTS / 10
    print(f"fleet: agents x {SERIES} series every {REPORT_EVERY_S} s, {DEPLOYMENTS} deployments")
    print("agents  reports/s  cpu(1 core)  RSS MiB  writes/s  bound  ack p50 s  ack max s  unacked")
    for size, cpu, rss, writes_per_s, r in rows:
        print(
            f"{size:>6}  {size / REPORT_EVERY_S:>9.0f}  {cpu * 100:>10.0f}%  {rss:>7.0f}  "
            f"{writes_per_s:>8.1f}  {bound:>5.0f}  {r['lag_p50']:>9.2f}  {r['lag_max']:>9.2f}  "
            f"{r['unacked']:>7.0f}"
        )
    print("goal: 1000 agents at <= 50 % of one core, writes bounded by records / flush interval")


if __name__ == "__main__":
    main()
