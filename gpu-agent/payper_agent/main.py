"""payper-agent: ``run`` meters this node's GPUs; ``replay SCENARIO.json`` audits a bill.

``run`` needs ``hostPID`` (NVML reports host PIDs, which are mapped to containers through
``/proc/<pid>/cgroup``), NVML access, a state directory on the host (reports survive
restarts) and its projected ServiceAccount token for the operator's usage endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from payper import http_sites
from payper.identity import TokenFile
from payper_agent import metrics, replay
from payper_agent.agent import Agent, AgentSettings
from payper_agent.backends import Backend
from payper_agent.pods import PidResolver, PodIndex
from payper_agent.sender import Sender
from payper_agent.store import claim_state_dir

logger = logging.getLogger("payper.agent")


def _duration_s(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if value[-1] in units:
            return int(value[:-1]) * units[value[-1]]
        return int(value)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a duration like 90s, 30m, 24h"
        ) from None


def parse_run(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="payper-agent run", description=__doc__)
    parser.add_argument("--node", default=os.environ.get("NODE_NAME"), help="this node's name")
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/payper-agent"))
    parser.add_argument("--operator-url", default=os.environ.get("PAYPER_OPERATOR_URL"))
    parser.add_argument("--operator-ca", help="CA bundle for the operator's TLS certificate")
    parser.add_argument(
        "--token-file",
        default=os.environ.get("PAYPER_TOKEN_FILE", "/var/run/secrets/payper/token"),
    )
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--report-interval", type=int, default=10, help="seconds")
    parser.add_argument("--retention", type=_duration_s, default=24 * 3600, help="e.g. 24h")
    parser.add_argument("--listen", default="0.0.0.0:9400", help="/metrics, /healthz, /readyz")
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--backend", choices=("nvml", "simulated"), default="nvml")
    parser.add_argument(
        "--nvml-api",
        choices=("process-utilization", "processes-utilization-info"),
        default="process-utilization",
        help="preferred per-process call (the other is the fallback)",
    )
    parser.add_argument("--sim-dir", type=Path, help="simulated: where model servers publish")
    parser.add_argument("--sim-gpus", type=int, default=8, help="simulated: GPUs on this node")
    parser.add_argument("--sim-product", default="NVIDIA H100 80GB HBM3")
    parser.add_argument(
        "--sim-cgroups",
        choices=("published", "proc"),
        default="published",
        help="simulated: each process's cgroup made from its published pod (kwok nodes), "
        "or read from /proc/<pid>/cgroup (a real node's containers)",
    )
    parser.add_argument("--log-level", default=os.environ.get("PAYPER_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    if not args.node:
        parser.error("--node (or NODE_NAME) is required")
    if not args.operator_url:
        parser.error("--operator-url (or PAYPER_OPERATOR_URL) is required")
    if args.backend == "simulated" and args.sim_dir is None:
        parser.error("--backend simulated needs --sim-dir")
    if not 0.05 <= args.poll_interval <= 60:
        parser.error("--poll-interval must be between 0.05 and 60 seconds")
    if not 1 <= args.report_interval <= 3600 or 3600 % args.report_interval:
        parser.error("--report-interval must divide an hour (1..3600 seconds)")
    return args


def make_backend(args: argparse.Namespace) -> Backend:
    if args.backend == "simulated":
        from payper_agent.simulated import LiveBackend, fake_gpus

        return LiveBackend(
            args.sim_dir,
            args.node,
            fake_gpus(args.node, args.sim_gpus, args.sim_product),
            cgroups=args.sim_cgroups,
        )
    import pynvml

    from payper_agent.nvml import NvmlBackend

    return NvmlBackend(pynvml, api=args.nvml_api)


async def run(args: argparse.Namespace) -> int:
    from payper.kube import Informer, Kube, resource_path

    # Before anything reads the state: a predecessor on this node may still be running.
    await claim_state_dir(args.state_dir)
    backend = make_backend(args)
    pods = PodIndex()
    agent = Agent(
        AgentSettings(
            args.node,
            args.state_dir,
            args.poll_interval,
            args.report_interval,
            simulated=args.backend == "simulated",
        ),
        backend,
        PidResolver(backend.cgroup, pods),
    )
    tls = ssl.create_default_context(cafile=args.operator_ca) if args.operator_ca else None
    sender = Sender(
        agent.store,
        args.node,
        args.operator_url,
        TokenFile(args.token_file),
        args.retention * 1000,
        tls,
    )
    agent.on_report = sender.wakeup.set
    kube = Kube.connect(args.kubeconfig)

    async def on_pod(kind: str, obj: dict[str, Any]) -> None:
        (pods.remove if kind == "DELETED" else pods.upsert)(obj)

    informer = Informer(
        kube,
        resource_path("v1", "pods"),
        on_pod,
        params={"fieldSelector": f"spec.nodeName={args.node}"},
    )
    app = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        fresh = time.monotonic() - agent.last_poll_monotonic < max(10.0, 5 * args.poll_interval)
        return web.Response(
            status=200 if fresh else 503, text="ok" if fresh else "poll loop stalled"
        )

    async def readyz(_: web.Request) -> web.Response:
        ready = informer.synced.is_set()
        return web.Response(status=200 if ready else 503, text="ok" if ready else "syncing pods")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", http_sites.metrics)
    runner = await http_sites.start_site(app, args.listen)

    tasks = [asyncio.create_task(informer.run()), asyncio.create_task(sender.run())]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await informer.synced.wait()
    logger.info("pods on %s synced; metering %d GPUs", args.node, len(backend.gpus()))
    next_poll = time.monotonic()
    while not stop.is_set():
        try:
            agent.poll_once()
        except Exception:  # one bad poll must not stop metering the node's other tenants
            metrics.POLL_FAILURES.inc()
            logger.exception("poll failed; metering goes on with the next poll")
        next_poll += args.poll_interval
        delay = next_poll - time.monotonic()
        if delay < 0:
            next_poll = time.monotonic()  # behind schedule: do not burst to catch up
            delay = 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await runner.cleanup()
    await kube.close()
    backend.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: payper-agent {run,replay} ...\n\n" + (__doc__ or ""))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "replay":
        return replay.main(rest)
    if command != "run":
        print(f"payper-agent: unknown command {command!r}; use run or replay", file=sys.stderr)
        return 2
    args = parse_run(rest)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
