"""payper-operator: reconciles InferenceDeployments, autoscales them, serves demand and usage.

Start-up order: validate the configuration (a bad key stops here), serve /healthz and
/metrics, win the leader Lease, then run kopf, the autoscaler loop and the API for
gateways and agents. Losing the Lease ends the process: another instance leads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kopf
from aiohttp import web

from payper import http_sites
from payper.api.inference_deployment import API_KEY_SECRET_TYPE
from payper.billing.ledger import Ledger
from payper.kube import Informer, Kube, resource_path
from payper.operator import config as config_module
from payper.operator.api_server import ApiServer
from payper.operator.auth import TokenVerifier
from payper.operator.capacity import UnmeteredCapacity
from payper.operator.controller import Controller
from payper.operator.handlers import Memo, load
from payper.operator.leader import LeaderElector, LostLeadership
from payper.operator.synced import Synced

logger = logging.getLogger("payper.operator")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="payper-operator", description=__doc__)
    parser.add_argument("--config", type=Path, default=os.environ.get("PAYPER_CONFIG"))
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME", socket.gethostname()),
        help="holder identity in the leader Lease (the pod name in a cluster)",
    )
    parser.add_argument("--log-level", default=os.environ.get("PAYPER_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def _metrics_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", http_sites.metrics)
    return app


def _settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="payper.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="payper.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # The initial listing of every pod in chunks: unchunked, 10,000 pods peaked at 526 MiB
    # at start-up, over the chart's 512Mi limit (bench/operator_memory.py).
    settings.watching.chunk_size = 500
    settings.networking.request_timeout = 60
    return settings


def api_key_secrets(kube: Kube, controller: Controller) -> Informer:
    """The watch of API key Secrets (by type; RBAC cannot narrow it): the operator checks
    them and publishes digests, so the internet-facing gateway needs no Secret access."""

    async def handler(kind: str, obj: dict[str, Any]) -> None:
        controller.observe_key_secret(obj, deleted=kind == "DELETED")

    return Informer(
        kube,
        resource_path("v1", "secrets"),
        handler,
        params={"fieldSelector": f"type={API_KEY_SECRET_TYPE}"},
        metadata_only=True,
    )


async def run(args: argparse.Namespace, config: config_module.OperatorConfig) -> int:
    kube = Kube.connect(args.kubeconfig)
    controller = Controller(kube, config)
    verifier = TokenVerifier(kube, config.identity.audience, config.identity.token_cache_seconds)
    elector = LeaderElector(
        kube,
        config.leader_election.namespace,
        config.leader_election.name,
        args.identity,
        config.leader_election.lease_duration_seconds,
        config.leader_election.renew_seconds,
    )
    tls = None
    if config.listen.tls_cert_file and config.listen.tls_key_file:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(config.listen.tls_cert_file, config.listen.tls_key_file)
    synced = Synced(controller.registry)
    ledger = Ledger(
        kube,
        config.billing,
        config.leader_election.namespace,
        controller.registry,
        controller.billing,
        synced=synced,
    )
    api = ApiServer(controller, verifier, lambda: elector.is_leader, ledger)
    after_s = config.billing.unmetered_after_seconds
    capacity = UnmeteredCapacity(
        kube, ledger.reported_at, controller.registry.all_pods, after_s * 1000
    )
    runners = [
        await http_sites.start_site(api.app(), config.listen.api, tls),
        await http_sites.start_site(_metrics_app(), config.listen.metrics),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    exit_code = 0
    acquire = asyncio.create_task(elector.acquire())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({acquire, stopping}, return_when=asyncio.FIRST_COMPLETED)
    tasks: list[asyncio.Task[None]] = []
    if acquire.done():
        secrets = api_key_secrets(kube, controller)
        controller.key_secrets_synced = secrets.synced.is_set
        await ledger.load()
        catching_up = asyncio.create_task(synced.run(kube), name="synced")
        kopf_stop = asyncio.Event()
        tasks = [
            asyncio.create_task(secrets.run(), name="api-key-secrets"),
            asyncio.create_task(ledger.run(), name="ledger"),
            asyncio.create_task(elector.keep(), name="lease"),
            asyncio.create_task(controller.run(), name="autoscaler"),
            asyncio.create_task(capacity.run(min(10.0, after_s / 4)), name="capacity"),
            asyncio.create_task(
                kopf.operator(
                    registry=load(),
                    settings=_settings(),
                    memo=Memo(controller),
                    clusterwide=True,
                    standalone=True,
                    stop_flag=kopf_stop,
                ),
                name="kopf",
            ),
        ]
        done, _ = await asyncio.wait({*tasks, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopping and task.exception() is not None:
                error = task.exception()
                logger.error("%s stopped: %r", task.get_name(), error)
                exit_code = 1 if not isinstance(error, LostLeadership) else 2
        kopf_stop.set()
        catching_up.cancel()
    acquire.cancel()
    stopping.cancel()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    with contextlib.suppress(Exception):
        await elector.release()
    for runner in runners:
        await runner.cleanup()
    await kube.close()
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kopf").setLevel(logging.WARNING)
    try:
        config = config_module.load(args.config)
    except config_module.ConfigError as error:
        print(f"payper-operator: {error}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args, config))
    except OSError as error:
        print(f"payper-operator: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
