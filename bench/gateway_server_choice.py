"""Benchmark: keep the gateway's hand-written HTTP/1.1 server, or use a kept library?

Side by side in one run, each proxy pinned to CPU 1 (wrk and the backend on CPU 0), the
same backend as ``bench/gateway_overhead.py`` (an nginx worker on a kwok pod's loopback
IP), small (96 B) and streamed (16 chunks) responses:

- direct, and nginx (1 worker, keep-alive upstream): the baselines;
- payper-gateway: today's hand-written server (``payper.gateway.server``);
- uvicorn (httptools, uvloop) and granian (Rust, ASGI), each serving twice: ``-min``,
  ``bench/asgi_proxy.py``, a minimal proxy over the gateway's own upstream client (a
  ceiling: it does less than the gateway); ``-gw``, ``bench/asgi_gateway.py``, the
  gateway's own request path (routing, keys, held requests, metrics, upstream pool)
  behind an ASGI adapter: the deciding legs.

Throughput with wrk (-t1 -c32), twice per path, alternating; latency at a fixed rate
from each request's scheduled send time; then ``bench/gateway_attack.py``'s combined
attack on each server, with the chart's defaults for the gateway and each library's
defaults (peak RSS of the server and its workers; a server past ``--kill-mib`` is
killed); then a stranger's cheapest attack, idle connections that send nothing, past
each server's connection cap, and how a well-behaved client is answered meanwhile. The
rule (issue: gateway fit for the open internet): use the library if its
small-response throughput is within 20 % of the hand-written server's, or better, and
it holds the bounds.

    make bench-deps && .venv/bin/python bench/gateway_server_choice.py [--wrk-seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway_attack import LIMIT_MIB, round_of
from gateway_overhead import (
    CRDS,
    NAME,
    NAMESPACE,
    fixed_rate,
    nginx_proxy_conf,
    percentile,
    start_backend,
    start_gateway,
    stop_all,
    wrk,
)
from payper_dev.cluster.local import ClusterConfig
from payper_dev.loopback import free_port, http_ok
from payper_dev.testing.cluster import ClusterHandle, eventually, local_cluster

BENCH = Path(__file__).resolve().parent
PIN = ["taskset", "-c", "1"]


SERVED = {"min": "asgi_proxy:app", "gw": "asgi_gateway:app"}
"""What a library serves: the minimal proxy, or the gateway's own request path."""


def start_library(
    name: str, port: int, backend: str, prefix: str, log: Path
) -> subprocess.Popen[bytes]:
    server, served = name.split("-")
    app = SERVED[served]
    env = {
        **os.environ,
        "PAYPER_BENCH_UPSTREAM": backend,
        "PAYPER_BENCH_PREFIX": prefix,
        "PYTHONPATH": str(BENCH),
    }
    bind = ["--host", "127.0.0.1", "--port", str(port)]
    command = {
        "uvicorn": [
            sys.executable, "-m", "uvicorn", app, *bind, "--http", "httptools",
            "--loop", "uvloop", "--no-access-log", "--log-level", "error",
            "--timeout-keep-alive", "30",
        ],
        "granian": [
            sys.executable, "-m", "granian", "--interface", "asgi", *bind, "--workers", "1",
            "--runtime-threads", "1", "--loop", "uvloop", "--no-access-log",
            "--log-level", "error", app,
        ],
    }[server]  # fmt: skip
    return subprocess.Popen(
        [*PIN, *command],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=BENCH,
        start_new_session=True,  # killed with its workers past the memory bound
    )


def run(
    handle: ClusterHandle,
    scratch: Path,
    args: argparse.Namespace,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    ip = start_backend(handle, scratch, processes)
    backend = f"{ip}:8000"
    prefix = f"/{NAMESPACE}/{NAME}"
    libraries = ("uvicorn-min", "granian-min", "uvicorn-gw", "granian-gw")
    ports = {name: free_port() for name in ("nginx", "payper", *libraries)}
    (scratch / "proxy.conf").write_text(nginx_proxy_conf(scratch, ports["nginx"], backend))
    processes.append(
        subprocess.Popen([*PIN, "nginx", "-c", str(scratch / "proxy.conf"), "-e", "/dev/null"])
    )
    admin = free_port()
    gateway = start_gateway(scratch, handle, ports["payper"], admin, PIN)
    processes.append(gateway)
    pids = {"payper": gateway.pid}
    for name in libraries:
        started = start_library(name, ports[name], backend, prefix, scratch / f"{name}.log")
        processes.append(started)
        pids[name] = started.pid
    eventually(lambda: http_ok(f"http://127.0.0.1:{admin}/readyz"), 30, what="the gateway")

    def route(name: str, kind: str) -> tuple[str, int, str]:
        if name == "direct":
            return ip, 8000, f"/{kind}"
        if name == "nginx":
            return "127.0.0.1", ports["nginx"], f"/{kind}"
        return "127.0.0.1", ports[name], f"{prefix}/{kind}"

    for name in libraries:
        host, port, path = route(name, "small")
        eventually(lambda u=f"http://{host}:{port}{path}": http_ok(u), 30, what=name)
    names = ("direct", "nginx", "payper", *libraries)
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    if "speed" in args.legs:
        print(f"\nlatency at {args.rate:.0f} req/s for {args.seconds:.0f} s, ms (p50 / p99)")
        for kind in ("small", "stream"):
            cells = []
            for name in names:
                latencies = asyncio.run(fixed_rate(*route(name, kind), args.rate, args.seconds))
                cells.append(
                    f"{name} {percentile(latencies, 0.5):.3f}/{percentile(latencies, 0.99):.3f}"
                )
            print(f"{kind}: " + ", ".join(cells))
        print(
            f"\nthroughput, proxy on CPU 1 (wrk -t1 -c32, {args.wrk_seconds} s, two rounds), req/s"
        )
        print(
            "| response | round | "
            + " | ".join(names)
            + " | "
            + " | ".join(f"{n} / payper" for n in libraries)
            + " |"
        )
        print("|---|---|" + "---|" * (len(names) + len(libraries)))
        for kind in ("small", "stream"):
            for round_ in (1, 2):
                got = {n: wrk(*route(n, kind), args.wrk_seconds) for n in names}
                ratios = [got[n] / got["payper"] for n in libraries]
                print(
                    f"| {kind} | {round_} | "
                    + " | ".join(f"{got[n]:.0f}" for n in names)
                    + " | "
                    + " | ".join(f"{r:.2f}" for r in ratios)
                    + " |"
                )
    if "attack" in args.legs:
        print(
            f"\nthe combined attack ({args.flooders} pipelining flooders, "
            f"{args.slowloris} slowloris, "
            f"1 giant header; client {args.rate:.0f} req/s for {args.seconds:.0f} s; past "
            f"{args.kill_mib} MiB a server is killed)"
        )
        print("| server | peak RSS MiB | of 256 MiB | client p50 ms | client p99 ms | notes |")
        print("|---|---|---|---|---|---|")
        for name in ("payper", "uvicorn-gw", "granian-gw"):
            got = asyncio.run(round_of(pids[name], ports[name], args, attack=True))
            p50 = "-" if got["p50"] is None else f"{got['p50']:.2f}"
            p99 = "-" if got["p99"] is None else f"{got['p99']:.2f}"
            peak = float(str(got["peak"]))
            notes = ("killed past the bound; " if got["killed"] else "") + str(got["failure"])
            print(f"| {name} | {peak:.0f} | {peak / LIMIT_MIB:.2f} | {p50} | {p99} | {notes} |")
    if "idle" in args.legs:
        print(
            f"\nidle connections (opened, nothing sent; then {args.probes} well-behaved requests, "
            f"each on a connection of its own, {args.probe_timeout:.0f} s to answer)"
        )
        print("| server | idle connections opened | answers | first byte, median s | slowest s |")
        print("|---|---|---|---|---|")
        for count in args.idle:
            for name in ("payper", "uvicorn-gw", "granian-gw"):
                if processes[[p.pid for p in processes].index(pids[name])].poll() is not None:
                    print(f"| {name} | {count} | not running (killed by the attack above) | | |")
                    continue
                opened, answers, times = asyncio.run(
                    idle_round(ports[name], route(name, "small")[2], count, args)
                )
                times.sort()
                print(
                    f"| {name} | {opened} of {count} | {', '.join(answers)} | "
                    f"{times[len(times) // 2]:.2f} | {times[-1]:.2f} |"
                )


async def idle_round(
    port: int, path: str, count: int, args: argparse.Namespace
) -> tuple[int, list[str], list[float]]:
    """``count`` connections that send nothing (a stranger's cheapest attack), then
    ``args.probes`` requests one after another, each on a fresh connection: the status
    line's code each got (or "none" within ``args.probe_timeout``) and its time to the
    first byte."""
    idle: list[asyncio.StreamWriter] = []
    deadline = time.monotonic() + args.open_seconds
    for _ in range(count):
        # A server that stops accepting leaves the kernel's backlog full: connects then
        # take the SYN retries' seconds each. Opening stops at the deadline.
        left = deadline - time.monotonic()
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), max(left, 0.001)
            )
        except (OSError, TimeoutError):
            break
        idle.append(writer)
    opened = len(idle)
    await asyncio.sleep(1)
    answers, times = [], []

    async def probe() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            line = await reader.readline()
            return line.split(b" ")[1].decode() if line else "closed"
        finally:
            writer.close()

    for _ in range(args.probes):
        began = time.perf_counter()
        try:  # connecting counts: past a full backlog, a connect waits on SYN retries
            answers.append(await asyncio.wait_for(probe(), args.probe_timeout))
        except (OSError, TimeoutError, IndexError):
            answers.append("none")
        times.append(time.perf_counter() - began)
    for writer in idle:
        writer.close()
    await asyncio.sleep(1)  # let the server see them go before the next round
    return opened, [f"{answers.count(a)} x {a}" for a in dict.fromkeys(answers)], times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--legs",
        type=lambda v: set(v.split(",")),
        default={"speed", "attack", "idle"},
        help="which to run: speed (latency, throughput), attack, idle",
    )
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--wrk-seconds", type=int, default=8)
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--flood-mib", type=int, default=64)
    parser.add_argument("--slowloris", type=int, default=300)
    parser.add_argument("--kill-mib", type=int, default=1536)
    parser.add_argument(
        "--idle",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[1200, 5000],
        help="idle connection counts: past granian's default cap (1,024 per worker), past "
        "the gateway's (4,096)",
    )
    parser.add_argument("--open-seconds", type=float, default=20, help="to open them, at most")
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--probe-timeout", type=float, default=15)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the servers inherit it
    if hard < 2 * max(args.idle) + 1024:
        sys.exit(f"{2 * max(args.idle) + 1024} open files needed, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is required (make bench-deps)")
    scratch = Path(tempfile.mkdtemp(prefix="payper-bench-server-"))
    (scratch / "tmp").mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    config = ClusterConfig(pod_cidr="127.7.0.0/16", cold_start_ms=0, crds_dir=str(CRDS))
    try:
        with local_cluster(scratch / "cluster", config) as handle:
            run(handle, scratch, args, processes)
    except BaseException:
        for log in (
            "gateway.log",
            *(f"{n}-{m}.log" for n in ("uvicorn", "granian") for m in SERVED),
        ):
            if (scratch / log).exists():
                print(f"-- {log}\n" + (scratch / log).read_text()[-2000:], file=sys.stderr)
        raise
    finally:
        stop_all(processes)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
