"""The gateway's hand-written HTTP/1.1 server under generated input (hypothesis): framing
that must come out exactly as it went in, smuggling that must never reach a handler, and
bytes no client should send, each answered or closed within a bounded time.

The server (``payper.gateway.server``) is driven over a real loopback socket with a
handler that records what it is given and answers each request with its sequence
number; what a client sees is parsed back with httptools' response parser.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payper.gateway import server
from payper_dev.loopback import free_port

LIMIT_S = 5.0
"""Every exchange ends (answered or closed) within this: a hang is a failure."""
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Seen:
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)


async def _serve(seen: Seen) -> tuple[asyncio.Server, int]:
    async def handler(request: server.Request, responder: server.Responder) -> None:
        body = await request.read()
        seen.requests.append((request.method, request.target, body))
        await responder.send(200, [("X-Seq", str(len(seen.requests)))], body)

    port = free_port()
    return await server.serve(handler, "127.0.0.1", port), port


async def _talk(pieces: list[bytes], limit_s: float = LIMIT_S) -> tuple[Seen, bytes]:
    """Write the pieces one after another, then read until the server closes or the
    client has waited ``limit_s``; what the handler saw, and what came back."""
    seen = Seen()
    listening, port = await _serve(seen)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        received = b""
        try:
            async with asyncio.timeout(limit_s):
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                writer.write_eof()
                while chunk := await reader.read(65536):
                    received += chunk
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
        return seen, received
    finally:
        listening.close()


class _Responses:
    """httptools' response parser, collecting each response's status, X-Seq and body."""

    def __init__(self) -> None:
        self.done: list[tuple[int, str, bytes]] = []
        self._seq = ""
        self._body = b""
        self._name = b""
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-seq":
            self._seq = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._seq, self._body))
        self._seq, self._body = "", b""


def responses(raw: bytes) -> list[tuple[int, str, bytes]]:
    parsed = _Responses()
    parsed.parser.feed_data(raw)
    return parsed.done


# -- framing: what goes in comes out -----------------------------------------------------
paths = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/", min_size=0, max_size=40)
bodies = st.binary(min_size=0, max_size=3000)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, tuple[str, str, bytes]]:
    """One well-formed request: its bytes, and what the handler must see."""
    path = "/" + draw(paths)
    body = draw(bodies)
    framing = draw(
        st.sampled_from(["none", "length", "chunked"] if not body else ["length", "chunked"])
    )
    method = "GET" if framing == "none" else draw(st.sampled_from(["POST", "PUT", "PATCH"]))
    head = f"{method} {path} HTTP/1.1\r\nHost: gateway.test\r\n"
    if framing == "length":
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body, (method, path, body)
    if framing == "none":
        return (head + "\r\n").encode(), (method, path, b"")
    # Chunked: random chunk sizes, hex in either case, extensions now and then, a trailer.
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=6, unique=True)))
    out = (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
    start = 0
    for end in [*cuts, len(body)]:
        if end > start:
            size = format(end - start, draw(st.sampled_from(["x", "X"])))
            extension = draw(st.sampled_from(["", ";name=value", ";x"]))
            out += f"{size}{extension}\r\n".encode() + body[start:end] + b"\r\n"
            start = end
    trailer = draw(st.sampled_from(["", "X-Trailer: t\r\n"]))
    out += f"0\r\n{trailer}\r\n".encode()
    return out, (method, path, body)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return [p for p in pieces if p]


@SETTINGS
@given(st.lists(requests(), min_size=1, max_size=6), st.lists(st.integers(0, 10**6), max_size=8))
def test_pipelined_requests_arrive_whole_and_in_order_however_the_bytes_are_split(
    pipeline: list[tuple[bytes, tuple[str, str, bytes]]], cuts: list[int]
) -> None:
    data = b"".join(raw for raw, _ in pipeline)
    seen, received = asyncio.run(_talk(split(data, cuts)))
    assert seen.requests == [expected for _, expected in pipeline]
    got = responses(received)
    assert [(status, seq) for status, seq, _ in got] == [
        (200, str(n + 1)) for n in range(len(pipeline))
    ], "one answer per request, in order"
    assert [body for _, _, body in got] == [expected[2] for _, expected in pipeline]


# -- smuggling: a second request hidden in a body never reaches a handler -------------------
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: gateway.test\r\n\r\n"


@st.composite
def ambiguous(draw: st.DrawFn) -> bytes:
    """A request whose framing two parsers could read differently, with a request hidden
    where one of them would see it."""
    hidden = b"0\r\n\r\n" + SMUGGLED
    kind = draw(
        st.sampled_from(
            [
                "length-and-chunked",
                "chunked-and-length",
                "two-lengths",
                "length-list",
                "te-not-chunked-last",
                "te-obfuscated",
                "bad-chunk-size",
                "chunk-size-overflow",
                "signed-length",
                "space-before-colon",
            ]
        )
    )
    head = b"POST /ns/m/x HTTP/1.1\r\nHost: gateway.test\r\n"
    if kind == "length-and-chunked":
        return (
            head
            + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(hidden)
            + hidden
        )
    if kind == "chunked-and-length":
        return head + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n" + hidden
    if kind == "two-lengths":
        return head + b"Content-Length: 5\r\nContent-Length: %d\r\n\r\n" % len(hidden) + hidden
    if kind == "length-list":
        return head + b"Content-Length: 5, %d\r\n\r\n" % len(hidden) + hidden
    if kind == "te-not-chunked-last":
        return head + b"Transfer-Encoding: chunked, identity\r\n\r\n" + hidden
    if kind == "te-obfuscated":
        te = draw(
            st.sampled_from(
                [
                    b"Transfer-Encoding: xchunked",
                    b"Transfer-Encoding : chunked",
                    b"Transfer-Encoding:\tchunked\x0b",
                ]
            )
        )
        return head + te + b"\r\nContent-Length: 3\r\n\r\n" + hidden
    if kind == "bad-chunk-size":
        return (
            head
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + draw(st.sampled_from([b"-1", b"0x5", b"5 5", b"g"]))
            + b"\r\nhello\r\n"
            + hidden
        )
    if kind == "chunk-size-overflow":
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\nhello\r\n" + hidden
    if kind == "signed-length":
        length = draw(st.sampled_from([b"+5", b"-5", b"5_0", b" 0x5", b"5.0"]))
        return head + b"Content-Length: " + length + b"\r\n\r\nhello" + SMUGGLED
    return head + b"Content-Length : 5\r\n\r\nhello" + SMUGGLED


@SETTINGS
@given(ambiguous(), st.lists(st.integers(0, 10**6), max_size=4))
def test_ambiguous_framing_is_refused_and_no_hidden_request_reaches_a_handler(
    raw: bytes, cuts: list[int]
) -> None:
    seen, received = asyncio.run(_talk(split(raw, cuts)))
    assert all(target != "/smuggled" for _, target, _ in seen.requests), seen.requests
    assert received.startswith(b"HTTP/1.1 400"), received[:200]
    assert not seen.requests, "an ambiguous request is refused, not half-served"


# -- garbage: answered or closed, in bounded time, and the server still serves ---------------
@SETTINGS
@given(
    st.one_of(
        st.binary(min_size=1, max_size=4096),
        st.builds(
            lambda prefix, junk: prefix + junk,
            st.sampled_from(
                [
                    b"GET / HTTP/1.1\r\n",
                    b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n",
                    b"GET /",
                    b"\r\n\r\n",
                ]
            ),
            st.binary(max_size=2048),
        ),
    )
)
def test_any_bytes_are_answered_or_closed_in_bounded_time(junk: bytes) -> None:
    async def scenario() -> tuple[Seen, bytes, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        seen, received = await _talk([junk], limit_s=LIMIT_S)
        return seen, received, loop.time() - started

    seen, received, took = asyncio.run(scenario())
    assert took < LIMIT_S, "the server neither answered nor closed (it waits for more)"
    # Whatever came back is HTTP/1.1 responses, one per request the handler was given,
    # plus at most one refusal.
    assert not received or received.startswith(b"HTTP/1.1 "), received[:100]
    got = responses(received) if received else []
    answered = [r for r in got if r[0] == 200]
    assert len(answered) <= len(seen.requests)
    assert all(status in {200, 400, 408, 413, 431, 501, 505} for status, _, _ in got), got
