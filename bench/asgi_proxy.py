"""The least a kept HTTP server needs to stand in for payper-gateway's hand-written one: an
ASGI app that forwards every request under one deployment's prefix to one pod, through
Payper's own upstream client (``payper.gateway.upstream``), so that a benchmark of it
against the gateway differs only in the server side.

It does less than the gateway (no route table, no API keys, no demand accounting, no
metrics, no bounds): what it costs is a floor for the library, not an estimate of a
gateway built on it. Run by ``bench/gateway_server_choice.py`` under uvicorn (httptools,
uvloop) and granian (Rust, ASGI interface).

    PAYPER_BENCH_UPSTREAM=10.0.0.7:8000 PAYPER_BENCH_PREFIX=/bench/echo \\
        uvicorn asgi_proxy:app --http httptools --loop uvloop
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from payper.gateway.upstream import UpstreamError, UpstreamPool

UPSTREAM = os.environ.get("PAYPER_BENCH_UPSTREAM", "127.0.0.1:8000")
PREFIX = os.environ.get("PAYPER_BENCH_PREFIX", "/bench/echo")
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer"}
)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_pool = UpstreamPool()  # connections are made inside the server's loop, on first use


async def lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop: acknowledge both (every ASGI app here)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    path: str = scope["path"]
    if not path.startswith(PREFIX + "/"):
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not found"})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    target = path[len(PREFIX) :]
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    lines = [f"{scope['method']} {target} HTTP/1.1".encode(), f"host: {UPSTREAM}".encode()]
    lines += [n + b": " + v for n, v in scope["headers"] if n not in HOP_BY_HOP and n != b"host"]
    if body:
        lines.append(b"content-length: " + str(len(body)).encode())
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    try:
        response = await _pool.request(UPSTREAM, head, body or None)
    except UpstreamError:
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b"bad gateway"})
        return
    headers = [(n, v) for n, v in response.headers if n.lower() not in HOP_BY_HOP]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    async for chunk in response.chunks():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
