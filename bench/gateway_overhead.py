"""Benchmark: what payper-gateway adds to a request, side by side with nginx, in one run.

Three paths to the same backend (an nginx worker bound to a kwok pod's loopback IP, so
the gateway really routes by watching that pod):

- direct: client -> backend
- nginx:  client -> nginx (1 worker, keep-alive upstream, proxy_buffering off) -> backend
- payper: client -> payper-gateway -> backend

Two response kinds: ``small`` (one ~100-byte response) and ``stream`` (chunked, 16
chunks flushed one by one, like a token stream).

1. Latency at a fixed rate (default 200 req/s, 20 s), measured from each request's
   *scheduled* send time (no coordinated omission) by a minimal HTTP/1.1 client over
   keep-alive connections; added latency = proxy percentile - direct percentile.
2. Maximum throughput with the proxy pinned to one core (CPU 1) and wrk + backend on
   the other (CPU 0): requests/s, and payper's share of nginx's.
3. Throughput by workers: nginx with ``worker_processes`` 1 and 2 against payper-gateway
   with ``--workers`` 1 and 2, the proxy not pinned (wrk and the backend stay on CPU 0: on
   a 2-core machine they compete with a proxy's second worker, so the ratio is the
   figure, not the req/s).

    .venv/bin/python bench/gateway_overhead.py [--rate 200] [--seconds 20] [--wrk-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from payper_dev.cluster.local import ClusterConfig
from payper_dev.loopback import http_ok
from payper_dev.testing.cluster import ClusterHandle, eventually, local_cluster
from payper_dev.testing.stack import free_port

CRDS = Path(__file__).resolve().parents[1] / "crds"
NAMESPACE = "bench"
NAME = "echo"
SMALL_BODY = "x" * 96
STREAM_CHUNKS = 16
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"  # Debian: nginx-light


def nginx_backend_conf(root: Path, address: str) -> str:
    chunks = "\n".join(
        f"            echo 'data: token-{i:02d}'; echo_flush;" for i in range(STREAM_CHUNKS)
    )
    return f"""
load_module {ECHO_MODULE};
worker_processes 1;
daemon off;
pid {root}/backend.pid;
error_log {root}/backend.err warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp;
    keepalive_requests 1000000;
    server {{
        listen {address} backlog=4096;
        location /small {{ default_type text/plain; return 200 "{SMALL_BODY}"; }}
        location /stream {{
            default_type text/event-stream;
{chunks}
        }}
    }}
}}
"""


def nginx_proxy_conf(root: Path, port: int, backend: str, workers: int = 1) -> str:
    return f"""
worker_processes {workers};
daemon off;
pid {root}/proxy-{port}.pid;
error_log {root}/proxy.err warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    keepalive_requests 1000000;
    upstream backend {{ server {backend}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    lowered = head.lower()
    match = re.search(rb"content-length: *(\d+)", lowered)
    if match:
        await reader.readexactly(int(match.group(1)))
        return
    while True:  # chunked
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.strip().split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


async def fixed_rate(
    host: str, port: int, path: str, rate: float, seconds: float, connections: int = 16
) -> list[float]:
    """Latencies (ms) of requests sent at ``rate``/s, measured from their scheduled time."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await asyncio.open_connection(host, port))
    latencies: list[float] = []
    loop = asyncio.get_running_loop()

    async def one(scheduled: float) -> None:
        reader, writer = await pool.get()
        writer.write(request)
        await _read_response(reader)
        latencies.append((loop.time() - scheduled) * 1000)
        pool.put_nowait((reader, writer))

    # warm up
    for _ in range(50):
        await one(loop.time())
    latencies.clear()
    start = loop.time() + 0.1
    tasks = []
    total = int(rate * seconds)
    for index in range(total):
        scheduled = start + index / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        _, writer = pool.get_nowait()
        writer.close()
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wrk(host: str, port: int, path: str, seconds: int, connections: int = 32) -> float:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "0",
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            f"http://{host}:{port}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise RuntimeError(out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw errors: {out}")
    return float(match.group(1))


def start_backend(
    handle: ClusterHandle, scratch: Path, processes: list[subprocess.Popen[bytes]]
) -> str:
    """The InferenceDeployment and its pod (on gpu-node-0), and the nginx backend serving
    on the pod's loopback IP, pinned to CPU 0; returns the pod's IP."""
    handle.kubectl("create", "namespace", NAMESPACE)
    infd = {
        "apiVersion": "payper.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "s", "image": "nginx", "ports": [{"containerPort": 8000}]}
                    ]
                }
            }
        },
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{NAME}-0",
            "namespace": NAMESPACE,
            "labels": {"payper.dev/inference-deployment": NAME},
        },
        "spec": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "nodeName": "gpu-node-0",
            "containers": [{"name": "s", "image": "nginx", "ports": [{"containerPort": 8000}]}],
        },
    }
    handle.apply_items([infd, pod])

    def pod_ip() -> str | None:
        got = handle.get_json("pod", f"{NAME}-0", "-n", NAMESPACE)
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in got["status"].get("conditions", [])
        )
        return got["status"].get("podIP") if ready else None

    ip: str = eventually(pod_ip, 30, what="the pod's IP")
    (scratch / "backend.conf").write_text(nginx_backend_conf(scratch, f"{ip}:8000"))
    (scratch / "token").write_text("unused")
    processes.append(
        subprocess.Popen(
            [
                "taskset",
                "-c",
                "0",
                "nginx",
                "-c",
                str(scratch / "backend.conf"),
                "-e",
                str(scratch / "backend.err"),
            ]
        )
    )
    return ip


def run(
    handle: ClusterHandle,
    scratch: Path,
    args: argparse.Namespace,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Latency at a fixed rate, then throughput, for each path: direct, nginx, payper."""
    ip = start_backend(handle, scratch, processes)
    backend = f"{ip}:8000"
    proxy_port, gateway_port, admin_port = free_port(), free_port(), free_port()
    (scratch / "proxy.conf").write_text(nginx_proxy_conf(scratch, proxy_port, backend))
    processes.append(
        subprocess.Popen(
            [
                "taskset",
                "-c",
                "1",
                "nginx",
                "-c",
                str(scratch / "proxy.conf"),
                "-e",
                str(scratch / "proxy.err"),
            ]
        )
    )
    processes.append(
        start_gateway(scratch, handle, gateway_port, admin_port, ["taskset", "-c", "1"])
    )
    eventually(lambda: http_ok(f"http://127.0.0.1:{admin_port}/readyz"), 30, what="the gateway")
    prefix = f"/{NAMESPACE}/{NAME}"
    backend_port = 8000

    def routes(kind: str) -> dict[str, tuple[str, int, str]]:
        return {
            "direct": (ip, backend_port, f"/{kind}"),
            "nginx": ("127.0.0.1", proxy_port, f"/{kind}"),
            "payper": ("127.0.0.1", gateway_port, f"{prefix}/{kind}"),
        }

    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print(f"fixed rate: {args.rate:.0f} req/s for {args.seconds:.0f} s per path; latency in ms\n")
    print(f"{'kind':<8}{'path':<8}{'p50':>8}{'p99':>8}{'added p50':>11}{'added p99':>11}")
    results = {}
    for kind in ("small", "stream"):
        for path_name, (host, port, path) in routes(kind).items():
            latencies = asyncio.run(fixed_rate(host, port, path, args.rate, args.seconds))
            results[(kind, path_name)] = (
                percentile(latencies, 0.5),
                percentile(latencies, 0.99),
            )
        base50, base99 = results[(kind, "direct")]
        for path_name in ("direct", "nginx", "payper"):
            p50, p99 = results[(kind, path_name)]
            added = f"{p50 - base50:>11.3f}{p99 - base99:>11.3f}"
            print(f"{kind:<8}{path_name:<8}{p50:>8.3f}{p99:>8.3f}{added}")
    print(f"\nmax throughput, proxy on one core (wrk -t1 -c32, {args.wrk_seconds} s), req/s")
    print(f"{'kind':<8}{'direct':>10}{'nginx':>10}{'payper':>10}{'payper/nginx':>14}")
    for kind in ("small", "stream"):
        direct, through_nginx, through_payper = (
            wrk(host, port, path, args.wrk_seconds) for host, port, path in routes(kind).values()
        )
        ratio = through_payper / through_nginx
        print(
            f"{kind:<8}{direct:>10.0f}{through_nginx:>10.0f}{through_payper:>10.0f}{ratio:>14.2f}"
        )
    by_workers(handle, scratch, backend, prefix, args, processes)


def start_gateway(
    scratch: Path,
    handle: ClusterHandle,
    port: int,
    admin_port: int,
    pin: list[str],
    workers: int = 1,
    source: Path | None = None,
) -> subprocess.Popen[bytes]:
    """payper-gateway on ``port`` (this tree's, or the one at ``source``)."""
    log = (scratch / "gateway.log").open("ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if source is not None:
        env["PYTHONPATH"] = str(source.resolve() / "operator")
    return subprocess.Popen(
        [
            *pin,
            sys.executable,
            "-m",
            "payper.gateway.main",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
            "--operator-url",
            f"http://127.0.0.1:{free_port()}",
            "--token-file",
            str(scratch / "token"),
            "--kubeconfig",
            str(handle.kubeconfig),
            *(["--workers", str(workers)] if workers > 1 else []),
            "--log-level",
            "ERROR",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # a process group: its workers are stopped (or killed) with it
    )


def by_workers(
    handle: ClusterHandle,
    scratch: Path,
    backend: str,
    prefix: str,
    args: argparse.Namespace,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Part 3: nginx and payper-gateway with 1 and 2 workers each, nothing pinned."""
    print(f"\nthroughput by workers, proxy unpinned (wrk -t1 -c64, {args.wrk_seconds} s), req/s")
    print(f"{'kind':<8}{'workers':>8}{'nginx':>10}{'payper':>10}{'payper/nginx':>14}")
    for workers in (1, 2):
        proxy_port, port, admin_port = free_port(), free_port(), free_port()
        conf = scratch / f"proxy-{workers}.conf"
        conf.write_text(nginx_proxy_conf(scratch, proxy_port, backend, workers))
        proxy = subprocess.Popen(["nginx", "-c", str(conf), "-e", str(scratch / "proxy.err")])
        gateway = start_gateway(scratch, handle, port, admin_port, [], workers)
        processes += [proxy, gateway]
        ready = f"http://127.0.0.1:{admin_port}/readyz"
        eventually(lambda url=ready: http_ok(url), 30, what=f"the gateway, {workers} workers")
        for kind in ("small", "stream"):
            through_nginx = wrk("127.0.0.1", proxy_port, f"/{kind}", args.wrk_seconds, 64)
            through_payper = wrk("127.0.0.1", port, f"{prefix}/{kind}", args.wrk_seconds, 64)
            ratio = through_payper / through_nginx
            print(
                f"{kind:<8}{workers:>8}{through_nginx:>10.0f}{through_payper:>10.0f}{ratio:>14.2f}"
            )
        for process in (proxy, gateway):
            process.terminate()
            process.wait(30)


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, then wait for each (SIGKILL after 10 s)."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--wrk-seconds", type=int, default=10)
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is required (Debian: nginx-light, wrk, util-linux)")
    scratch = Path(tempfile.mkdtemp(prefix="payper-bench-gw-"))
    (scratch / "tmp").mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    config = ClusterConfig(pod_cidr="127.6.0.0/16", cold_start_ms=0, crds_dir=str(CRDS))
    try:
        with local_cluster(scratch / "cluster", config) as handle:
            run(handle, scratch, args, processes)
    except BaseException:
        print((scratch / "gateway.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        stop_all(processes)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
