"""Benchmark: usage ingestion at fleet scale, record writes one at a time vs bounded.

Simulated agents each cut a report of 32 series every 10 s, as a GPU node's agent does;
their usage spreads over 200 InferenceDeployments, so every flush writes 200
BillingRecords, each holding the last applied sequence of every agent that reported to
it (640 agents per record at 4,000 agents). Each configuration is measured for each
record write concurrency in ``--concurrency`` (``billing.recordWriteConcurrency``; 1 is
the one-after-another flush of the code before it) and, end to end, for the code before
(``--baseline``: its operator, which also slept a whole interval after each flush instead
of keeping a fixed cadence, and its CRDs if the tree has ``crds/``), in one run, each in
a namespace of its own and from an empty progress ConfigMap, so the runs are comparable.
The chart's records admission policy is installed, as in a cluster.

1. The ledger alone (``--ledger-agents``): a ``Ledger`` in this process, pinned to CPU
   1, as the operator's ServiceAccount against the real API server; each round every
   agent's report is submitted and one flush is timed (no HTTP, no load generator: what
   the flush itself costs). Also its CPU per flush, and per record write the API server's
   own latency and the CPU kube-apiserver and etcd spent (from /proc), which is what
   bounds the write throughput on a machine of a few cores.
2. End to end (``--fleets``): a fresh operator (flush every 10 s, pinned to CPU 1) and
   one load process with every agent behaving as ``payper_agent`` does: it cuts report n
   at the n-th wall-clock 10 s boundary (plus its own poll phase, under a second: the
   fleet reports within a second of each boundary), sends its unacknowledged reports in
   order, one batch at a time, gives up on a request after 30 s and backs off as the
   agent does. A report's acknowledgement latency runs from its cut to the answer that
   acknowledges it (waits behind earlier reports included); the goal is p99 within two
   flush intervals. The first round is warm-up (records are created); the rest are
   measured, with the operator's CPU share, RSS, mean flush duration (its own histogram)
   and record writes per second, and reports still unacknowledged ``--drain`` seconds
   after the last cut.

Every simulated agent authenticates with a real projected token bound to an agent pod;
four tokens (one per kwok GPU node) serve the whole fleet, since the operator checks the
node and TokenReview results are cached per token anyway. So the fleet's per-node
GPU-time objects (one ConfigMap per node and window, written at up to 16 at a time) are 4
here, not one per agent as in a real fleet.

The usage is for pods that exist: each run creates its 200 InferenceDeployments (one
replica each, run by kwok on the four 64-GPU nodes, made by the operator under test) and
every agent claims usage for pods on its own node, as the ledger requires (usage for a
pod it does not see on the reporting node waits, then goes to dead letters). The tables
say how many series the operator refused: 0, or the run measured something else.

    .venv/bin/python bench/ingestion.py --ledger-agents 1000,4000 --fleets "" --rounds 5
    mkdir /tmp/payper-before && git archive 766006d operator | tar -x -C /tmp/payper-before
    .venv/bin/python bench/ingestion.py --ledger-agents "" --fleets 1000,2000 --rounds 6 \
        --baseline /tmp/payper-before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from payper.api.usage import UsageReport
from payper.billing.config import BillingConfig
from payper.billing.events import BillingEvents
from payper.billing.ledger import Ledger
from payper.kube import Kube
from payper.observed import PodView
from payper.operator.state import Registry
from payper_dev.cluster import binaries
from payper_dev.cluster.local import ClusterConfig
from payper_dev.loopback import get_text
from payper_dev.testing.cluster import ClusterHandle, eventually, local_cluster
from payper_dev.testing.stack import (
    CHART,
    SYSTEM_NAMESPACE,
    Stack,
    StackOptions,
    inference_deployment,
    scraped_sum,
)

CRDS = Path(__file__).resolve().parents[1] / "crds"
DEPLOYMENTS = 200
SERIES = 32
REPORT_EVERY_S = 10
FLUSH_INTERVAL_S = 10.0
GPUS_PER_NODE = 64
NODES = tuple(f"gpu-node-{index}" for index in range(4))
"""Four kwok GPU nodes of 64 GPUs: room for the 200 deployments' pods, one GPU each."""
MAX_BATCH = 100
AGENT_TIMEOUT_S = 30.0
"""payper_agent's sender: a request unanswered for 30 s is sent again after a backoff."""
GOAL_P99_INTERVALS = 2.0
BEFORE = 0
"""The concurrency of an end-to-end run of the code before (``--baseline``)."""


def label(concurrency: int) -> str:
    return "before" if concurrency == BEFORE else str(concurrency)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


async def record_writes(kube: Kube) -> tuple[float, float]:
    """The API server's count of writes to BillingRecords so far, and the seconds it
    spent on them (its own request duration histogram)."""
    text = await kube.request("GET", "/metrics")
    count, seconds = 0.0, 0.0
    for line in str(text).splitlines():
        if 'resource="billingrecords"' not in line or not re.search(
            r'verb="(PUT|POST|PATCH)"', line
        ):
            continue
        if line.startswith("apiserver_request_total{"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith("apiserver_request_duration_seconds_sum{"):
            seconds += float(line.rsplit(" ", 1)[1])
    return count, seconds


def flush_totals(metrics_url: str) -> tuple[float, float]:
    """(sum of flush durations in s, number of flushes) from the operator's histogram."""
    text = get_text(metrics_url) or ""
    found = {
        name: float(value)
        for name, value in re.findall(
            r"^payper_billing_flush_duration_seconds_(sum|count) (\S+)$", text, re.M
        )
    }
    return found.get("sum", 0.0), found.get("count", 0.0)


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@dataclass(frozen=True)
class ModelPod:
    namespace: str
    deployment: str
    name: str
    uid: str
    node: str


def deploy_models(handle: ClusterHandle, namespace: str) -> list[dict[str, Any]]:
    """The 200 InferenceDeployments of a run, one replica each (kwok runs the pods: no
    model server), and their pods once the operator made them and the scheduler placed
    them. Agents claim usage for these pods, each on its own node: the ledger bills usage
    only for a pod it sees on the reporting node, through its owner chain (ReplicaSet,
    Deployment, InferenceDeployment); anything else waits, then goes to dead letters."""
    models = []
    for d in range(DEPLOYMENTS):
        model = inference_deployment(f"d{d}", min_replicas=1, max_replicas=1, runner=False)
        model["metadata"]["namespace"] = namespace
        models.append(model)
    handle.apply_items(models, timeout=120)

    def placed() -> list[dict[str, Any]]:
        pods = [
            pod
            for pod in handle.get_json("pods", "-n", namespace)["items"]
            if pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp")
        ]
        return pods if len(pods) == DEPLOYMENTS else []

    return eventually(placed, 300, 2, f"{DEPLOYMENTS} model pods placed in {namespace}")


def model_pods(pods: list[dict[str, Any]]) -> dict[str, list[ModelPod]]:
    """The deployments' pods by node."""
    by_node: dict[str, list[ModelPod]] = {node: [] for node in NODES}
    for pod in pods:
        view = PodView.from_object(pod)
        assert view.deployment is not None and view.node is not None, view
        by_node[view.node].append(
            ModelPod(view.namespace, view.deployment, view.name, view.uid, view.node)
        )
    return by_node


def remove_models(handle: ClusterHandle, namespace: str) -> None:
    """A run's deployments and pods go (their GPUs are the next run's): its records stay."""
    handle.kubectl("delete", "inferencedeployments", "--all", "-n", namespace, timeout=120)
    eventually(
        lambda: not handle.get_json("pods", "-n", namespace)["items"],
        300,
        2,
        f"{namespace}'s pods gone",
    )


def agent_series(rng: random.Random, pods: list[ModelPod], node: str) -> list[dict[str, Any]]:
    """One agent's 32 series: pods of its node (another deployment each, as long as the
    node has enough), each series on a GPU of its own."""
    order = rng.sample(pods, len(pods))
    return [
        {
            "namespace": pod.namespace,
            "pod": pod.name,
            "podUid": pod.uid,
            "container": "server",
            "gpu": f"GPU-{node}-{s}",
            "gpuProduct": "NVIDIA H100 80GB HBM3",
            "inferenceDeployment": pod.deployment,
            "activeUs": 1_234_567,
            "roundedMs": {"1ms": 1235, "1s": 2000, "1m": 60000},
            "bursts": 1,
        }
        for s, pod in ((s, order[s % len(order)]) for s in range(SERIES))
    ]


@dataclass
class FleetResult:
    lags: list[float] = field(default_factory=list)
    """Per measured report: cut -> acknowledged, in seconds."""
    send_delays: list[float] = field(default_factory=list)
    """Per measured report: cut -> first sent (the load process's own delay included)."""
    unacked: int = 0
    errors: int = 0


async def fleet(
    url: str,
    tokens: dict[str, str],
    agents: int,
    rounds: int,
    namespace: str,
    pods: dict[str, list[ModelPod]],
    first_cut: float,
    drain_s: float,
) -> FleetResult:
    """The fleet's reports from the boundary ``first_cut`` (epoch s) on."""
    rng = random.Random(agents)
    result = FleetResult()
    deadline = first_cut + (rounds - 1) * REPORT_EVERY_S + drain_s

    async def agent(index: int, session: aiohttp.ClientSession) -> None:
        node = NODES[index % len(NODES)]
        agent_id = f"bench-{namespace}-{index}"
        phase = rng.uniform(0, 1)  # when in each second this agent polls
        series = agent_series(rng, pods[node], node)
        pending: list[tuple[int, float]] = []  # (sequence, cut at), oldest first
        sent: set[int] = set()
        cut = 0
        failures = 0
        while True:
            now = time.time()
            while cut < rounds and first_cut + cut * REPORT_EVERY_S + phase <= now:
                cut += 1
                pending.append((cut, first_cut + (cut - 1) * REPORT_EVERY_S + phase))
            if not pending:
                if cut >= rounds:
                    return
                await asyncio.sleep(first_cut + cut * REPORT_EVERY_S + phase - now)
                continue
            if now > deadline:
                result.unacked += len(pending)
                return
            batch = pending[:MAX_BATCH]
            for sequence, cut_at in batch:
                if sequence not in sent and sequence > 1:
                    result.send_delays.append(now - cut_at)
                sent.add(sequence)
            reports = [
                {
                    "agentId": agent_id,
                    "sequence": sequence,
                    "node": node,
                    "intervalStartMs": int(cut_at - phase - REPORT_EVERY_S) * 1000,
                    "intervalEndMs": int(cut_at - phase) * 1000,
                    "series": series,
                }
                for sequence, cut_at in batch
            ]
            try:
                async with session.post(
                    url + "/v1/usage",
                    timeout=aiohttp.ClientTimeout(total=AGENT_TIMEOUT_S),
                    data=json.dumps({"reports": reports}),
                    headers={
                        "Authorization": f"Bearer {tokens[node]}",
                        "Content-Type": "application/json",
                    },
                ) as response:
                    body = await response.json()
                acked = int(body.get("acked", {}).get(agent_id, 0))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                result.errors += 1
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 16)) * rng.uniform(0.5, 1.0)
                await asyncio.sleep(delay)  # as payper_agent's sender backs off
                continue
            failures = 0
            answered = time.time()
            for sequence, cut_at in pending:
                if sequence <= acked and sequence > 1:  # round 1 is warm-up
                    result.lags.append(answered - cut_at)
            pending = [(s, c) for s, c in pending if s > acked]

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(agent(i, session) for i in range(agents)))
    return result


@dataclass
class Run:
    agents: int
    concurrency: int
    result: FleetResult
    cpu_share: float
    rss_mib: float
    writes_per_s: float
    write_ms: float
    """Mean time the API server spent on one record write (its own histogram)."""
    flush_mean_s: float
    flushes: int
    refused: float
    """Series the operator refused (pod not seen on the reporting node): must be 0, or
    the run measured dead letters instead of record writes."""


def install_records_policy(handle: ClusterHandle) -> None:
    """The chart's admission policy: only the operator writes records (CEL per write)."""
    rendered = subprocess.run(
        [
            binaries.binary("helm"),
            "template",
            "payper",
            str(CHART),
            "-n",
            SYSTEM_NAMESPACE,
            "--set",
            "fullnameOverride=payper",
            "--show-only=templates/records-admission-policy.yaml",
            "--show-only=templates/records-admission-policy-binding.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    handle.apply_items([doc for doc in yaml.safe_load_all(rendered) if doc])


@dataclass
class LedgerRun:
    agents: int
    concurrency: int
    flushes: list[float]
    """Seconds per measured flush."""
    ledger_cpu: list[float]
    """CPU seconds of the ledger (this process) per measured flush."""
    write_ms: float
    records: int
    control_plane_cpu_ms: float
    """kube-apiserver + etcd CPU per record write (everything they did meanwhile)."""


def fresh_progress(handle: ClusterHandle) -> None:
    """Every run starts with no progress and no per-node GPU time objects."""
    handle.kubectl(
        "delete", "configmap/payper-usage-ledger", "-n", SYSTEM_NAMESPACE, "--ignore-not-found"
    )
    handle.kubectl(
        "delete", "configmap", "-n", SYSTEM_NAMESPACE, "-l", "payper.dev/gpu-time=node-window"
    )


def control_plane_cpu(cluster_dir: Path) -> float:
    """CPU seconds used so far by the local cluster's kube-apiserver and etcd."""
    pids = json.loads((cluster_dir / "state.json").read_text())["pids"]
    return sum(cpu_seconds(int(pids[name])) for name in ("kube-apiserver", "etcd"))


def measure_ledger(
    handle: ClusterHandle,
    cluster_dir: Path,
    stack: Stack,
    agents: int,
    concurrency: int,
    namespace: str,
    rounds: int,
) -> LedgerRun:
    """The ledger alone, in this process pinned to CPU 1, as the operator's ServiceAccount:
    each round, every agent's report is submitted, then one flush is timed. The
    deployments' pods are made by an operator that is stopped before the ledger runs; the
    ledger's view of them is what the operator's pod watch would have given it."""
    handle.kubectl("create", "namespace", namespace)
    fresh_progress(handle)
    operator = stack.start_operator()
    try:
        listed = deploy_models(handle, namespace)
    finally:
        operator.stop()
    pods = model_pods(listed)
    registry = Registry()
    for pod in listed:
        view = PodView.from_object(pod)
        registry.observe_pod(view, (view.namespace, view.deployment or ""), deleted=False)
    rng = random.Random(agents)
    templates = [
        UsageReport.model_validate(
            {
                "agentId": f"bench-{namespace}-{index}",
                "sequence": 1,
                "node": NODES[index % len(NODES)],
                "intervalStartMs": 0,
                "intervalEndMs": 0,
                "series": agent_series(
                    rng, pods[NODES[index % len(NODES)]], NODES[index % len(NODES)]
                ),
            }
        )
        for index in range(agents)
    ]
    config = BillingConfig(
        flush_interval_seconds=FLUSH_INTERVAL_S, record_write_concurrency=concurrency
    )

    kubeconfig = stack.kubeconfig_of("payper-operator")

    async def run() -> LedgerRun:
        flushes: list[float] = []
        ledger_cpu: list[float] = []
        async with Kube.connect(kubeconfig) as kube, handle.kube() as admin:
            writes0, cpu0 = (0.0, 0.0), 0.0
            ledger = Ledger(kube, config, SYSTEM_NAMESPACE, registry, BillingEvents())
            await ledger.load()
            for sequence in range(1, rounds + 1):
                if sequence == 2:
                    writes0 = await record_writes(admin)
                    cpu0 = control_plane_cpu(cluster_dir)
                end_ms = int(time.time()) // REPORT_EVERY_S * REPORT_EVERY_S * 1000
                update = {
                    "sequence": sequence,
                    "interval_start_ms": end_ms - REPORT_EVERY_S * 1000,
                    "interval_end_ms": end_ms,
                }
                waiting = [
                    asyncio.ensure_future(ledger.submit([t.model_copy(update=update)]))
                    for t in templates
                ]
                await asyncio.sleep(0)  # every report queued
                started, cpu = time.perf_counter(), time.process_time()
                await ledger.flush()
                took, cpu = time.perf_counter() - started, time.process_time() - cpu
                acked = [await w for w in waiting]
                missing = sum(
                    1
                    for t, a in zip(templates, acked, strict=True)
                    if a.acked[t.agent_id] < sequence
                )
                print(
                    f"  flush {sequence}: {took:.2f} s ({cpu:.2f} s CPU), {missing} unacknowledged",
                    flush=True,
                )
                if sequence > 1:  # the first creates the records
                    flushes.append(took)
                    ledger_cpu.append(cpu)
            writes1 = await record_writes(admin)
            cpu1 = control_plane_cpu(cluster_dir)
        count = writes1[0] - writes0[0]
        records = sum(1 for key in ledger.store.records if key[0] == namespace)
        return LedgerRun(
            agents,
            concurrency,
            flushes,
            ledger_cpu,
            (writes1[1] - writes0[1]) / max(1.0, count) * 1000,
            records,
            (cpu1 - cpu0) / max(1.0, count) * 1000,
        )

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {1})
    try:
        return asyncio.run(run())
    finally:
        os.sched_setaffinity(0, before)
        remove_models(handle, namespace)


def measure(
    handle: ClusterHandle,
    stack: Stack,
    tokens: dict[str, str],
    agents: int,
    concurrency: int,
    namespace: str,
    args: argparse.Namespace,
) -> Run:
    handle.kubectl("create", "namespace", namespace)
    fresh_progress(handle)
    billing: dict[str, Any] = {"flushIntervalSeconds": FLUSH_INTERVAL_S}
    environment = dict(os.environ)
    # The code before runs with its own CRDs where its tree has them (``git archive REV
    # operator crds``): a record's schema is part of what a write costs.
    crds = Path(args.baseline or "") / "crds"
    wanted = crds if concurrency == BEFORE and crds.is_dir() else CRDS
    if wanted != args.installed_crds:  # replaced only on a switch: the API server
        handle.kubectl("replace", "-f", str(wanted))  # re-initialises the resource's storage
        args.installed_crds = wanted
        eventually(  # until it serves the resources again (429 meanwhile)
            lambda: handle.kubectl("get", "billingrecords", "-A", check=False).returncode == 0,
            120,
            0.5,
            "BillingRecords served after the CRD replace",
        )
    if concurrency == BEFORE:  # the code before: its own operator package, no such setting
        os.environ["PYTHONPATH"] = str(Path(args.baseline).resolve() / "operator")
    else:
        billing["recordWriteConcurrency"] = concurrency
    stack.options.operator_extra = {"billing": billing}
    try:
        operator = stack.start_operator()
    finally:
        os.environ.clear()
        os.environ.update(environment)
    assert operator.popen is not None
    pid = operator.popen.pid
    subprocess.run(["taskset", "-acp", "1", str(pid)], check=True, capture_output=True)
    try:
        pods = model_pods(deploy_models(handle, namespace))
    except BaseException:
        operator.stop()
        raise

    async def run() -> Run:
        first_cut = (int(time.time()) // REPORT_EVERY_S + 2) * REPORT_EVERY_S  # a boundary
        async with handle.kube() as kube:
            load = asyncio.create_task(
                fleet(
                    stack.operator_url,
                    tokens,
                    agents,
                    args.rounds,
                    namespace,
                    pods,
                    first_cut,
                    args.drain,
                )
            )
            # Measure from the second round's cut (the first round's records exist by then).
            await asyncio.sleep(max(0.0, first_cut + REPORT_EVERY_S - time.time()))
            cpu0, writes0, t0 = cpu_seconds(pid), await record_writes(kube), time.monotonic()
            flush0 = flush_totals(stack.metrics_url)
            result = await load
            cpu1, writes1, t1 = cpu_seconds(pid), await record_writes(kube), time.monotonic()
            flush1 = flush_totals(stack.metrics_url)
        elapsed = t1 - t0
        flushes = flush1[1] - flush0[1]
        return Run(
            agents,
            concurrency,
            result,
            (cpu1 - cpu0) / elapsed,
            rss_mib(pid),
            (writes1[0] - writes0[0]) / elapsed,
            (writes1[1] - writes0[1]) / max(1.0, writes1[0] - writes0[0]) * 1000,
            (flush1[0] - flush0[0]) / flushes if flushes else float("nan"),
            int(flushes),
            scraped_sum(stack.metrics_url, "payper_usage_series_refused_total"),
        )

    try:
        return asyncio.run(run())
    finally:
        operator.stop()
        remove_models(handle, namespace)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fleets", default="1000,4000", help="end to end, over HTTP")
    parser.add_argument(
        "--ledger-agents", default="4000", help="the ledger alone: agents' reports per flush"
    )
    parser.add_argument("--concurrency", default="1,16", help="record write concurrencies")
    parser.add_argument(
        "--baseline",
        help="a tree holding the code before's operator/ (git archive COMMIT operator): "
        "end-to-end runs of its operator come first, labelled 'before'",
    )
    parser.add_argument("--rounds", type=int, default=6, help="report rounds (first: warm-up)")
    parser.add_argument("--drain", type=float, default=40, help="s after the last cut")
    args = parser.parse_args()
    runs: list[Run] = []
    ledger_runs: list[LedgerRun] = []
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    args.installed_crds = CRDS
    config = ClusterConfig(
        pod_cidr="127.10.0.0/16",
        crds_dir=str(CRDS),
        gpu_nodes=len(NODES),
        gpus_per_node=GPUS_PER_NODE,
    )
    with (
        tempfile.TemporaryDirectory(prefix="payper-bench-usage-") as scratch,
        local_cluster(Path(scratch) / "cluster", config) as handle,
    ):
        stack = Stack(handle, Path(scratch) / "stack", StackOptions())
        stack.ensure_system()
        install_records_policy(handle)
        tokens = {node: stack.agent_token_file(node).read_text() for node in NODES}
        index = 0
        for size in [int(x) for x in args.ledger_agents.split(",") if x]:
            for concurrency in concurrencies:
                index += 1
                print(f"ledger alone {index}: {size} agents' reports, concurrency {concurrency}")
                ledger_runs.append(
                    measure_ledger(
                        handle,
                        Path(scratch) / "cluster",
                        stack,
                        size,
                        concurrency,
                        f"bench-usage-{index}",
                        args.rounds,
                    )
                )
        for size in [int(x) for x in args.fleets.split(",") if x]:
            for concurrency in ([BEFORE] if args.baseline else []) + concurrencies:
                index += 1
                namespace = f"bench-usage-{index}"
                print(f"run {index}: {size} agents, record write concurrency {label(concurrency)}")
                run = measure(handle, stack, tokens, size, concurrency, namespace, args)
                runs.append(run)
                print(f"  ack p99 {percentile(run.result.lags, 0.99):.2f} s", flush=True)
    if ledger_runs:
        print(
            f"the ledger alone (no HTTP; pinned to CPU 1): one report of {SERIES} series per "
            f"agent per flush over {DEPLOYMENTS} deployments, {args.rounds - 1} measured flushes"
        )
        print(
            "agents  writes at once  records  flush mean s  flush max s  mean/interval  "
            "ledger CPU s  records/s  API ms/write  apiserver+etcd CPU ms/write"
        )
        for lr in ledger_runs:
            mean = statistics.mean(lr.flushes)
            print(
                f"{lr.agents:>6}  {lr.concurrency:>14}  {lr.records:>7}  {mean:>12.2f}  "
                f"{max(lr.flushes):>11.2f}  {mean / FLUSH_INTERVAL_S:>13.2f}  "
                f"{statistics.mean(lr.ledger_cpu):>12.2f}  {lr.records / mean:>9.1f}  "
                f"{lr.write_ms:>12.1f}  {lr.control_plane_cpu_ms:>27.1f}"
            )
        for size in sorted({lr.agents for lr in ledger_runs}):
            same_size = [lr for lr in ledger_runs if lr.agents == size]
            base_run = next((lr for lr in same_size if lr.concurrency == 1), None)
            for lr in same_size:
                if base_run is not None and lr is not base_run:
                    ratio = statistics.mean(lr.flushes) / statistics.mean(base_run.flushes)
                    print(f"{size} agents, concurrency {lr.concurrency} vs 1: flush {ratio:.2f}x")
    if not runs:
        return
    print(
        f"fleet: agents x {SERIES} series every {REPORT_EVERY_S} s over {DEPLOYMENTS} "
        f"deployments ({DEPLOYMENTS} records per flush), flush every {FLUSH_INTERVAL_S:.0f} s; "
        f"{args.rounds - 1} measured rounds after one of warm-up"
    )
    print(
        "agents  writes at once  ack p50 s  ack p99 s  ack max s  p99/interval  "
        "send delay p99 s  flush mean s  flushes  cpu(1 core)  RSS MiB  record writes/s  "
        "API ms/write  unacked  errors  refused series"
    )
    for run in runs:
        r = run.result
        p99 = percentile(r.lags, 0.99)
        print(
            f"{run.agents:>6}  {label(run.concurrency):>14}  {statistics.median(r.lags):>9.2f}  "
            f"{p99:>9.2f}  {max(r.lags):>9.2f}  {p99 / FLUSH_INTERVAL_S:>12.2f}  "
            f"{percentile(r.send_delays, 0.99):>16.2f}  {run.flush_mean_s:>12.2f}  "
            f"{run.flushes:>7}  {run.cpu_share * 100:>10.0f}%  {run.rss_mib:>7.0f}  "
            f"{run.writes_per_s:>15.1f}  {run.write_ms:>12.1f}  {r.unacked:>7}  {r.errors:>6}  "
            f"{run.refused:>14.0f}"
        )
    for size in sorted({run.agents for run in runs}):
        of_size = [run for run in runs if run.agents == size]
        base = next((run for run in of_size if run.concurrency in (BEFORE, 1)), None)
        for run in of_size:
            if base is None or run is base:
                continue
            print(
                f"{size} agents, {label(run.concurrency)} vs {label(base.concurrency)}: ack p99 "
                f"{percentile(run.result.lags, 0.99) / percentile(base.result.lags, 0.99):.2f}x, "
                f"flush mean {run.flush_mean_s / base.flush_mean_s:.2f}x"
            )
    print(
        f"goal: at 4000 agents, acknowledgements within {GOAL_P99_INTERVALS:.0f} flush "
        f"intervals (p99 <= {GOAL_P99_INTERVALS * FLUSH_INTERVAL_S:.0f} s)"
    )


if __name__ == "__main__":
    main()
