"""The gateway's HTTP path without a cluster: raw server + proxy + upstream pool.

A local aiohttp app plays the pod; ``Targets`` is fed by hand, as the watches would.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from payper.gateway import server
from payper.gateway.proxy import Gateway, GatewaySettings
from payper.gateway.targets import Targets
from payper_dev.loopback import free_port


@dataclass
class Backend:
    port: int
    peers: set[Any] = field(default_factory=set)
    cancelled: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def connections(self) -> int:
        """Distinct client connections (source ports) the backend has served."""
        return len(self.peers)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    state = Backend(free_port())

    async def small(request: web.Request) -> web.Response:
        assert request.transport is not None
        state.peers.add(request.transport.get_extra_info("peername"))
        state.seen.append({"path": request.path_qs, "headers": dict(request.headers)})
        return web.Response(
            text="hello",
            headers={"X-Backend": "1", "Connection": "keep-alive, X-Drop", "X-Drop": "1"},
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for index in range(int(request.query.get("n", "5"))):
                await response.write(f"data: {index}\n\n".encode())
                await asyncio.sleep(float(request.query.get("delay", "0")))
        except asyncio.CancelledError:
            state.cancelled += 1
            raise
        await response.write_eof()
        return response

    async def echo(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        async for chunk in request.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=b"z" * 200_000)

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/stream", stream)
    app.router.add_post("/echo", echo)
    app.router.add_get("/big", big)

    runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", state.port).start()
    yield state
    await runner.cleanup()


@pytest.fixture
async def gateway(backend: Backend) -> AsyncIterator[tuple[int, Targets]]:
    targets = Targets()
    targets.upsert_deployment(
        {
            "metadata": {"namespace": "ns", "name": "m"},
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "s", "image": "i", "ports": [{"containerPort": backend.port}]}
                        ]
                    }
                },
                "scaling": {"coldStartTimeoutSeconds": 2},
            },
        }
    )
    targets.upsert_pod(
        "m",
        {
            "metadata": {"namespace": "ns", "name": "p", "uid": "uid-p"},
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        },
    )

    async def poke(namespace: str, name: str) -> None:
        return None

    proxy = Gateway(targets, GatewaySettings(domain="x.test"), poke)
    port = free_port()
    listening = await server.serve(proxy.handle, "127.0.0.1", port)
    yield port, targets
    listening.close()
    proxy.close()


async def exchange(port: int, raw: bytes, until: bytes | None = None, limit_s: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = b""
    try:
        async with asyncio.timeout(limit_s):
            while until is None or until not in data:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
    finally:
        writer.close()
    return data


async def test_small_response_filters_hop_by_hop_and_adds_forwarding(
    gateway: tuple[int, Targets], backend: Backend
) -> None:
    port, _ = gateway
    raw = (
        b"GET /ns/m/small?q=1 HTTP/1.1\r\nHost: gw.test\r\nConnection: close, X-Secret\r\n"
        b"X-Secret: 1\r\nX-Forwarded-For: 10.0.0.1\r\nX-Keep: yes\r\n\r\n"
    )
    data = await exchange(port, raw)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert body == b"hello"
    assert b"X-Backend: 1" in head
    assert b"X-Drop" not in head
    assert b"Connection: close" in head
    seen = backend.seen[-1]
    assert seen["path"] == "/small?q=1"
    assert "X-Secret" not in seen["headers"]
    assert seen["headers"]["X-Keep"] == "yes"
    assert seen["headers"]["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert seen["headers"]["X-Forwarded-Host"] == "gw.test"


async def test_keep_alive_reuses_one_upstream_connection(
    gateway: tuple[int, Targets], backend: Backend
) -> None:
    port, _ = gateway
    raw = b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\n\r\n" * 20
    data = await exchange(
        port, raw + b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    )
    assert data.count(b"HTTP/1.1 200 OK") == 21, "pipelined requests are answered in order"
    assert backend.connections == 1


async def test_a_pod_that_closed_an_idle_connection_is_retried_transparently(
    gateway: tuple[int, Targets], backend: Backend
) -> None:
    port, _ = gateway
    first = await exchange(
        port, b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    )
    await asyncio.sleep(
        1.2
    )  # the backend's keep-alive timeout (0.5 s) closes the pooled connection
    second = await exchange(
        port, b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    )
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200")
    assert backend.connections == 2


async def test_head_has_no_body_and_keeps_the_connection_usable(
    gateway: tuple[int, Targets],
) -> None:
    port, _ = gateway
    raw = (
        b"HEAD /ns/m/small HTTP/1.1\r\nHost: g\r\n\r\n"
        b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    )
    data = await exchange(port, raw)
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert data.endswith(b"\r\n\r\nhello")


async def test_streams_are_rechunked_and_http10_gets_a_close_delimited_body(
    gateway: tuple[int, Targets],
) -> None:
    port, _ = gateway
    data = await exchange(
        port, b"GET /ns/m/stream?n=3 HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body.endswith(b"0\r\n\r\n")
    assert b"data: 2" in body
    data10 = await exchange(port, b"GET /ns/m/stream?n=3 HTTP/1.0\r\n\r\n")
    head, _, body = data10.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_request_bodies_fixed_and_chunked(gateway: tuple[int, Targets]) -> None:
    port, _ = gateway
    fixed = await exchange(
        port,
        b"POST /ns/m/echo HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nabcde",
    )
    assert fixed.endswith(b"5\r\nabcde\r\n0\r\n\r\n")
    chunked = await exchange(
        port,
        b"POST /ns/m/echo HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n"
        b"Expect: 100-continue\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    assert chunked.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    body = chunked.partition(b"\r\n\r\nHTTP/1.1 200 OK")[2].partition(b"\r\n\r\n")[2]
    decoded = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        decoded += body[:size]
        body = body[size + 2 :]
    assert decoded == b"abcde"


async def test_large_responses_stream_with_their_length(gateway: tuple[int, Targets]) -> None:
    port, _ = gateway
    data = await exchange(port, b"GET /ns/m/big HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 200000" in head
    assert body == b"z" * 200_000


async def test_client_disconnect_cancels_the_upstream_request(
    gateway: tuple[int, Targets], backend: Backend
) -> None:
    port, _ = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /ns/m/stream?n=100&delay=0.05 HTTP/1.1\r\nHost: g\r\n\r\n")
    await reader.readuntil(b"data: 0")
    writer.close()
    for _ in range(40):
        if backend.cancelled:
            break
        await asyncio.sleep(0.05)
    assert backend.cancelled == 1


async def test_malformed_requests_get_400_and_unknown_routes_404(
    gateway: tuple[int, Targets],
) -> None:
    port, _ = gateway
    bad = await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400")
    huge = await exchange(
        port, b"GET /ns/m/small HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    )
    assert huge.startswith(b"HTTP/1.1 400")
    unrouted = REGISTRY.get_sample_value("payper_gateway_unrouted_requests_total") or 0
    missing = await exchange(
        port, b"GET /ns/absent/x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    )
    assert missing.startswith(b"HTTP/1.1 404")
    assert b'"status": 404' in missing
    # Counted without the client's names as labels: they would be unbounded series.
    assert REGISTRY.get_sample_value("payper_gateway_unrouted_requests_total") == unrouted + 1
    labels = {"namespace": "ns", "inference_deployment": "absent", "code": "404"}
    assert REGISTRY.get_sample_value("payper_gateway_requests_total", labels) is None
    health = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
    assert health.endswith(b"ok")


async def test_a_dead_endpoint_ends_in_502(gateway: tuple[int, Targets]) -> None:
    port, targets = gateway
    targets.upsert_pod(
        "m",
        {
            "metadata": {"namespace": "ns", "name": "p", "uid": "uid-p"},
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.9",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        },
    )
    data = await exchange(
        port, b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n", limit_s=10
    )
    assert data.startswith(b"HTTP/1.1 502")


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\n\r\nabcde",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n",
    ],
)
async def test_a_request_body_survives_a_retry_on_another_endpoint(
    gateway: tuple[int, Targets], framing: bytes
) -> None:
    port, targets = gateway
    live = {
        "metadata": {"namespace": "ns", "name": "p", "uid": "uid-p"},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    targets.remove_pod("m", live)
    targets.upsert_pod(  # tried first: nothing listens there
        "m",
        {
            "metadata": {"namespace": "ns", "name": "dead", "uid": "uid-dead"},
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.9",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        },
    )
    targets.upsert_pod("m", live)
    echoed = await exchange(
        port, b"POST /ns/m/echo HTTP/1.1\r\nHost: g\r\nConnection: close\r\n" + framing, limit_s=10
    )
    assert echoed.startswith(b"HTTP/1.1 200 OK")
    assert echoed.endswith(b"5\r\nabcde\r\n0\r\n\r\n")


async def test_an_unread_body_awaiting_100_continue_closes_after_the_answer(
    gateway: tuple[int, Targets],
) -> None:
    port, _ = gateway
    data = await exchange(  # the client holds the body back until it hears 100 Continue
        port,
        b"POST /ns/absent/x HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 404")
    assert b"100 Continue" not in data, "no invitation to send a body after the final answer"


KEY = "the-key-" + "k" * 40


@pytest.fixture
async def guarded(backend: Backend) -> AsyncIterator[int]:
    """A gateway with requireAuth: deployment ns/m has one published key."""
    targets = Targets(require_auth=True)
    targets.upsert_deployment(
        {
            "metadata": {"namespace": "ns", "name": "m"},
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "s", "image": "i", "ports": [{"containerPort": backend.port}]}
                        ]
                    }
                },
                "auth": {"secretName": "keys"},
            },
            "status": {
                "auth": {
                    "secretName": "keys",
                    "keyDigests": [hashlib.sha256(KEY.encode()).hexdigest()],
                }
            },
        }
    )
    targets.upsert_pod(
        "m",
        {
            "metadata": {"namespace": "ns", "name": "p", "uid": "uid-p"},
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        },
    )

    async def poke(namespace: str, name: str) -> None:
        return None

    proxy = Gateway(targets, GatewaySettings(domain="x.test"), poke)
    port = free_port()
    listening = await server.serve(proxy.handle, "127.0.0.1", port)
    yield port
    listening.close()
    proxy.close()


@pytest.mark.parametrize(
    "credentials",
    [
        b"",
        b"Authorization: Bearer wrong\r\n",
        b"Authorization: Basic " + KEY.encode() + b"\r\n",
        b"Authorization: Bearer " + KEY.encode() + b"x\r\n",
        b"Authorization: \xff\xfe\r\n",
    ],
)
async def test_require_auth_answers_alike_whether_or_not_the_deployment_exists(
    guarded: int, backend: Backend, credentials: bytes
) -> None:
    answers = set()
    for route in (
        b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\n",
        b"GET /ns/absent/small HTTP/1.1\r\nHost: g\r\n",
        b"GET /other-ns/m/small HTTP/1.1\r\nHost: g\r\n",
        b"GET /small HTTP/1.1\r\nHost: m.ns.x.test\r\n",
        b"GET /small HTTP/1.1\r\nHost: absent.ns.x.test\r\n",
        b"POST /ns/absent/small HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\n",
    ):
        body = b"abc" if route.startswith(b"POST") else b""
        raw = route + credentials + b"Connection: close\r\n\r\n" + body
        answers.add(await exchange(guarded, raw))
    assert len(answers) == 1, answers
    (answer,) = answers
    assert answer.startswith(b"HTTP/1.1 401")
    assert b'WWW-Authenticate: Bearer realm="payper"' in answer
    assert backend.seen == []


async def test_require_auth_serves_a_valid_key_and_keeps_it_from_the_pod(
    guarded: int, backend: Backend
) -> None:
    answer = await exchange(
        guarded,
        b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"hello")
    assert "Authorization" not in backend.seen[0]["headers"]
