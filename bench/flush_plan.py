"""Benchmark: the ledger's pure core plans one flush of 10,000 agents' reports, on one core.

A fleet of N GPU nodes (default 10,000), one agent each, 8 GPUs per node, 8 one-GPU pods
per node with 4 containers each: 32 series per report, and 8 per-GPU rows (``gpus``), as a
real agent sends. Pods belong to 2,000 InferenceDeployments in 200 namespaces (40
replicas each, spread over the fleet); 1 pod in 20 belongs to no InferenceDeployment (its
namespace's own records). Half the nodes carry H100s, half A100s; each deployment names
one of the two and runs on nodes that carry it. Every report is the
next in its agent's sequence (all are applied: the most work), every pod holds its GPU
(provisioned spans for all 80,000), and the gateways counted requests for every
deployment.

Timed in CPU seconds of this process, pinned to one core (the machine may run other work:
wall time is printed too, but CPU time is what the step costs), median of ``--repeat``
runs, the garbage collector on as in the operator:

- the baseline: parsing and validating the same reports from JSON
  (``parse_batch``, one batch per agent), which the operator's usage
  endpoint does for every report anyway, before any flush;
- on arrival, each report's series summed per run of one pod (``UsageReport.runs``),
  which ``Ledger.submit`` does as each report arrives, spread over the interval; the
  plan then routes runs, not series;
- ``flush.plan`` (the target: under 10 % of the 10 s flush interval);
- with ``--baseline``, ``flush.plan`` of the code before, on the same fleet and the same
  core, in a process of its own that imports that tree's ``payper`` (run first, so both
  are timed in one invocation), and whether it planned the same: both plans are reduced
  to what they write (per record: each report's usage summed, the counts, the pod
  spans; what each report touched, what was refused, what waits) and compared by digest.
  The code before made one usage delta per series; ``records.apply`` applies a report's
  deltas in a record all or nothing, so their sum per report and record is what counts;
- for the record, the other pure steps of the same flush: ``flush.acknowledge`` and the
  per-GPU reconciliation's ``collect``.

    .venv/bin/python bench/flush_plan.py [--agents 10000] [--repeat 5] [--cpu 1]
    mkdir /tmp/flush-before && git archive f160efa operator | tar -x -C /tmp/flush-before
    .venv/bin/python bench/flush_plan.py --agents 10000 --repeat 3 --baseline /tmp/flush-before
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import payper
from payper.api.usage import UsageReport, parse_batch
from payper.billing import flush, reconciliation
from payper.billing.events import BillingEvents
from payper.billing.flush import BillingWindows, Observations
from payper.observed import UNMANAGED, Key, Owner, PodView

FLUSH_INTERVAL_S = 10.0
GOAL = 0.10
GPUS_PER_NODE = 8
CONTAINERS = ("server", "tokenizer", "metrics", "init-weights")
NAMESPACES = 200
DEPLOYMENTS_PER_NAMESPACE = 10
UNMANAGED_ONE_IN = 20
HOUR_MS = 3_600_000
PRODUCTS = ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB")


def fleet(agents: int, now_ms: int) -> tuple[list[bytes], Observations, dict[str, int]]:
    """The agents' request bodies, what the operator observed, and the progress so far."""
    rng = random.Random(agents)
    deployments = [
        (f"tenant-{n:03d}", f"model-{d}")
        for n in range(NAMESPACES)
        for d in range(DEPLOYMENTS_PER_NAMESPACE)
    ]
    interval_end = now_ms // 10_000 * 10_000
    bodies: list[bytes] = []
    pods: dict[Key, dict[str, PodView]] = {}
    owners: dict[str, Key] = {}
    node_products: dict[str, str] = {}
    progress: dict[str, int] = {}
    for index in range(agents):
        node = f"gpu-node-{index:05d}"
        product = PRODUCTS[index % 2]
        node_products[node] = product.replace(" ", "-")
        agent_id = f"agent-{index:05d}"
        sequence = rng.randrange(100, 10_000)
        progress[f"{node}/{agent_id}"] = sequence - 1
        series: list[dict[str, Any]] = []
        gpus: list[dict[str, Any]] = []
        for gpu_index in range(GPUS_PER_NODE):
            gpu = f"GPU-{index:05d}-{gpu_index}"
            namespace, deployment = rng.choice(deployments[index % 2 :: 2])  # its product
            managed = rng.randrange(UNMANAGED_ONE_IN) != 0
            pod_name = f"{deployment}-{rng.getrandbits(40):010x}"
            uid = f"uid-{index:05d}-{gpu_index}"
            key: Key = (namespace, deployment if managed else UNMANAGED)
            owners[uid] = key
            pods.setdefault(key, {})[uid] = PodView(
                name=pod_name,
                uid=uid,
                created_ms=now_ms - 7_200_000,
                ready=True,
                unschedulable=None,
                scheduled_ms=now_ms - rng.randrange(60_000, 7_200_000),
                node=node,
                gpus=1,
                namespace=namespace,
                deployment=deployment if managed else None,
                containers=CONTAINERS,
                owner=Owner("ReplicaSet", f"{deployment}-abc", f"rs-{deployment}")
                if managed
                else None,
            )
            attributed = 0
            for container in CONTAINERS:
                active = rng.randrange(0, 10_000_000) if container == "server" else 0
                active = active or rng.randrange(0, 50_000)
                attributed += active
                series.append(
                    {
                        "namespace": namespace,
                        "pod": pod_name,
                        "podUid": uid,
                        "container": container,
                        "gpu": gpu,
                        "gpuProduct": product,
                        "inferenceDeployment": deployment if managed else None,
                        "activeUs": active,
                        "roundedMs": {
                            "1ms": -(-active // 1000),
                            "1s": -(-active // 1_000_000) * 1000,
                            "1m": 60_000 if active else 0,
                        },
                        "bursts": rng.randrange(0, 20),
                    }
                )
            wall = 10_000_000 + max(0, attributed - 10_000_000)
            gpus.append(
                {
                    "gpu": gpu,
                    "gpuProduct": product,
                    "wallUs": wall,
                    "attributedUs": attributed,
                    "idleUs": wall - attributed,
                }
            )
        report = {
            "agentId": agent_id,
            "sequence": sequence,
            "node": node,
            "intervalStartMs": interval_end - 10_000,
            "intervalEndMs": interval_end,
            "series": series,
            "gpus": gpus,
        }
        bodies.append(json.dumps({"reports": [report]}).encode())
    events = BillingEvents()
    for key in deployments:
        events.requests[key] = rng.randrange(1, 5000)
        if rng.randrange(10) == 0:
            events.cold_starts[key] = 1
    # Every reported pod is one the operator sees on its agent's node (the code before,
    # with --baseline, may predate that field).
    newer = {
        "pod_nodes": {uid: pod.node for grouped in pods.values() for uid, pod in grouped.items()}
    }
    known_fields = {f.name for f in dataclasses.fields(Observations)}
    seen = Observations(
        events=events,
        pods=pods,
        deployment_products={
            key: PRODUCTS[i % 2].replace(" ", "-") for i, key in enumerate(deployments)
        },
        node_products=node_products,
        unplaced_since={},
        owners=owners,
        **{name: value for name, value in newer.items() if name in known_fields},
    )
    return bodies, seen, progress


def timed(step: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Median wall and CPU seconds of ``step`` over ``repeat`` runs, and its last result.

    Each run starts with the previous one's result released, as the ledger releases a
    flush's plan before planning the next: a result still held when the next run starts
    swells the objects the collector counts as long-lived, and so delays the full
    collection that a step making many objects sets off (the first version of this
    script held it, which spared the code before's flush.plan that collection in every
    run but the first: bench/README.md)."""
    walls, cpus = [], []
    result = None
    for _ in range(repeat):
        result = None
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        result = step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def written(planned: flush.FlushPlan) -> dict[str, Any]:
    """What a plan makes the ledger write and remember, in plain values: per record (in
    the plan's order) each report's usage summed, the counts and the pod spans; what
    each report touched; the refused series and their records; what waits."""

    def usage(change: Any) -> list[list[Any]]:
        by_report: dict[tuple[str, int], list[Any]] = {}
        for d in change.usage:
            report = (d.agent_id, d.sequence)
            seed = [*report, d.legacy_agent_id, d.original_window_ms, 0, 0, 0, 0, 0, None]
            total = by_report.setdefault(report, seed)
            total[4] += d.active_us
            total[5] += d.rounded_ms.per_millisecond
            total[6] += d.rounded_ms.per_second
            total[7] += d.rounded_ms.per_minute
            total[8] += d.bursts
            if d.split_us is not None:
                split = total[9] or [0, 0]
                total[9] = [split[0] + d.split_us.proportional, split[1] + d.split_us.equal]
        return sorted(by_report.values())

    def records(changes: Any) -> list[list[Any]]:
        return [
            [
                [key.namespace, key.deployment, key.window_start_ms, key.product],
                usage(change),
                change.requests,
                change.cold_starts,
                [[u, s.uid, s.name, s.gpus, s.start_ms, s.end_ms] for u, s in change.pods.items()],
            ]
            for key, change in changes.items()
        ]

    def keys(held: Any) -> list[list[Any]]:
        return sorted([*key, value] for key, value in held.items())

    return {
        "accepted": [[r.node, r.agent_id, r.sequence] for r in planned.selection.accepted],
        "duplicates": planned.selection.duplicates,
        "out_of_order": planned.selection.out_of_order,
        "changes": records(planned.changes),
        "touched": sorted(
            [
                *report,
                sorted([k.namespace, k.deployment, k.window_start_ms, k.product] for k in records_),
            ]
            for report, records_ in planned.touched.items()
        ),
        "refused": [
            [r.node, r.agent_id, r.sequence, s.pod_uid, s.container, s.gpu, why]
            for r, s, why in planned.refused
        ],
        "refused_changes": {
            reason: records(changes) for reason, changes in planned.refused_changes.items()
        },
        "held_requests": keys(planned.held_requests),
        "held_cold_starts": keys(planned.held_cold_starts),
        "unplaced_since": keys(planned.unplaced_since),
    }


def digest(planned: flush.FlushPlan) -> str:
    canonical = json.dumps(written(planned), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def baseline(args: argparse.Namespace, now_ms: int) -> dict[str, Any]:
    """``flush.plan`` of the code before, timed in a process that imports its tree."""
    environment = dict(os.environ, PYTHONPATH=str(Path(args.baseline).resolve() / "operator"))
    command = [sys.executable, __file__, "--plan-only", "--now-ms", str(now_ms)]
    command += ["--agents", str(args.agents), "--repeat", str(args.repeat), "--cpu", str(args.cpu)]
    done = subprocess.run(command, env=environment, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    assert Path(result["payper"]).resolve().is_relative_to(Path(args.baseline).resolve()), result
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1)
    parser.add_argument(
        "--baseline",
        help="a tree holding the code before's operator/ (git archive COMMIT operator): "
        "its flush.plan is timed first, on the same fleet and core",
    )
    parser.add_argument("--plan-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--now-ms", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})

    now_ms = args.now_ms or int(time.time() * 1000) // HOUR_MS * HOUR_MS + 1_800_000  # mid-window
    before = baseline(args, now_ms) if args.baseline else None
    windows = BillingWindows(HOUR_MS, 300_000)
    bodies, seen, progress = fleet(args.agents, now_ms)
    body_mib = sum(len(b) for b in bodies) / 2**20

    def parse() -> list[UsageReport]:
        return [r for body in bodies for r in parse_batch(body)[0]]

    parse_s, parse_cpu, reports = timed(parse, 1 if args.plan_only else args.repeat)

    def arrive() -> None:
        for report in reports:
            report.__dict__.pop("runs", None)
        for report in reports:
            report.runs  # noqa: B018 - as ledger.submit does when a report arrives

    arrive_s, arrive_cpu = (0.0, 0.0)
    if hasattr(UsageReport, "runs"):  # summed when reports arrive (not in the code before)
        arrive_s, arrive_cpu, _ = timed(arrive, 1 if args.plan_only else args.repeat)

    def plan() -> flush.FlushPlan:
        return flush.plan(reports, progress, seen, windows, now_ms)

    plan_s, plan_cpu, planned = timed(plan, args.repeat)
    if args.plan_only:
        deltas = sum(len(c.usage) for c in planned.changes.values())
        print(
            json.dumps(
                {"payper": payper.__file__, "cpu": plan_cpu, "wall": plan_s}
                | {"digest": digest(planned), "deltas": deltas}
            )
        )
        return
    ack_s, ack_cpu, acknowledged = timed(
        lambda: flush.acknowledge(planned, progress, set()), args.repeat
    )
    collect_s, collect_cpu, grouped = timed(
        lambda: reconciliation.collect(planned, acknowledged, set(), windows, now_ms),
        args.repeat,
    )

    series = sum(len(r.series) for r in reports)
    pod_count = sum(len(p) for p in seen.pods.values())
    print(
        f"fleet: {args.agents} agents x {len(reports[0].series)} series ({series} series, "
        f"{body_mib:.1f} MiB of JSON), {pod_count} GPU pods, "
        f"{NAMESPACES * DEPLOYMENTS_PER_NAMESPACE} deployments in {NAMESPACES} namespaces; "
        f"one core (CPU {args.cpu}), median of {args.repeat}"
    )
    print(
        f"plan: {len(planned.selection.accepted)} reports accepted, {len(planned.changes)} "
        f"records touched, {len(grouped)} node objects"
    )
    steps = [
        ("baseline: parse + validate reports", parse_s, parse_cpu),
        ("on arrival: each report's runs", arrive_s, arrive_cpu),
        ("flush.plan", plan_s, plan_cpu),
        ("flush.acknowledge", ack_s, ack_cpu),
        ("reconciliation.collect", collect_s, collect_cpu),
    ]
    if before is not None:
        steps.insert(1, ("flush.plan, the code before", before["wall"], before["cpu"]))
    print(
        "step                                   cpu s   wall s   vs parse   vs before"
        "   of the interval"
    )
    for name, wall, cpu in steps:
        versus = f"{cpu / before['cpu']:11.2f}" if before and name == "flush.plan" else " " * 11
        print(
            f"{name:<36} {cpu:8.3f} {wall:8.3f} {cpu / parse_cpu:10.2f}{versus} "
            f"{cpu / FLUSH_INTERVAL_S:16.1%}"
        )
    if before is not None:
        deltas = sum(len(c.usage) for c in planned.changes.values())
        same = "yes" if before["digest"] == digest(planned) else "NO"
        print(
            f"same plan as the code before (what it writes, by digest): {same}; usage deltas "
            f"{deltas} (before: {before['deltas']})"
        )
    share = plan_cpu / FLUSH_INTERVAL_S
    verdict = "met" if share < GOAL else "NOT met"
    print(
        f"goal: flush.plan under {GOAL:.0%} of the {FLUSH_INTERVAL_S:.0f} s flush interval "
        f"on one core (CPU time): {share:.1%}, {share / GOAL:.2f} of the goal ({verdict})"
    )


if __name__ == "__main__":
    main()
