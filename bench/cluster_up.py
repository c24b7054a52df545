"""Benchmark: how long `payper-dev cluster up` takes with a warm binary cache.

Starts and stops a local cluster several times in a scratch directory and reports, per
phase, the median and worst time from the start of `up` (etcd healthy, API server ready,
all nodes Ready with the default ServiceAccount present), against the 20 s goal.

    .venv/bin/python bench/cluster_up.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from payper_dev.cluster.local import ClusterConfig, LocalCluster

GOAL_S = 20.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    phases: dict[str, list[float]] = {}
    totals, downs = [], []
    with tempfile.TemporaryDirectory(prefix="payper-bench-") as scratch:
        for _ in range(args.runs):
            cluster = LocalCluster(Path(scratch) / "cluster")
            started = time.monotonic()
            cluster.up(ClusterConfig(pod_cidr="127.4.0.0/16"))
            totals.append(time.monotonic() - started)
            for phase, seconds in cluster.timings.items():
                phases.setdefault(phase, []).append(seconds)
            started = time.monotonic()
            cluster.down()
            downs.append(time.monotonic() - started)
    print(f"runs: {args.runs}")
    print(f"{'phase':<28}{'median s':>10}{'max s':>10}")
    for phase, values in phases.items():
        print(f"{phase:<28}{statistics.median(values):>10.2f}{max(values):>10.2f}")
    print(f"{'up (whole command)':<28}{statistics.median(totals):>10.2f}{max(totals):>10.2f}")
    print(f"{'down':<28}{statistics.median(downs):>10.2f}{max(downs):>10.2f}")
    ratio = statistics.median(totals) / GOAL_S
    print(f"goal: ready in < {GOAL_S:.0f} s -> the median is {ratio:.2f} of the goal")


if __name__ == "__main__":
    main()
