"""The gateway's HTTP path without a cluster: raw server + proxy + upstream pool.

A local aiohttp app plays the pod; ``Targets`` is fed by hand, as the watches would.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from payper.gateway import server, upstream
from payper.gateway.proxy import Gateway, GatewaySettings
from payper.gateway.targets import Endpoint, Targets
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
        state.seen.append({"path": request.path_qs, "headers": dict(request.headers)})
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
    # A stranger's X-Forwarded-For is not believed: the gateway says what it saw.
    assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert seen["headers"]["X-Forwarded-Host"] == "gw.test"
    assert seen["headers"]["Forwarded"] == 'for=127.0.0.1;host="gw.test";proto=http'


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


def _pod(name: str, ip: str = "127.0.0.1", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": "ns", "name": name, "uid": f"uid-{name}"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


async def test_a_stream_outlives_its_pod_s_endpoint_and_new_requests_go_elsewhere(
    gateway: tuple[int, Targets],
) -> None:
    """A pod being deleted (still Ready: its preStop runs) gets no new request, and the
    stream it serves goes on to its end."""
    port, targets = gateway
    target = targets.get(("ns", "m"))
    assert target is not None
    picked: list[str] = []
    pick = target.pick

    def recorded() -> Endpoint | None:
        endpoint = pick()
        picked.append(endpoint.pod if endpoint else "")
        return endpoint

    target.pick = recorded  # type: ignore[method-assign]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /ns/m/stream?n=8&delay=0.05 HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    )
    data = b""
    async with asyncio.timeout(5):
        while b"data: 0" not in data:
            data += await reader.read(65536)
        streaming = target.endpoints["p"]
        assert streaming.in_flight == 1
        targets.upsert_pod("m", _pod("q"))  # a second replica
        targets.upsert_pod("m", _pod("p", deleting=True))  # the scale-down picked p
        assert set(target.endpoints) == {"q"}
        small = await exchange(
            port, b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        assert small.startswith(b"HTTP/1.1 200")
        assert picked == ["p", "q"], "the new request went to q"
        while chunk := await reader.read(65536):
            data += chunk
    writer.close()
    assert all(b"data: %d" % index in data for index in range(8))
    assert data.endswith(b"0\r\n\r\n"), "the stream ended properly, not cut"
    assert streaming.in_flight == 0


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
    assert huge.startswith(b"HTTP/1.1 431")
    many = b"".join(b"X-%d: 1\r\n" % n for n in range(server.MAX_HEADERS + 1))
    crowded = await exchange(port, b"GET /ns/m/small HTTP/1.1\r\n" + many + b"\r\n")
    assert crowded.startswith(b"HTTP/1.1 431") and b"header fields" in crowded
    # One header line that never ends: refused once it outgrows the bound, not buffered.
    endless = await exchange(port, b"GET /ns/m/small HTTP/1.1\r\nX-Endless: " + b"e" * 300_000)
    assert endless.startswith(b"HTTP/1.1 431")
    two_hosts = await exchange(
        port,
        b"GET /small HTTP/1.1\r\nHost: m.ns.x.test\r\nHost: o.ns.x.test\r\nConnection: close\r\n\r\n",
    )
    assert two_hosts.startswith(b"HTTP/1.1 400") and b"more than one Host" in two_hosts
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


async def test_a_ready_pod_that_opens_its_port_late_is_waited_for_not_a_502() -> None:
    """kwok, or a kubelet whose readiness probe is lenient, says Ready before the
    process listens: the refused connections are retried, backing off, within the
    request's deadline, and the request is answered once the port opens."""
    late_port = free_port()
    settings = GatewaySettings(domain="x.test")
    proxy, port, listening = await _gateway_to(late_port, settings)

    async def pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        await writer.drain()
        writer.close()

    async def open_later() -> asyncio.Server:
        await asyncio.sleep(2.5)  # the pod's process is still starting (3 quick tries would fail)
        return await asyncio.start_server(pod, "127.0.0.1", late_port)

    opening = asyncio.create_task(open_later())
    try:
        data = await exchange(
            port, b"GET /ns/m/x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n", limit_s=10
        )
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"late")
    finally:
        (await opening).close()
        listening.close()
        proxy.close()


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


async def test_forged_forwarding_headers_are_dropped_and_trailers_never_become_headers(
    gateway: tuple[int, Targets], backend: Backend
) -> None:
    """A stranger claims to be someone else (X-Forwarded-*, Forwarded, X-Real-IP) and
    smuggles a header in a chunked body's trailers: the upstream sees none of it."""
    port, _ = gateway
    raw = (
        b"POST /ns/m/echo HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n"
        b"X-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: bank.example\r\nForwarded: for=10.9.9.9\r\nX-Real-IP: 10.9.9.9\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Smuggled: yes\r\nAuthorization: Bearer stolen\r\n\r\n"
    )
    data = await exchange(port, raw)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"0\r\n\r\n")
    headers = backend.seen[-1]["headers"]
    assert "X-Smuggled" not in headers and "Authorization" not in headers
    assert "X-Real-IP" not in headers
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert (headers["X-Forwarded-Proto"], headers["X-Forwarded-Host"]) == ("http", "gw.test")
    assert headers["Forwarded"] == 'for=127.0.0.1;host="gw.test";proto=http'


async def test_a_trusted_proxy_s_forwarding_headers_are_extended(backend: Backend) -> None:
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    settings = GatewaySettings(domain="x.test", trusted_proxies=trusted)
    proxy, port, listening = await _gateway_to(backend.port, settings)
    try:
        raw = (
            b"GET /ns/m/small HTTP/1.1\r\nHost: gw.internal\r\nConnection: close\r\n"
            b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: api.example\r\nForwarded: for=203.0.113.7;proto=https\r\n\r\n"
        )
        assert (await exchange(port, raw)).startswith(b"HTTP/1.1 200")
    finally:
        listening.close()
        proxy.close()
    headers = backend.seen[-1]["headers"]
    assert headers["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert (headers["X-Forwarded-Proto"], headers["X-Forwarded-Host"]) == ("https", "api.example")
    assert headers["Forwarded"] == (
        'for=203.0.113.7;proto=https, for=127.0.0.1;host="api.example";proto=https'
    )


@pytest.fixture
async def bounded() -> AsyncIterator[tuple[int, server.Connections, asyncio.Event]]:
    """A bare server with small limits whose handler answers once ``release`` is set."""
    release = asyncio.Event()

    async def handler(request: server.Request, responder: server.Responder) -> None:
        await release.wait()
        await responder.send(200, [], b"ok")

    limits = server.Limits(
        max_connections=2, max_pipelined=4, header_timeout_s=0.3, idle_timeout_s=0.3
    )
    connections = server.Connections(limits)
    port = free_port()
    listening = await server.serve(handler, "127.0.0.1", port, connections=connections)
    yield port, connections, release
    listening.close()


async def until(condition: Any, limit_s: float = 5) -> None:
    """Until the server's own state says so (it has no event to wait on), within a bound."""
    async with asyncio.timeout(limit_s):
        while not condition():  # noqa: ASYNC110 - polls state that has no event
            await asyncio.sleep(0.01)


async def test_connections_beyond_the_bound_get_503_and_are_closed(
    bounded: tuple[int, server.Connections, asyncio.Event],
) -> None:
    port, connections, release = bounded
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await until(lambda: len(connections.live) == 2)
    refused = await exchange(port, b"")
    assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in refused
    assert len(connections.live) == 2
    for _, writer in held:
        writer.close()
    await until(lambda: not connections.live)
    release.set()


async def test_pipelined_requests_beyond_the_bound_wait_in_the_socket_not_in_memory(
    bounded: tuple[int, server.Connections, asyncio.Event],
) -> None:
    """A client pipelines 200 requests and reads nothing: the server parses at most its
    bound ahead and stops reading; once answers flow, every request is served."""
    port, connections, release = bounded
    request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request * 200)
    await until(lambda: len(connections.live) == 1)
    (connection,) = connections.live
    await until(lambda: connection._reading_paused)
    # Parsing stops at the piece in which the bound was reached: at most one piece more.
    bound = connections.limits.max_pipelined + server.FEED_PIECE // len(request)
    for _ in range(20):  # the loop runs, more bytes wait: still within the bound
        await asyncio.sleep(0.01)
        assert len(connection.requests) <= bound < 200
    release.set()
    answers = b""
    async with asyncio.timeout(10):
        while answers.count(b"HTTP/1.1 200") < 200:
            answers += await reader.read(65536)
    writer.close()


async def test_a_slow_head_gets_408_and_an_idle_connection_is_closed(
    bounded: tuple[int, server.Connections, asyncio.Event],
) -> None:
    port, connections, release = bounded
    release.set()
    slow = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow")  # never finished
    assert slow.startswith(b"HTTP/1.1 408")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    data = b""
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):  # until the server closes the idle link
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok")
    writer.close()
    await until(lambda: not connections.live)


async def _gateway_to(
    port: int, settings: GatewaySettings, scaling: dict[str, Any] | None = None
) -> tuple[Gateway, int, Any]:
    targets = Targets()
    targets.upsert_deployment(
        {
            "metadata": {"namespace": "ns", "name": "m"},
            "spec": {
                "scaling": scaling or {},
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "s", "image": "i", "ports": [{"containerPort": port}]}
                        ]
                    }
                },
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

    proxy = Gateway(targets, settings, poke)
    gateway_port = free_port()
    listening = await server.serve(proxy.handle, "127.0.0.1", gateway_port)
    return proxy, gateway_port, listening


async def test_a_pod_s_silence_is_a_504_and_its_giant_head_a_502() -> None:
    """A tenant's own pod misbehaves against the gateway: it never answers, or answers
    with an endless head. Neither holds the gateway for long nor makes it buffer."""
    mode = {"reply": b""}

    async def pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if mode["reply"]:
            writer.write(mode["reply"])
            await writer.drain()
        await asyncio.sleep(30)  # then say nothing more

    pod_port = free_port()
    pod_server = await asyncio.start_server(pod, "127.0.0.1", pod_port)
    settings = GatewaySettings(domain="x.test", upstream_response_head_timeout_s=0.3)
    proxy, port, listening = await _gateway_to(pod_port, settings)
    try:
        silent = await exchange(
            port, b"GET /ns/m/x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        assert silent.startswith(b"HTTP/1.1 504") and b"no response head" in silent
        mode["reply"] = b"HTTP/1.1 200 OK\r\n" + b"X-Junk: " + b"j" * 70_000 + b"\r\n"
        giant = await exchange(
            port, b"GET /ns/m/x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        assert giant.startswith(b"HTTP/1.1 502") and b"response head over" in giant
        mode["reply"] = (
            b"HTTP/1.1 200 OK\r\n"
            + b"".join(b"X-%d: 1\r\n" % n for n in range(upstream.MAX_HEADERS + 1))
            + b"Content-Length: 0\r\n\r\n"
        )
        crowded = await exchange(
            port, b"GET /ns/m/x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        assert crowded.startswith(b"HTTP/1.1 502") and b"100 fields" in crowded
    finally:
        listening.close()
        proxy.close()
        pod_server.close()


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


@pytest.mark.parametrize(
    ("platform_queue", "deployment_queue", "workers"),
    [
        (1, None, 1),  # the platform's cap
        (100, 1, 1),  # a deployment may ask for less
        (1, 50, 1),  # but never for more
        (100, 2, 2),  # shared among a gateway's workers, like the platform's cap
    ],
)
async def test_a_replica_is_sent_at_most_its_concurrency_the_rest_queue_then_429(
    backend: Backend, platform_queue: int, deployment_queue: int | None, workers: int
) -> None:
    """containerConcurrency 1: a second request waits for the first to finish (never two
    on the replica at once); with the queue (here 1) full, a third is told 429 (the
    deployment is warm, just busy), with Retry-After."""
    settings = GatewaySettings(domain="x.test", max_queue=platform_queue, workers=workers)
    scaling: dict[str, Any] = {"containerConcurrency": 1}
    if deployment_queue is not None:
        scaling["maxQueue"] = deployment_queue
    proxy, port, listening = await _gateway_to(backend.port, settings, scaling)
    target = proxy.targets.get(("ns", "m"))
    assert target is not None
    (endpoint,) = target.endpoints.values()
    try:
        first = asyncio.create_task(
            exchange(
                port,
                b"GET /ns/m/stream?n=4&delay=0.25 HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
            )
        )
        await until(lambda: endpoint.in_flight == 1)
        second = asyncio.create_task(
            exchange(port, b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        )
        await until(lambda: target.queued == 1)
        assert endpoint.in_flight == 1, "the second waits: the replica is at its cap"
        third = await exchange(
            port, b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        assert third.startswith(b"HTTP/1.1 429") and b"Retry-After: 5" in third
        assert b"queue is full (1 requests)" in third
        assert (await first).startswith(b"HTTP/1.1 200")
        assert (await second).startswith(b"HTTP/1.1 200")
        assert b"X-Payper-Cold-Start-Ms" not in (await second), "a busy wait is no cold start"
    finally:
        listening.close()
        proxy.close()


async def test_a_cold_deployment_that_holds_nothing_is_woken_but_not_flooded_with_pokes() -> None:
    """maxQueue 0 at zero replicas: each request is told 503 with Retry-After at once, and
    the deployment is still woken, with one poke however many requests arrive."""
    targets = Targets()
    targets.upsert_deployment(
        {
            "metadata": {"namespace": "ns", "name": "m"},
            "spec": {
                "scaling": {"maxQueue": 0},
                "template": {"spec": {"containers": [{"name": "s", "image": "i"}]}},
            },
        }
    )
    pokes: list[tuple[str, str]] = []

    async def poke(namespace: str, name: str) -> None:
        pokes.append((namespace, name))

    proxy = Gateway(targets, GatewaySettings(domain="x.test"), poke)
    port = free_port()
    listening = await server.serve(proxy.handle, "127.0.0.1", port)
    try:
        answers = await asyncio.gather(
            *(
                exchange(port, b"GET /ns/m/v1 HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
                for _ in range(50)
            )
        )
        await until(lambda: bool(pokes))
        await asyncio.sleep(0.1)  # any further poke task would have run by now
    finally:
        listening.close()
        proxy.close()
    assert all(a.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in a for a in answers)
    assert b"is starting and its queue is full (0 requests)" in answers[0]
    assert pokes == [("ns", "m")]


async def test_websocket_and_http2_are_refused_with_a_clear_answer(
    gateway: tuple[int, Targets], backend: Backend
) -> None:
    port, _ = gateway
    websocket = await exchange(
        port,
        b"GET /ns/m/small HTTP/1.1\r\nHost: g\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    assert websocket.startswith(b"HTTP/1.1 501") and b"WebSocket" in websocket
    h2 = await exchange(port, server.H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    assert h2.startswith(b"HTTP/1.1 505") and b"gRPC" in h2
    assert backend.seen == [], "neither reached a pod"
