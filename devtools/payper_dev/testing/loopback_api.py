"""A stand-in for the API server's wire behaviour, for unit tests of the kube client.

Some answers a real API server gives only under conditions a test cannot arrange on
demand: a 429 storm, a lease renewal that is never answered, a watch event longer than
aiohttp's line limit. ``loopback_api`` serves one path on 127.0.0.1 with the test's own
handler and yields a ``payper.kube.Kube`` client of it, connected through a kubeconfig
file as every other client is. Only the kube client and what sits directly on it (the
leader elector, the informer) are tested this way; everything else runs against the real
control plane."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import yaml
from aiohttp import web

from payper.kube import Kube
from payper_dev.loopback import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _kubeconfig(server: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "loopback", "cluster": {"server": server}}],
        "users": [{"name": "anonymous", "user": {}}],
        "contexts": [{"name": "loopback", "context": {"cluster": "loopback", "user": "anonymous"}}],
        "current-context": "loopback",
    }


@asynccontextmanager
async def loopback_api(path: str, handler: Handler) -> AsyncIterator[Kube]:
    """A loopback server answering ``path`` (any method) with ``handler``, and a client."""
    app = web.Application()
    app.router.add_route("*", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        with tempfile.TemporaryDirectory(prefix="payper-loopback-api-") as scratch:
            kubeconfig = Path(scratch) / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump(_kubeconfig(f"http://127.0.0.1:{port}")))
            async with Kube.connect(kubeconfig) as client:
                yield client
    finally:
        await runner.cleanup()
