"""``make demo``: Payper end to end on a local cluster, narrated.

Brings up the local cluster with fake GPU nodes, installs the CRDs, starts the operator,
the gateway, the pod runner (real stand-in model servers on pod IPs) and one simulated
agent per GPU node; creates InferenceDeployments for two tenants and drives traffic with
idle gaps through the gateway: cold starts, a burst that scales out, a streamed response,
scale to zero. Then it prints the deployments and bills, the invoice with the
granularity comparison and the saving against reserved GPUs, and draws a PNG of GPU
activity against billed time per tenant.

Everything stops at the end, unless ``--keep``: then it says how to reach the gateway and
Prometheus and how to stop it all (``make demo-down``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from payper_dev.cluster import binaries
from payper_dev.cluster.local import ClusterConfig, LocalCluster
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import Stack, StackOptions, inference_deployment

DEMO_DIR = Path("build/demo")
CLUSTER_DIR = Path("build/demo/cluster")
POD_CIDR = "127.12.0.0/16"
KEEP_FILE = DEMO_DIR / "keep.json"
TENANTS = {"team-vision": "resnet", "team-llm": "chat"}
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", flush=True)


def deployments() -> list[dict[str, Any]]:
    vision = inference_deployment(
        "resnet",
        max_replicas=3,
        target_concurrency=2,
        idle_timeout_s=15,
        scale_down_delay_s=5,
        cold_start="2500ms",
    )
    vision["metadata"]["namespace"] = "team-vision"
    chat = inference_deployment(
        "chat",
        max_replicas=2,
        target_concurrency=4,
        idle_timeout_s=30,
        scale_down_delay_s=5,
        cold_start="4s",
    )
    chat["metadata"]["namespace"] = "team-llm"
    return [vision, chat]


async def infer(
    http: aiohttp.ClientSession, stack: Stack, namespace: str, name: str, ms: int
) -> tuple[int, dict[str, str]]:
    async with http.post(
        f"{stack.gateway_url}/{namespace}/{name}/v1/infer", json={"ms": ms}
    ) as response:
        await response.read()
        return response.status, dict(response.headers)


PHASE_NAMES = {
    "create": "pod created",
    "schedule": "scheduled",
    "image": "image pulled",
    "start": "containers started",
    "ready": "Ready",
    "forward": "forwarded",
}


def cold_start_phases(cluster: ClusterHandle, namespace: str, name: str) -> str:
    """The last cold start's phases, once the operator has them all (a few seconds)."""

    def phases() -> dict[str, int] | None:
        out = cluster.kubectl(
            "get", "infd", name, "-n", namespace, "-o", "jsonpath={.status.lastColdStart}",
            check=False,
        )  # fmt: skip
        try:
            cold = json.loads(out.stdout) if out.stdout else {}
        except ValueError:
            return None
        measured = cold.get("phasesMs") or {}
        return measured if "forward" in measured else None

    try:
        measured = eventually(phases, 15, 0.2, "the cold start's phases")
    except AssertionError:
        return "not reported yet"
    parts = [
        f"{label} +{measured[phase]} ms" if phase in measured else f"{label} (not measured here)"
        for phase, label in PHASE_NAMES.items()
    ]
    return " -> ".join(parts)


def replicas(cluster: ClusterHandle, namespace: str, name: str) -> int:
    out = cluster.kubectl(
        "get", "deployment", name, "-n", namespace, "-o", "jsonpath={.spec.replicas}", check=False
    )
    return int(out.stdout or 0)


async def traffic(stack: Stack) -> None:
    cluster = stack.cluster
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        say("team-vision sends its first request: resnet is at zero replicas, the gateway holds it")
        status, headers = await infer(http, stack, "team-vision", "resnet", 150)
        say(
            f"  answered {status} after a cold start of {headers.get('X-Payper-Cold-Start-Ms')} ms "
            f"(X-Payper-Cold-Start-Ms); the cold start is not billed"
        )
        phases = await asyncio.to_thread(cold_start_phases, cluster, "team-vision", "resnet")
        say(f"  where it went (status.lastColdStart): {phases}")

        say("team-vision bursts: 3 waves of 8 concurrent 700 ms inferences")
        for wave in range(3):
            results = await asyncio.gather(
                *(infer(http, stack, "team-vision", "resnet", 700) for _ in range(8))
            )
            say(
                f"  wave {wave + 1}: {sum(1 for s, _ in results if s == 200)}/8 OK, "
                f"resnet now asks for {replicas(cluster, 'team-vision', 'resnet')} replicas"
            )

        say("team-llm streams a chat completion (tokens arrive as they are produced)")
        started = time.monotonic()
        async with http.post(
            f"{stack.gateway_url}/team-llm/chat/v1/chat/completions",
            json={"stream": True, "max_tokens": 12, "token_ms": 150},
        ) as response:
            first: float | None = None
            tokens = 0
            async for line in response.content:
                if line.startswith(b"data: {"):
                    tokens += 1
                    first = first or time.monotonic() - started
            say(
                f"  {tokens} tokens; first after {first or 0:.1f}s (cold start included), "
                f"all after {time.monotonic() - started:.1f}s; cold start "
                f"{response.headers.get('X-Payper-Cold-Start-Ms')} ms"
            )

        say("team-llm keeps a light load for 12 s while team-vision goes idle")
        until = time.monotonic() + 12
        while time.monotonic() < until:
            await infer(http, stack, "team-llm", "chat", 400)
            await asyncio.sleep(1.0)

        say("both tenants idle: provisioned GPUs now sit idle, and that time is not billed")
        for _ in range(40):
            if replicas(cluster, "team-vision", "resnet") == 0:
                break
            await asyncio.sleep(1)
        say(
            f"  resnet scaled to zero (idleTimeoutSeconds=15): "
            f"{replicas(cluster, 'team-vision', 'resnet')} replicas"
        )

        say("team-vision comes back with one more request: another cold start")
        status, headers = await infer(http, stack, "team-vision", "resnet", 300)
        say(f"  answered {status}, cold start {headers.get('X-Payper-Cold-Start-Ms')} ms")


def chart(stack: Stack, out: Path) -> Path:
    """GPU activity (what ran) against provisioned and billed time, per tenant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = stack.cluster.get_json("brec", "-A")["items"]
    busy: dict[str, list[tuple[int, int]]] = {ns: [] for ns in TENANTS}
    for path in stack.sim_dir.glob("*.busy"):
        identity = json.loads(path.with_suffix(".json").read_text())
        namespace = identity["pod"]["namespace"]
        if namespace in busy:
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2:
                    busy[namespace].append((int(parts[0]), int(parts[1])))
    origin = min((s for spans in busy.values() for s, _ in spans), default=0)
    figure, axes = plt.subplots(
        len(TENANTS), 2, figsize=(13, 3.2 * len(TENANTS)), gridspec_kw={"width_ratios": [3, 1.4]}
    )
    for row, (namespace, name) in enumerate(TENANTS.items()):
        timeline, bars = axes[row]
        own = [r for r in records if r["metadata"]["namespace"] == namespace]
        for record in own:
            for pod in record["status"].get("podIntervals", []):
                timeline.broken_barh(
                    [((pod["startMs"] - origin) / 1000, (pod["endMs"] - pod["startMs"]) / 1000)],
                    (0.55, 0.35),
                    color="#d9d9d9",
                )
        spans = [((s - origin) / 1000, (e - s) / 1000) for s, e in busy[namespace]]
        timeline.broken_barh(spans, (0.1, 0.35), color="#2a7ab9")
        timeline.set_yticks(
            [0.275, 0.725], ["kernels running\n(billed)", "GPU provisioned\n(pod alive)"]
        )
        timeline.set_xlabel("seconds since the first kernel ran")
        timeline.set_title(f"{namespace}/{name}: GPU activity")
        status = [r["status"] for r in own]
        active = sum(s.get("activeMs", 0) for s in status) / 1000
        provisioned = sum(s.get("provisionedMs", 0) for s in status) / 1000
        rounded = {
            g: sum(s.get("roundedMs", {}).get(g, 0) for s in status) / 1000
            for g in ("1ms", "1s", "1m")
        }
        labels = ["active", "billed\nper ms", "billed\nper s", "billed\nper min", "provisioned"]
        values = [active, rounded["1ms"], rounded["1s"], rounded["1m"], provisioned]
        bars.bar(labels, values, color=["#2a7ab9", "#4caf50", "#4caf50", "#ff9800", "#bdbdbd"])
        bars.set_ylabel("GPU-seconds")
        bars.set_title("what each way of billing charges")
        for index, value in enumerate(values):
            bars.annotate(f"{value:.1f}", (index, value), ha="center", va="bottom", fontsize=8)
    figure.suptitle("Payper: pay only while kernels run")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def run(keep: bool) -> int:
    if KEEP_FILE.exists():
        print("a kept demo is still running: `make demo-down` first", file=sys.stderr)
        return 1
    say("building the cluster binaries if needed (the first time takes minutes)")
    binaries.build()
    shutil.rmtree(DEMO_DIR / "stack", ignore_errors=True)
    cluster = LocalCluster(CLUSTER_DIR)
    say("starting the local cluster: etcd, kube-apiserver, controller-manager, scheduler, kwok")
    kubeconfig = cluster.up(ClusterConfig(pod_cidr=POD_CIDR, cold_start_ms=3000, crds_dir="crds"))
    handle = ClusterHandle(kubeconfig, POD_CIDR, 3000)
    stack: Stack | None = None
    prometheus = None
    try:
        ready_s = cluster.timings.get("nodes ready", 0)
        say(f"cluster ready ({ready_s:.1f}s): 2 GPU nodes x 8 H100, 1 CPU node")
        say("CRDs served; starting payper-operator, payper-gateway, the pod runner, 2 agents")
        stack = Stack(
            handle,
            DEMO_DIR / "stack",
            StackOptions(
                agents=True,
                runner_process=True,
                operator_extra={"billing": {"flushIntervalSeconds": 2}},
            ),
        )
        stack.start()
        if shutil.which("prometheus"):
            from payper_dev.testing.prometheus import Prometheus

            prometheus = Prometheus(
                DEMO_DIR / "prometheus", stack.scrape_targets(), interval_s=2
            ).start()
        for namespace in TENANTS:
            handle.kubectl("create", "namespace", namespace, check=False)
        handle.apply_items(deployments())
        handle.kubectl(
            "wait", "infd", "--all", "-A", "--for=condition=ScaledToZero", "--timeout=60s"
        )
        say("two tenants' InferenceDeployments, both scaled to zero:")
        print(handle.kubectl("get", "infd", "-A").stdout, flush=True)
        asyncio.run(traffic(stack))
        say("waiting for the agents' last reports to reach the ledger")
        say("per-minute bursts end only after a minute of idleness: waiting for them too")
        asyncio.run(stack.settle(limit_s=120, idle_ms=60_000))
        print(handle.kubectl("get", "infd,brec", "-A").stdout, flush=True)
        bill = subprocess.run(
            [sys.executable, "-m", "payper.cli", "bill", "-A"],
            capture_output=True,
            text=True,
            env=handle.env(),
            check=True,
        )
        say("the invoice (payper bill -A):")
        print(bill.stdout, flush=True)
        png = chart(stack, DEMO_DIR / "gpu-activity-vs-billed.png")
        say(f"chart of GPU activity vs billed time per tenant: {png.resolve()}")
        if keep:
            processes = [p.popen.pid for p in stack.processes() if p.popen]
            if prometheus and prometheus.process and prometheus.process.popen:
                processes.append(prometheus.process.popen.pid)
            KEEP_FILE.write_text(json.dumps({"pids": processes}))
            print(
                f"\nKept running (stop it all with `make demo-down`):\n"
                f"  export KUBECONFIG={kubeconfig}\n"
                f"  gateway:    {stack.gateway_url}/team-llm/chat/v1/infer\n"
                "              (or /v1/infer with Host: chat.team-llm.payper.local)\n"
                f"  operator:   {stack.metrics_url}\n"
                + (
                    f"  prometheus: {prometheus.url}\n"
                    if prometheus
                    else "  (install Debian's prometheus for a Prometheus too)\n"
                ),
                flush=True,
            )
            stack = None
            prometheus = None
            return 0
    finally:
        if prometheus is not None:
            prometheus.stop()
        if stack is not None:
            stack.stop()
            cluster.down()
    say("done; everything is stopped")
    return 0


def down() -> int:
    if KEEP_FILE.exists():
        for pid in json.loads(KEEP_FILE.read_text())["pids"]:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        time.sleep(2)
        KEEP_FILE.unlink()
    LocalCluster(CLUSTER_DIR).down()
    print("demo stopped")
    return 0
