"""Benchmark: first held request -> the Deployment asks for a replica (scale-from-zero decision).

For each of N InferenceDeployments at zero: send one request through payper-gateway and
measure, on this machine's monotonic clock, until a watch on Deployments shows
``spec.replicas >= 1``. That covers the gateway's hold and poke, the operator's token
check, decision and server-side apply, and the watch delivery back to the client.

    .venv/bin/python bench/scale_from_zero.py [--trials 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from payper.kube import Kube, resource_path
from payper_dev.cluster.local import ClusterConfig
from payper_dev.testing.cluster import local_cluster
from payper_dev.testing.stack import Stack, inference_deployment

CRDS = Path(__file__).resolve().parents[1] / "crds"
NAMESPACE = "bench-zero"
GOAL_P99_MS = 100.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(stack: Stack, kubeconfig: Path, names: list[str]) -> list[float]:
    scaled: dict[str, float] = {}
    seen = asyncio.Event()
    async with Kube.connect(kubeconfig) as kube:
        path = resource_path("apps/v1", "deployments", NAMESPACE)
        listing = await kube.list(path)

        async def watch() -> None:
            async for event in kube.watch(path, listing["metadata"]["resourceVersion"]):
                obj = event["object"]
                name = obj["metadata"]["name"]
                if obj.get("spec", {}).get("replicas", 0) >= 1 and name not in scaled:
                    scaled[name] = time.monotonic()
                    seen.set()

        watcher = asyncio.create_task(watch())
        latencies = []
        async with aiohttp.ClientSession() as http:
            for name in names:
                seen.clear()
                started = time.monotonic()
                request = asyncio.create_task(http.get(f"{stack.gateway_url}/{NAMESPACE}/{name}/"))
                while name not in scaled:
                    await asyncio.wait_for(seen.wait(), 10)
                    seen.clear()
                latencies.append((scaled[name] - started) * 1000)
                request.cancel()
                await asyncio.sleep(0.2)
        watcher.cancel()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    config = ClusterConfig(pod_cidr="127.7.0.0/16", cold_start_ms=60_000, crds_dir=str(CRDS))
    with (
        tempfile.TemporaryDirectory(prefix="payper-bench-zero-") as scratch,
        local_cluster(Path(scratch) / "cluster", config) as handle,
    ):
        handle.kubectl("create", "namespace", NAMESPACE)
        names = [f"zero-{i:03d}" for i in range(args.trials)]
        items = []
        for name in names:
            manifest = inference_deployment(name, idle_timeout_s=3600, runner=False)
            manifest["metadata"]["namespace"] = NAMESPACE
            items.append(manifest)
        handle.apply_items(items)
        stack = Stack(handle, Path(scratch) / "stack")
        stack.ensure_system()
        stack.start_operator()
        stack.start_gateway()
        try:
            time.sleep(3)  # every deployment reconciled and seen by the gateway
            latencies = asyncio.run(measure(stack, handle.kubeconfig, names))
        finally:
            stack.stop()
    p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
    print(f"trials: {len(latencies)}")
    print("first held request -> Deployment spec.replicas=1, in ms:")
    print(f"p50 {p50:.1f}  p99 {p99:.1f}  max {max(latencies):.1f}")
    print(f"goal: p99 <= {GOAL_P99_MS:.0f} ms -> p99 is {p99 / GOAL_P99_MS:.2f} of the goal")


if __name__ == "__main__":
    main()
