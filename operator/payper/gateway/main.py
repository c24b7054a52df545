"""payper-gateway: the request path of every InferenceDeployment.

Serves tenant traffic on ``--listen`` and ``/metrics``, ``/healthz``, ``/readyz`` on
``--admin-listen`` (with ``--workers`` N > 1, N such processes share the tenant port and
a supervisor serves the admin port: ``payper.gateway.workers``); watches
InferenceDeployments (their status carries the digests of their API keys: the gateway
reads no Secrets) and their Pods; reports demand to the operator with its projected
ServiceAccount token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from payper import http_sites
from payper.api.common import API_VERSION
from payper.api.inference_deployment import PLURAL, POD_LABEL
from payper.gateway import server, workers
from payper.gateway.demand import DemandReporter
from payper.gateway.proxy import Gateway, GatewaySettings, IPNetwork
from payper.gateway.targets import Targets
from payper.identity import TokenFile
from payper.kube import Informer, Kube, resource_path

logger = logging.getLogger("payper.gateway")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number")
    return number


def _networks(value: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(c.strip()) for c in value.split(",") if c.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--trusted-proxies: {error}") from error


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="payper-gateway", description=__doc__)
    parser.add_argument("--listen", default="0.0.0.0:8080", help="tenant traffic")
    parser.add_argument("--admin-listen", default="0.0.0.0:9090", help="/metrics, /healthz")
    parser.add_argument("--domain", default=os.environ.get("PAYPER_DOMAIN", "payper.local"))
    parser.add_argument("--operator-url", default=os.environ.get("PAYPER_OPERATOR_URL"))
    parser.add_argument("--operator-ca", help="CA bundle for the operator's TLS certificate")
    parser.add_argument(
        "--token-file",
        default=os.environ.get("PAYPER_TOKEN_FILE", "/var/run/secrets/payper/token"),
        help="projected ServiceAccount token presented to the operator",
    )
    parser.add_argument("--max-queue", type=int, default=100, help="held requests per deployment")
    defaults = server.Limits()
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=defaults.max_connections,
        help="client connections; beyond, 503",
    )
    parser.add_argument(
        "--max-pipelined",
        type=_positive_int,
        default=defaults.max_pipelined,
        help="requests parsed ahead per connection; beyond, reading pauses",
    )
    parser.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=defaults.header_timeout_s,
        help="seconds for a request head to arrive; then 408",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=defaults.idle_timeout_s,
        help="seconds an idle keep-alive connection stays open",
    )
    parser.add_argument(
        "--upstream-head-timeout",
        type=_positive_float,
        default=GatewaySettings.upstream_response_head_timeout_s,
        help="seconds for a pod to begin its answer (streaming after that is not limited)",
    )
    parser.add_argument(
        "--trusted-proxies",
        type=_networks,
        default=(),
        help="comma-separated CIDRs whose X-Forwarded-*/Forwarded headers are believed",
    )
    parser.add_argument(
        "--require-auth",
        action="store_true",
        help="every deployment requires an API key; unknown ones answer like refused keys",
    )
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--gateway-id", default=os.environ.get("POD_NAME", socket.gethostname()))
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="processes sharing the tenant port (one core each); the bounds are divided",
    )
    # Set by the supervisor for each of its workers (payper.gateway.workers).
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not args.operator_url:
        parser.error("--operator-url (or PAYPER_OPERATOR_URL) is required")
    if args.max_queue < 0:
        parser.error("--max-queue must be >= 0")
    return args


def _on(upsert: Any, remove: Any) -> Any:
    async def handler(kind: str, obj: dict[str, Any]) -> None:
        (remove if kind == "DELETED" else upsert)(obj)

    return handler


def informers(kube: Kube, targets: Targets) -> list[Informer]:
    def pod_upsert(obj: dict[str, Any]) -> None:
        targets.upsert_pod(obj["metadata"]["labels"][POD_LABEL], obj)

    def pod_remove(obj: dict[str, Any]) -> None:
        targets.remove_pod(obj["metadata"]["labels"][POD_LABEL], obj)

    def deployment_remove(obj: dict[str, Any]) -> None:
        targets.remove_deployment((obj["metadata"]["namespace"], obj["metadata"]["name"]))

    return [
        Informer(
            kube,
            resource_path(API_VERSION, PLURAL),
            _on(targets.upsert_deployment, deployment_remove),
        ),
        Informer(
            kube,
            resource_path("v1", "pods"),
            _on(pod_upsert, pod_remove),
            params={"labelSelector": POD_LABEL},
        ),
    ]


async def serve(args: argparse.Namespace) -> None:
    """One gateway: alone, or one of ``--workers`` (then without the admin port, under a
    gateway id of its own, with its share of the bounds)."""
    worker = args.worker_index
    gateway_id = (
        args.gateway_id if worker is None else workers.worker_gateway_id(args.gateway_id, worker)
    )
    targets = Targets(require_auth=args.require_auth)
    ssl_context = ssl.create_default_context(cafile=args.operator_ca) if args.operator_ca else None
    reporter = DemandReporter(
        args.operator_url,
        TokenFile(args.token_file),
        gateway_id,
        targets,
        ssl_context=ssl_context,
    )
    gateway = Gateway(
        targets,
        GatewaySettings(
            domain=args.domain,
            max_queue=workers.share(args.max_queue, args.workers),
            workers=args.workers,
            trusted_proxies=args.trusted_proxies,
            upstream_response_head_timeout_s=args.upstream_head_timeout,
        ),
        reporter.poke,
    )
    kube = Kube.connect(args.kubeconfig)
    watches = informers(kube, targets)
    tasks = [asyncio.create_task(w.run()) for w in watches]

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        synced = all(w.synced.is_set() for w in watches)
        return web.Response(status=200 if synced else 503, text="ok" if synced else "syncing")

    admin = web.Application()
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    admin.router.add_get("/metrics", http_sites.metrics)

    admin_runner = await http_sites.start_site(admin, args.admin_listen) if worker is None else None
    limits = server.Limits(
        max_connections=workers.share(args.max_connections, args.workers),
        max_pipelined=args.max_pipelined,
        header_timeout_s=args.header_timeout,
        idle_timeout_s=args.idle_timeout,
    )
    tenant_server = await server.serve(
        gateway.handle,
        *http_sites.host_port(args.listen),
        backlog=4096,
        connections=server.Connections(limits),
        reuse_port=worker is not None,
    )
    stop = asyncio.Event()
    if worker is not None:
        tasks.append(asyncio.create_task(workers.watch_parent(stop)))
    await asyncio.gather(*(w.synced.wait() for w in watches))
    tasks.append(asyncio.create_task(reporter.run()))
    if worker is not None:
        workers.mark_ready(Path(args.run_dir), worker)
        logger.info("payper-gateway worker %d serving on %s", worker, args.listen)
    else:
        logger.info("payper-gateway serving on %s (admin %s)", args.listen, args.admin_listen)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tenant_server.close()
    await tenant_server.wait_closed()
    gateway.close()
    if admin_runner is not None:
        await admin_runner.cleanup()
    await reporter.close()
    await kube.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.workers > 1 and args.worker_index is None:
            passed = list(sys.argv[1:] if argv is None else argv)
            return uvloop.run(workers.supervise(args.workers, args.admin_listen, passed))
        uvloop.run(serve(args))
    except OSError as error:
        print(f"payper-gateway: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
