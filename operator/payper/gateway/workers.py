"""Several gateway processes behind one port: more than one core for the request path.

One Python process serves on one core. With ``--workers N`` (the chart's
``gateway.workers``) this process starts N workers, each a whole gateway (its own watches,
hold queues and demand reports, under its own gateway id, which the operator sums as it
sums gateway replicas), all listening on the tenant port with SO_REUSEPORT so that the
kernel spreads connections among them. This process serves the admin port: ``/healthz``
(every worker alive), ``/readyz`` (every worker synced) and ``/metrics`` (all workers'
metrics in one exposition, by prometheus_client's multiprocess mode).

A worker that dies takes the gateway down (exit 1), so Kubernetes restarts the pod
rather than keep a gateway that serves on fewer cores than it was given. A worker whose
supervisor is gone stops by itself. The gateway's bounds (connections, hold queue) are
the pod's: each worker holds its share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from payper import http_sites

logger = logging.getLogger("payper.gateway.workers")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
STOP_TIMEOUT_S = 120.0
"""How long a SIGTERM'd worker may take to finish (then SIGKILL); the pod's grace period
is the outer bound."""
PARENT_CHECK_S = 1.0


def share(total: int, workers: int) -> int:
    """One worker's part of a gateway-wide bound (0 stays 0: a bound of nothing)."""
    return 0 if total == 0 else max(1, total // workers)


def worker_gateway_id(gateway_id: str, index: int) -> str:
    return f"{gateway_id}-w{index}"


def ready_marker(run_dir: Path, index: int) -> Path:
    return run_dir / f"ready-{index}"


def mark_ready(run_dir: Path, index: int) -> None:
    """A worker says it is synced (read by the supervisor's /readyz)."""
    ready_marker(run_dir, index).touch()


async def watch_parent(stop: asyncio.Event) -> None:
    """Stop a worker whose supervisor is gone (it was reparented)."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            logger.error("the gateway's supervisor is gone: stopping")
            stop.set()


def _worker_command(argv: Sequence[str], index: int, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "payper.gateway.main",
        *argv,
        "--worker-index",
        str(index),
        "--run-dir",
        str(run_dir),
    ]


async def supervise(workers: int, admin_listen: str, argv: Sequence[str]) -> int:
    """Run ``workers`` gateway workers and the admin port until SIGTERM (0) or until a
    worker exits on its own (1)."""
    run_dir = Path(tempfile.mkdtemp(prefix="payper-gateway-"))
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    env = dict(os.environ, **{METRICS_DIR_ENV: str(metrics_dir)})
    processes: list[asyncio.subprocess.Process] = []
    admin: web.AppRunner | None = None
    try:
        for index in range(workers):
            processes.append(
                await asyncio.create_subprocess_exec(
                    *_worker_command(argv, index, run_dir), env=env
                )
            )
        admin = await http_sites.start_site(
            _admin_app(processes, run_dir, metrics_dir), admin_listen
        )
        logger.info("payper-gateway: %d workers (admin %s)", workers, admin_listen)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        exits = [asyncio.create_task(p.wait()) for p in processes]
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        if stopping in done:
            code = 0
        else:
            died = next(p for p, e in zip(processes, exits, strict=True) if e in done)
            logger.error(
                "gateway worker %d exited with %s: stopping the gateway",
                processes.index(died),
                died.returncode,
            )
            code = 1
        for task in (stopping, *exits):
            task.cancel()
        return code
    finally:
        await _stop(processes)
        if admin is not None:
            await admin.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)


async def _stop(processes: list[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _admin_app(
    processes: list[asyncio.subprocess.Process], run_dir: Path, metrics_dir: Path
) -> web.Application:
    def alive() -> bool:
        return all(p.returncode is None for p in processes)

    async def healthz(_: web.Request) -> web.Response:
        ok = alive()
        return web.Response(status=200 if ok else 503, text="ok" if ok else "a worker exited")

    async def readyz(_: web.Request) -> web.Response:
        synced = sum(ready_marker(run_dir, i).exists() for i in range(len(processes)))
        ok = alive() and synced == len(processes)
        text = "ok" if ok else f"{synced} of {len(processes)} workers synced"
        return web.Response(status=200 if ok else 503, text=text)

    async def metrics(_: web.Request) -> web.Response:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
