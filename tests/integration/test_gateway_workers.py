"""The gateway on more than one core: ``--workers 2`` on the real control plane.

Two worker processes share the tenant port (SO_REUSEPORT) under one supervisor, which
serves the admin port. Tested here: the kernel spreads client connections over both
workers, a deployment scales from zero through them, the supervisor's /metrics adds up
both workers' counts, and the gateway never runs on fewer workers than it was given: a
worker that dies takes the whole gateway down (exit 1) for Kubernetes to restart, and a
SIGTERM stops every worker cleanly (exit 0).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import (
    Stack,
    StackOptions,
    inference_deployment,
    running,
    scraped_sum,
)

WORKERS = 2
CONNECTIONS = 32
"""Client connections, each its own: all on one worker by chance has odds 2 * 2**-32."""


@pytest.fixture(scope="module")
def stack(
    crds_installed: ClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    options = StackOptions(gateway_workers=WORKERS)
    with running(crds_installed, tmp_path_factory.mktemp("workers"), options) as started:
        yield started


def supervisor_pid(stack: Stack) -> int:
    assert stack.gateway is not None and stack.gateway.popen is not None
    return stack.gateway.popen.pid


def worker_pids(stack: Stack) -> list[int]:
    """The supervisor's child processes (its workers), by /proc."""
    parent = supervisor_pid(stack)
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == parent:
            children.append(int(entry.name))
    return sorted(children)


def running_process(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def established_per_process(port: int, pids: list[int]) -> dict[int, int]:
    """Established connections to ``port`` (server side) held by each of ``pids``."""
    server_side = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rpartition(":")[2], 16)
        if local_port == port and fields[3] == "01":  # ESTABLISHED
            server_side.add(fields[9])  # the socket's inode
    counts = {}
    for pid in pids:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        counts[pid] = len(inodes & server_side)
    return counts


async def test_connections_spread_over_both_workers_and_metrics_add_up(
    stack: Stack, namespace: str
) -> None:
    stack.deploy(namespace, inference_deployment("split", max_replicas=1, idle_timeout_s=120))
    workers = worker_pids(stack)
    assert len(workers) == WORKERS, workers
    url = f"{stack.gateway_url}/{namespace}/split/v1/infer"
    answered = ("payper_gateway_requests_total", {"namespace": namespace, "code": "200"})
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(CONNECTIONS)
    ]
    try:
        async with sessions[0].post(url, json={"ms": 10}) as first:  # scales from zero
            assert first.status == 200, await first.text()
            assert first.headers.get("X-Payper-Cold-Start-Ms") is not None

        async def call(session: aiohttp.ClientSession) -> int:
            async with session.post(url, json={"ms": 10}) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(call(s) for s in sessions))
        assert set(statuses) == {200}
        # Every session keeps its connection open: count them where they landed.
        held = established_per_process(stack.gateway_port, workers)
        assert sum(held.values()) == CONNECTIONS, held
        assert all(count > 0 for count in held.values()), f"one worker took them all: {held}"
    finally:
        for session in sessions:
            await session.close()
    got = scraped_sum(f"http://127.0.0.1:{stack.gateway_admin_port}/metrics", *answered)
    assert got == CONNECTIONS + 1, "the supervisor's /metrics sums both workers"


async def test_a_worker_that_dies_takes_the_gateway_down(stack: Stack) -> None:
    assert stack.gateway is not None and stack.gateway.popen is not None
    workers = worker_pids(stack)
    os.kill(workers[0], signal.SIGKILL)
    code = await asyncio.to_thread(stack.gateway.popen.wait, 30)
    assert code == 1, "the supervisor exits non-zero: Kubernetes restarts the pod"
    await asyncio.to_thread(
        eventually, lambda: not running_process(workers[1]), 30, 0.2, "the other worker to stop"
    )
    await asyncio.to_thread(stack.start_gateway)
    assert len(worker_pids(stack)) == WORKERS


async def test_sigterm_stops_every_worker_cleanly(stack: Stack) -> None:
    assert stack.gateway is not None and stack.gateway.popen is not None
    workers = worker_pids(stack)
    os.kill(supervisor_pid(stack), signal.SIGTERM)
    assert await asyncio.to_thread(stack.gateway.popen.wait, 60) == 0
    assert not [pid for pid in workers if running_process(pid)]
    await asyncio.to_thread(stack.start_gateway)
