"""The small aiohttp sites every Payper process serves: its API, health and ``/metrics``.

One way to read a listen address (``host:port``, an empty host meaning every interface)
and to start a site on it, shared by the operator, the gateway's admin port and the agent.
"""

from __future__ import annotations

import ssl

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "0.0.0.0", int(port)


async def metrics(_: web.Request) -> web.Response:
    """This process's Prometheus registry, in the text exposition format."""
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_site(
    app: web.Application, address: str, tls: ssl.SSLContext | None = None
) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, *host_port(address), ssl_context=tls).start()
    return runner
