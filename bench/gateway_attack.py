"""Benchmark: payper-gateway under a stranger's combined attack, before and after its bounds.

The attack (issue: gateway fit for the open internet), from sockets alone, for
``--seconds``:

- a pipelining flood: ``--flooders`` connections, each writing small requests as fast as
  the gateway reads them and never reading an answer (each stops at ``--flood-mib``);
- slowloris: ``--slowloris`` connections, each sending a request head one byte a second
  (reconnecting when the gateway closes it);
- one giant header: a request whose one header grows by 64 KiB every 100 ms (up to 16 MiB).

Meanwhile a well-behaved client sends small requests at ``--rate``/s over keep-alive
connections, its latency measured from each request's scheduled send time; the same
client runs first without the attack. Measured: the gateway's peak RSS against the
chart's 256 MiB limit (a gateway past ``--kill-mib`` is killed: this machine's bound, and
reported), and the client's p50/p99 and failures.

Before: the gateway of the commit before its bounds (1954e81~1: the request head was
already capped at 64 KiB and 100 fields), from a tree of its own; after: this tree's,
with the chart's default bounds. The gateway is pinned to CPU 1, the attack, the client
and the backend to CPU 0.

    git archive 1954e81~1 operator | (mkdir -p /tmp/gw-before && tar -x -C /tmp/gw-before)
    .venv/bin/python bench/gateway_attack.py --before /tmp/gw-before
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gateway_overhead import (
    CRDS,
    NAME,
    NAMESPACE,
    fixed_rate,
    percentile,
    start_backend,
    start_gateway,
    stop_all,
)
from payper_dev.cluster.local import ClusterConfig
from payper_dev.loopback import free_port, http_ok
from payper_dev.testing.cluster import ClusterHandle, eventually, local_cluster

LIMIT_MIB = 256
"""The chart's memory limit of the gateway container."""
PATH = f"/{NAMESPACE}/{NAME}/small"
REQUEST = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
GIANT_STEP = 64 * 1024
GIANT_MAX = 16 * 2**20


def rss_mib(pid: int) -> float:
    """The RSS of a process and all its descendants (a server's workers included)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                total += rss_mib(int(child))
    return total


async def flood(port: int, limit: int, stop: asyncio.Event) -> None:
    """Pipelined requests, never an answer read; bounded in bytes and time."""
    with contextlib.suppress(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        chunk = REQUEST * 256
        sent = 0
        while sent < limit and not stop.is_set():
            writer.write(chunk)
            sent += len(chunk)
            while not stop.is_set():  # the gateway stopped reading: wait for it, or the end
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                    break
                except TimeoutError:
                    continue
        writer.transport.abort()


async def slowloris(port: int, stop: asyncio.Event) -> None:
    """A request head, one byte a second; a new connection when the gateway closes it."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode())
            while not stop.is_set() and not reader.at_eof():
                writer.write(b"a")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(4096), 1.0)
            writer.transport.abort()
        except OSError:
            await asyncio.sleep(0.5)


async def giant_header(port: int, stop: asyncio.Event) -> None:
    with contextlib.suppress(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Giant: ".encode())
        sent = 0
        while sent < GIANT_MAX and not stop.is_set():
            writer.write(b"a" * GIANT_STEP)
            sent += GIANT_STEP
            await asyncio.wait_for(writer.drain(), 5)
            await asyncio.sleep(0.1)
        writer.transport.abort()


async def good_client(port: int, rate: float, seconds: float) -> tuple[list[float], str]:
    try:
        return await fixed_rate("127.0.0.1", port, PATH, rate, seconds), ""
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
        return [], type(error).__name__


async def round_of(
    pid: int, port: int, args: argparse.Namespace, attack: bool
) -> dict[str, object]:
    """The client alone or under the attack; the gateway's peak RSS meanwhile."""
    stop = asyncio.Event()
    peak = rss_mib(pid)
    killed = False
    attackers = []
    if attack:
        attackers += [
            asyncio.create_task(flood(port, args.flood_mib * 2**20, stop))
            for _ in range(args.flooders)
        ]
        attackers += [asyncio.create_task(slowloris(port, stop)) for _ in range(args.slowloris)]
        attackers.append(asyncio.create_task(giant_header(port, stop)))
        await asyncio.sleep(1)  # the attack first, then the client
    client = asyncio.create_task(
        asyncio.wait_for(good_client(port, args.rate, args.seconds), args.seconds + 60)
    )
    while not client.done():
        with contextlib.suppress(OSError):
            peak = max(peak, rss_mib(pid))
        if peak > args.kill_mib and not killed:
            os.killpg(pid, 9)  # the server and its workers (started in a session of their own)
            killed = True
        await asyncio.sleep(0.1)
    stop.set()
    for task in attackers:
        task.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)
    try:
        latencies, failure = client.result()
    except TimeoutError:
        latencies, failure = [], "timeout"
    return {
        "peak": peak,
        "killed": killed,
        "p50": percentile(latencies, 0.5) if latencies else None,
        "p99": percentile(latencies, 0.99) if latencies else None,
        "failure": failure,
    }


def measure(
    handle: ClusterHandle,
    scratch: Path,
    args: argparse.Namespace,
    source: Path | None,
    processes: list[subprocess.Popen[bytes]],
) -> list[dict[str, object]]:
    port, admin = free_port(), free_port()
    gateway = start_gateway(scratch, handle, port, admin, ["taskset", "-c", "1"], source=source)
    processes.append(gateway)
    eventually(lambda: http_ok(f"http://127.0.0.1:{admin}/readyz"), 30, what="the gateway")
    rounds = []
    for attack in (False, True):
        if gateway.poll() is not None:
            break
        rounds.append(asyncio.run(round_of(gateway.pid, port, args, attack)) | {"attack": attack})
    gateway.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        gateway.wait(30)
    gateway.kill()
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True, help="the tree of the code before")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--flood-mib", type=int, default=64)
    parser.add_argument("--slowloris", type=int, default=300)
    parser.add_argument("--kill-mib", type=int, default=3072)
    args = parser.parse_args()
    for tool in ("nginx", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is required (Debian: nginx-light, util-linux)")
    os.sched_setaffinity(0, {0})
    scratch = Path(tempfile.mkdtemp(prefix="payper-bench-attack-"))
    (scratch / "tmp").mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    config = ClusterConfig(pod_cidr="127.6.0.0/16", cold_start_ms=0, crds_dir=str(CRDS))
    try:
        with local_cluster(scratch / "cluster", config) as handle:
            start_backend(handle, scratch, processes)
            results = {
                "before": measure(handle, scratch, args, args.before, processes),
                "after": measure(handle, scratch, args, None, processes),
            }
    finally:
        stop_all(processes)
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"attack: {args.flooders} pipelining flooders (≤ {args.flood_mib} MiB each), "
        f"{args.slowloris} slowloris, 1 giant header; client {args.rate:.0f} req/s for "
        f"{args.seconds:.0f} s; the gateway on one core"
    )
    columns = f"{'code':<8}{'attack':<8}{'peak MiB':>10}{'/ 256 MiB':>11}{'p50 ms':>9}"
    print(f"{columns}{'p99 ms':>9}  notes")
    for code, rounds in results.items():
        for r in rounds:
            p50 = "-" if r["p50"] is None else f"{r['p50']:.2f}"
            p99 = "-" if r["p99"] is None else f"{r['p99']:.2f}"
            notes = ("killed past the bound; " if r["killed"] else "") + str(r["failure"])
            peak = float(str(r["peak"]))
            print(
                f"{code:<8}{'yes' if r['attack'] else 'no':<8}{peak:>10.0f}"
                f"{peak / LIMIT_MIB:>11.2f}{p50:>9}{p99:>9}  {notes}"
            )


if __name__ == "__main__":
    main()
