"""Benchmark: the operator with 1,000 InferenceDeployments at zero.

Creates N InferenceDeployments before the operator runs, starts it, and measures:

- time from operator start until every deployment is reconciled (its Deployment exists
  and its status was written for the current generation);
- the operator's resident memory (RSS now and at peak);
- the autoscaler tick: mean duration over a minute of steady state, from the operator's
  own ``payper_autoscaler_tick_duration_seconds`` histogram.

    .venv/bin/python bench/operator_scale.py [--deployments 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
import urllib.request
from pathlib import Path

from payper.kube import Kube, resource_path
from payper_dev.cluster.local import ClusterConfig
from payper_dev.testing.cluster import local_cluster
from payper_dev.testing.stack import Stack, inference_deployment

CRDS = Path(__file__).resolve().parents[1] / "crds"
NAMESPACE = "bench-scale"
GOALS = {"reconcile_s": 60.0, "rss_mib": 300.0, "tick_ms": 20.0}


def rss_mib(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    now = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return now / 1024, peak / 1024


def tick_totals(metrics_url: str) -> tuple[float, float]:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    total = float(
        re.search(r"^payper_autoscaler_tick_duration_seconds_sum (\S+)", text, re.M).group(1)
    )  # type: ignore[union-attr]
    count = float(
        re.search(r"^payper_autoscaler_tick_duration_seconds_count (\S+)", text, re.M).group(1)
    )  # type: ignore[union-attr]
    return total, count


async def reconciled(kubeconfig: Path) -> tuple[int, int]:
    async with Kube.connect(kubeconfig) as kube:
        infds = (
            await kube.list(resource_path("payper.dev/v1alpha1", "inferencedeployments", NAMESPACE))
        )["items"]
        deployments = (await kube.list(resource_path("apps/v1", "deployments", NAMESPACE)))["items"]
    have = {d["metadata"]["name"] for d in deployments}
    done = sum(
        1
        for i in infds
        if i["metadata"]["name"] in have
        and i.get("status", {}).get("observedGeneration") == i["metadata"]["generation"]
    )
    return done, len(infds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deployments", type=int, default=1000)
    parser.add_argument("--steady-seconds", type=int, default=60)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="payper-bench-scale-") as scratch,
        local_cluster(
            Path(scratch) / "cluster", ClusterConfig(pod_cidr="127.8.0.0/16", crds_dir=str(CRDS))
        ) as handle,
    ):
        handle.kubectl("create", "namespace", NAMESPACE)
        for start in range(0, args.deployments, 200):
            items = []
            for index in range(start, min(args.deployments, start + 200)):
                manifest = inference_deployment(f"d-{index:04d}", runner=False)
                manifest["metadata"]["namespace"] = NAMESPACE
                items.append(manifest)
            handle.apply_items(items, verb="create", timeout=300)
        stack = Stack(handle, Path(scratch) / "stack")
        stack.ensure_system()
        started = time.monotonic()
        operator = stack.start_operator()
        try:
            assert operator.popen is not None
            done, total = 0, args.deployments
            while done < total:
                time.sleep(1)
                done, total = asyncio.run(reconciled(handle.kubeconfig))
                print(
                    f"  {time.monotonic() - started:6.1f}s  {done}/{total} reconciled",
                    flush=True,
                )
            reconcile_s = time.monotonic() - started
            first = tick_totals(stack.metrics_url)
            time.sleep(args.steady_seconds)
            second = tick_totals(stack.metrics_url)
            tick_ms = (second[0] - first[0]) / max(1.0, second[1] - first[1]) * 1000
            rss_now, rss_peak = rss_mib(operator.popen.pid)
        finally:
            stack.stop()
    print(f"deployments: {args.deployments}")
    report("all reconciled after operator start", reconcile_s, "s", "reconcile_s")
    print(f"operator RSS now: {rss_now:.0f} MiB")
    report("operator RSS peak", rss_peak, "MiB", "rss_mib")
    report("autoscaler tick, steady-state mean", tick_ms, "ms", "tick_ms")


def report(what: str, value: float, unit: str, goal: str) -> None:
    limit = GOALS[goal]
    print(f"{what}: {value:.2f} {unit} (goal < {limit:.0f} {unit}: {value / limit:.2f} of it)")


if __name__ == "__main__":
    main()
