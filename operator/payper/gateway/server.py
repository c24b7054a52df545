"""The gateway's client-facing HTTP/1.1 server: an asyncio protocol over ``httptools``.

A general web framework spends more CPU per request than the whole proxy hop should
(measured in ``bench/gateway_overhead.py``), so the tenant-facing port speaks HTTP/1.1
directly: llhttp parses, one task per connection handles its requests in order
(pipelined requests wait their turn), request bodies stream in with back-pressure, and
responses are written either with a length or chunked. A client that disconnects
cancels its connection's task, and with it the upstream request.

The admin port (/metrics, /healthz) stays on aiohttp, where speed does not matter.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import httptools

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
"""Header fields per request head (and per trailer section): beyond, 431."""
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
LINGER_S = 2.0
"""After a refusal, how long the client's further bytes are read and discarded."""
FEED_PIECE = 1024
"""Bytes handed to the parser at once: after each piece the bounds are checked."""
BODY_HIGH_WATER = 16
"""Request body chunks buffered before the server stops reading from the client."""
REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True)
class Limits:
    """What one stranger with a TCP socket may make the gateway hold. Beyond each, the
    connection is answered and closed (or reading pauses), never buffered without end."""

    max_connections: int = 4096
    """Open client connections per gateway process; beyond, 503 with Retry-After."""
    max_pipelined: int = 16
    """Requests parsed ahead on one connection; beyond, reading pauses until they drain."""
    header_timeout_s: float = 10.0
    """From a connection's (or request's) first byte to its complete head; then 408."""
    idle_timeout_s: float = 75.0
    """A keep-alive connection with no request in flight is closed after this long."""


@dataclass
class Connections:
    """The live client connections of one server (for the connection bound)."""

    limits: Limits = field(default_factory=Limits)
    live: set[_Connection] = field(default_factory=set)


class ClientGone(Exception):  # noqa: N818 - control flow: the peer closed the connection
    pass


class UpgradeRefused(httptools.HttpParserError):
    """An Upgrade (or CONNECT) request: refused with 501, never forwarded."""


class HeadTooLarge(httptools.HttpParserError):
    """The request head (or its trailers) is over ``MAX_HEAD_BYTES`` or ``MAX_HEADERS``."""


@dataclass
class Request:
    method: str
    target: str
    """The raw request target (path and query)."""
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    http_minor: int
    remote: str
    expects_body: bool
    content_length: int | None
    _connection: _Connection = field(repr=False)
    _continue_pending: bool = False
    """The client sent ``Expect: 100-continue`` and waits for it before sending the body."""
    _body: collections.deque[bytes | None] = field(default_factory=collections.deque)
    _body_event: asyncio.Event = field(default_factory=asyncio.Event)
    _consumed: bool = False

    def header(self, name: bytes) -> str | None:
        """The first header of that (lower-case) name, decoded."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    @property
    def buffered_chunks(self) -> int:
        """Body chunks received from the client and not read by the handler yet."""
        return len(self._body)

    @property
    def awaiting_continue(self) -> bool:
        """The client still holds back its body until it is sent ``100 Continue``."""
        return self._continue_pending

    @property
    def body_unread(self) -> bool:
        """The request has a body that was not read to its end."""
        return self.expects_body and not self._consumed

    def receive(self, chunk: bytes) -> None:
        """A body chunk arrived from the client."""
        self._body.append(chunk)
        self._body_event.set()

    def receive_end(self) -> None:
        """The body is complete (or there was none)."""
        self._body.append(None)
        self._body_event.set()

    def wake_reader(self) -> None:
        """Let a reader waiting for body chunks notice that the connection closed."""
        self._body_event.set()

    async def body_chunks(self) -> AsyncIterator[bytes]:
        if self._continue_pending:
            self._continue_pending = False
            self._connection.send_continue()
        while True:
            while not self._body:
                if self._connection.closed:
                    raise ClientGone
                self._body_event.clear()
                await self._body_event.wait()
            chunk = self._body.popleft()
            self._connection.body_consumed()
            if chunk is None:
                self._consumed = True
                return
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.body_chunks()])


class Responder:
    """Writes one response; ``send`` for a whole body, or ``start``/``write``/``end``."""

    def __init__(self, connection: _Connection, request: Request) -> None:
        self.connection = connection
        self.request = request
        self.status = 0
        self._chunked = False
        self._head_only = request.method == "HEAD"

    def _head(
        self, status: int, reason: str, headers: list[tuple[str, str]], framing: str
    ) -> bytes:
        self.status = status
        keep = "keep-alive" if self.request.keep_alive else "close"
        lines = [f"HTTP/1.1 {status} {reason or REASONS.get(status, '')}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if framing:
            lines.append(framing)
        lines.append(f"Connection: {keep}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(
        self, status: int, headers: list[tuple[str, str]], body: bytes, reason: str = ""
    ) -> None:
        head = self._head(status, reason, headers, f"Content-Length: {len(body)}")
        await self.connection.write(head if self._head_only else head + body)

    async def start(
        self, status: int, reason: str, headers: list[tuple[str, str]], content_length: int | None
    ) -> None:
        if content_length is not None:
            framing = f"Content-Length: {content_length}"
        elif self.request.http_minor == 0:
            framing = ""  # HTTP/1.0: the body ends with the connection
            self.request.keep_alive = False
        else:
            framing = "Transfer-Encoding: chunked"
            self._chunked = True
        await self.connection.write(self._head(status, reason, headers, framing))

    async def write(self, chunk: bytes) -> None:
        if self._head_only or not chunk:
            return
        if self._chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        await self.connection.write(chunk)

    async def end(self) -> None:
        if self._chunked and not self._head_only:
            await self.connection.write(b"0\r\n\r\n")


Handler = Callable[[Request, Responder], Awaitable[None]]


class _Connection(asyncio.Protocol):
    def __init__(self, handler: Handler, connections: Connections | None = None) -> None:
        self.handler = handler
        self.connections = connections or Connections()
        self.limits = self.connections.limits
        self._timer: asyncio.TimerHandle | None = None
        self._pipeline_full = False
        self._inbox = bytearray()
        """Received and not parsed yet: at most one read's worth (reading pauses)."""
        self._awaiting_head = True
        self._head_raw = 0
        """Bytes fed since the current request head began (bounded like the head)."""
        self._pumping = False
        self._rejected = False
        """A refusal was sent: the connection only lingers to let the client read it."""
        self._fresh = True
        """Nothing was received yet (the HTTP/2 preface can only come first)."""
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote = ""
        self.closed = False
        self.requests: collections.deque[Request] = collections.deque()
        self._request_ready = asyncio.Event()
        self._current: Request | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._header_count = 0
        self._in_trailers = False
        self._reading_paused = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if peer else ""
        if len(self.connections.live) >= self.limits.max_connections:
            self._reject(503, "too many connections", [("Retry-After", "1")])
            return
        self.connections.live.add(self)
        self._arm(self.limits.header_timeout_s, 408)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def _arm(self, seconds: float, status: int | None) -> None:
        """(Re)start the one timer: at its end, answer ``status`` (None: just close)."""
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired, status)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, status: int | None) -> None:
        self._timer = None
        if status is None:
            if self.transport is not None:
                self.transport.close()
        else:
            self._reject(status, "the request head did not arrive in time")

    def _apply_reading(self) -> None:
        """Pause reading while the body being received is backed up (high water to half
        of it) or the pipeline is full; resume when neither holds."""
        arriving = self.requests[-1] if self.requests else None
        if arriving is None:
            backed_up = False
        elif self._reading_paused:
            backed_up = arriving.buffered_chunks >= BODY_HIGH_WATER // 2
        else:
            backed_up = arriving.buffered_chunks >= BODY_HIGH_WATER
        self._pipeline_full = len(self.requests) >= self.limits.max_pipelined
        pause = backed_up or self._pipeline_full
        if self.transport is None or pause == self._reading_paused:
            return
        self._reading_paused = pause
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()
            self._pump()  # what arrived before the pause first

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return  # lingering after a refusal: discarded
        if self._fresh and data.startswith(H2_PREFACE[:14]):  # "PRI * HTTP/2.0"
            # HTTP/2 with prior knowledge (gRPC clients do this): say so plainly.
            self._reject(505, "HTTP/2 (h2c, gRPC) is not supported: use HTTP/1.1")
            return
        self._fresh = False
        self._inbox += data
        self._pump()

    def _pump(self) -> None:
        """Parse what arrived, a piece at a time, while reading is not paused: a pipeline
        that fills (or a body that backs up) mid-buffer stops the parsing there, so what
        one read brought in waits as bytes, not as parsed requests."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._inbox and not (self._reading_paused or self.closed or self._rejected):
                piece = bytes(self._inbox[:FEED_PIECE])
                del self._inbox[:FEED_PIECE]
                if self._awaiting_head:
                    self._head_raw += len(piece)
                self.parser.feed_data(piece)
                if self._awaiting_head and self._head_raw > MAX_HEAD_BYTES + FEED_PIECE:
                    # One endless header line: the parser holds it whole until it ends.
                    raise HeadTooLarge(f"request head over {MAX_HEAD_BYTES} bytes")
        except httptools.HttpParserUpgrade:
            self._reject(501, "protocol upgrades (WebSocket, h2c) are not supported: use HTTP/1.1")
        except httptools.HttpParserError as error:
            # A callback's own exception arrives as the context of httptools' error.
            cause = error.__context__ if error.__context__ is not None else error
            if isinstance(cause, UpgradeRefused):
                self._reject(501, f"{cause}: use HTTP/1.1")
            elif isinstance(cause, HeadTooLarge):
                self._reject(431, str(cause))
            else:
                self._reject(400, "malformed HTTP request")
        finally:
            self._pumping = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self.connections.live.discard(self)
        self._can_write.set()
        self._request_ready.set()
        if self._current is not None:
            self._current.wake_reader()
        if self._task is not None and self._current is not None:
            self._task.cancel()  # the client went away: cancel what it asked for

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- httptools callbacks ---------------------------------------------------------
    def on_message_begin(self) -> None:
        self._arm(self.limits.header_timeout_s, 408)
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._header_count = 0
        self._in_trailers = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge(f"request head over {MAX_HEAD_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        self._header_count += 1
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge(f"request head over {MAX_HEAD_BYTES} bytes")
        if self._header_count > MAX_HEADERS:
            raise HeadTooLarge(f"more than {MAX_HEADERS} header fields")
        if not self._in_trailers:
            self._headers.append((name, value))
        # Trailers of a chunked body (counted against the same bounds) are dropped: they
        # are never forwarded as headers, and nothing upstream relies on them.

    def on_headers_complete(self) -> None:
        parser = self.parser
        if parser.should_upgrade():  # refused before it is queued: no pod ever sees it
            raise UpgradeRefused("protocol upgrades (WebSocket, h2c) are not supported")
        length: int | None = None
        chunked = expect_continue = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = int(value)
            elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif lowered == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
        request = Request(
            method=parser.get_method().decode("latin-1"),
            target=self._url.decode("latin-1"),
            headers=self._headers,
            keep_alive=parser.should_keep_alive(),
            http_minor=int(parser.get_http_version().rsplit(".", 1)[-1]),
            remote=self.remote,
            expects_body=chunked or bool(length),
            content_length=length,
            _connection=self,
            _continue_pending=expect_continue and (chunked or bool(length)),
        )
        self._disarm()
        self._awaiting_head = False
        self.requests.append(request)
        self._request_ready.set()
        self._apply_reading()
        self._in_trailers = True
        self._header_count = 0

    def on_body(self, body: bytes) -> None:
        request = self.requests[-1]
        request.receive(body)
        if request.buffered_chunks >= BODY_HIGH_WATER:
            self._apply_reading()

    def on_message_complete(self) -> None:
        self._awaiting_head = True
        self._head_raw = 0
        self.requests[-1].receive_end()

    # -- serving ---------------------------------------------------------------------
    def body_consumed(self) -> None:
        current = self._current
        if (
            self._reading_paused
            and current is not None
            and current.buffered_chunks < BODY_HIGH_WATER // 2
        ):
            self._apply_reading()

    def send_continue(self) -> None:
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def write(self, data: bytes) -> None:
        if self.closed or self._rejected or self.transport is None:
            raise ClientGone
        self.transport.write(data)
        if not self._can_write.is_set():
            await self._can_write.wait()
            if self.closed:
                raise ClientGone

    def _reject(
        self, status: int, message: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        if self.transport is None or self.closed:
            return
        if self._rejected:
            return
        self._rejected = True
        body = json.dumps({"error": message, "status": status}).encode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers or [])
        self.transport.write(
            f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        # Lingering close: closing with the client's bytes unread would reset the
        # connection and could destroy the answer before it is read. Send EOF, discard
        # what still arrives, and close when the client does (or after LINGER_S).
        self._inbox.clear()
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        self._arm(LINGER_S, None)

    async def _serve(self) -> None:
        try:
            while not self.closed:
                if not self.requests:
                    self._arm(self.limits.idle_timeout_s, None)  # kept alive, not for ever
                while not self.requests:
                    if self.closed:
                        return
                    self._request_ready.clear()
                    await self._request_ready.wait()
                request = self.requests[0]
                self._current = request
                responder = Responder(self, request)
                await self.handler(request, responder)
                if request.body_unread:
                    if request.awaiting_continue:
                        break  # the client holds back a body nobody will read: close
                    # Unread body: drain it so the next request parses from its start.
                    async for _ in request.body_chunks():
                        pass
                self.requests.popleft()
                self._current = None
                if self._reading_paused:
                    self._apply_reading()
                if not request.keep_alive:
                    break
        except (ClientGone, asyncio.CancelledError):
            pass
        except Exception:
            logger.exception("error serving %s", self.remote)
        finally:
            self._current = None
            if self.transport is not None and not self.closed:
                self.transport.close()


async def serve(
    handler: Handler,
    host: str,
    port: int,
    backlog: int = 1024,
    connections: Connections | None = None,
    reuse_port: bool = False,
) -> asyncio.Server:
    """Serve ``handler`` on host:port (``reuse_port``: beside other processes on it)."""
    loop = asyncio.get_running_loop()
    shared = connections or Connections()
    return await loop.create_server(
        lambda: _Connection(handler, shared), host, port, backlog=backlog, reuse_port=reuse_port
    )
