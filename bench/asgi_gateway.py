"""payper-gateway's own request path (``payper.gateway.proxy.Gateway.handle``: routing, API
keys, held requests, metrics, the upstream pool) served by a kept ASGI server instead of
the hand-written one, for ``bench/gateway_server_choice.py``'s deciding legs.

The adapter hands the gateway a request and a responder with the attributes it uses,
built from the ASGI scope; the route table is fed by hand (one deployment, one ready pod
at ``PAYPER_BENCH_UPSTREAM``), as the gateway's watches would. Not a product: the bounds
the hand-written server enforces are the ASGI server's own here.

    PAYPER_BENCH_UPSTREAM=10.0.0.7:8000 granian --interface asgi asgi_gateway:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from asgi_proxy import Receive, Scope, Send, lifespan
from payper.gateway.proxy import Gateway, GatewaySettings
from payper.gateway.server import ClientGone, Request
from payper.gateway.targets import Targets

UPSTREAM = os.environ.get("PAYPER_BENCH_UPSTREAM", "127.0.0.1:8000")
NAMESPACE, NAME = os.environ.get("PAYPER_BENCH_PREFIX", "/bench/echo").strip("/").split("/")


def _targets() -> Targets:
    host, _, port = UPSTREAM.rpartition(":")
    targets = Targets()
    container = {"name": "s", "image": "i", "ports": [{"containerPort": int(port)}]}
    targets.upsert_deployment(
        {
            "metadata": {"namespace": NAMESPACE, "name": NAME},
            "spec": {"template": {"spec": {"containers": [container]}}},
        }
    )
    targets.upsert_pod(
        NAME,
        {
            "metadata": {"namespace": NAMESPACE, "name": f"{NAME}-0", "uid": "uid-0"},
            "status": {
                "phase": "Running",
                "podIP": host,
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        },
    )
    return targets


async def _poke(namespace: str, name: str) -> None:
    return None


GATEWAY = Gateway(_targets(), GatewaySettings(domain="payper.local"), _poke)


class AsgiRequest:
    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.method: str = scope["method"]
        raw = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        self.target = (raw + (b"?" + query if query else b"")).decode("latin-1")
        self.headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        self.remote: str = (scope.get("client") or ("", 0))[0]
        length = self.header(b"content-length")
        self.content_length = int(length) if length is not None else None
        chunked = "chunked" in (self.header(b"transfer-encoding") or "").lower()
        self.expects_body = chunked or bool(self.content_length)
        self._receive = receive

    header = Request.header  # the gateway's own lookup: it reads only ``self.headers``

    async def body_chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                return

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.body_chunks()])


class AsgiResponder:
    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 0

    @staticmethod
    def _headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
        return [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]

    async def send(
        self, status: int, headers: list[tuple[str, str]], body: bytes, reason: str = ""
    ) -> None:
        self.status = status
        await self._send(
            {"type": "http.response.start", "status": status, "headers": self._headers(headers)}
        )
        await self._send({"type": "http.response.body", "body": body})

    async def start(
        self, status: int, reason: str, headers: list[tuple[str, str]], content_length: int | None
    ) -> None:
        self.status = status
        fields = self._headers(headers)
        if content_length is not None:
            fields.append((b"content-length", str(content_length).encode()))
        await self._send({"type": "http.response.start", "status": status, "headers": fields})

    async def write(self, chunk: bytes) -> None:
        if chunk:
            await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b""})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    await GATEWAY.handle(AsgiRequest(scope, receive), AsgiResponder(send))  # type: ignore[arg-type]
