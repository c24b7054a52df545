"""A lean HTTP/1.1 client for the gateway's upstream side: keep-alive pools per endpoint.

The gateway forwards every request to a pod; a general-purpose client spends most of the
proxy's CPU on that hop. This one writes the request head in one piece, parses the
response with ``httptools`` (llhttp) and hands body chunks over as they arrive, with
back-pressure (it stops reading from the pod while the client is slow). A connection
returns to its endpoint's pool only after a complete, keep-alive exchange; a reused
connection that turns out to be closed by the pod is retried once on a fresh one (only
when the request can be sent again and nothing of the response has arrived).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import httptools

MAX_IDLE_PER_ENDPOINT = 256
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
"""A pod's response head beyond either is refused (502): a tenant's own pod must not be
able to make the gateway buffer without bound either."""
HIGH_WATER = 8
"""Body chunks buffered from the pod before reading pauses."""


class UpstreamError(Exception):
    """The exchange with the pod failed; ``sent`` says whether the request may have reached it."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class UpstreamConnectError(UpstreamError):
    def __init__(self, message: str) -> None:
        super().__init__(message, sent=False)


class UpstreamTimeoutError(UpstreamError):
    """The pod did not begin its answer within the response-head timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=True)


@dataclass
class UpstreamResponse:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]
    content_length: int | None
    connection: _Connection = field(repr=False)

    @property
    def finished(self) -> bool:
        """The whole message was consumed (the connection went back to the pool or closed)."""
        return self.connection.exchange_done

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive (de-chunked); ends at the end of the message."""
        connection = self.connection
        while True:
            chunk = await connection.next_chunk()
            if chunk is None:
                return
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, address: str) -> None:
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self._parser: httptools.HttpResponseParser | None = None
        self._head: asyncio.Future[None] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._reason = b""
        self._chunks: collections.deque[bytes | None] = collections.deque()
        self._chunk_ready: asyncio.Event = asyncio.Event()
        self._received = False
        self._complete = False
        self._keep_alive = False
        self._paused = False
        self._head_only = False
        self._error: Exception | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.exchange_done = True
        self._pump: asyncio.Task[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            self._fail(UpstreamError("unexpected data from upstream", sent=True))
            return
        self._received = True
        try:
            self._parser.feed_data(data)
            if self._head is not None and not self._head.done():
                self._head_bytes += len(data)  # one endless line is held whole until it ends
                self._check_head()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("upstream switched protocols; not supported", sent=True))
        except httptools.HttpParserError as error:
            # A callback's own exception arrives as the context of httptools' error.
            cause = error.__context__ if error.__context__ is not None else error
            self._fail(UpstreamError(f"bad response from upstream: {cause}", sent=True))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        self._can_write.set()
        head_done = self._head is not None and self._head.done() and self._head.exception() is None
        if (
            self._parser is not None
            and not self._complete
            and head_done
            and exc is None
            and not self._parser.should_keep_alive()
            and self._content_length() is None
        ):
            # A body delimited by the end of the connection (no length, not chunked).
            self.on_message_complete()
            return
        if self._parser is not None and not self._complete:
            self._fail(
                UpstreamError(
                    f"upstream closed the connection: {exc or 'EOF'}",
                    sent=self._received or not self.reused,
                )
            )

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- httptools callbacks ------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self._reason += status
        self._head_bytes += len(status)
        self._check_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head is not None and self._head.done():
            return  # trailers of a chunked response: not forwarded as headers
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value)
        self._check_head()

    def _check_head(self) -> None:
        if self._head_bytes > MAX_HEAD_BYTES or len(self._headers) > MAX_HEADERS:
            raise httptools.HttpParserError(
                f"response head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} fields"
            )

    def _content_length(self) -> int | None:
        for name, value in self._headers:
            if name.lower() == b"content-length":
                return int(value)
        return None

    def on_headers_complete(self) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if self._head_only:
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._chunk_ready.set()
        if len(self._chunks) >= HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._complete:
            return
        self._complete = True
        # Ask now: once feed_data() returns, llhttp has reset and always says no.
        self._keep_alive = (
            self._parser is not None and not self._head_only and self._parser.should_keep_alive()
        )
        self._chunks.append(None)
        self._chunk_ready.set()

    # -- exchange ----------------------------------------------------------------------
    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._chunk_ready.set()
        if self.transport is not None:
            self.transport.close()

    async def send(
        self, head: bytes, body: bytes | AsyncIterator[bytes] | None, head_only: bool
    ) -> UpstreamResponse:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._head = loop.create_future()
        self._headers, self._reason = [], b""
        self._head_bytes = 0
        self._chunks.clear()
        self._received = self._complete = self._keep_alive = False
        self._head_only = head_only
        self._error = None
        self.exchange_done = False
        self._pump = None
        if body is None or isinstance(body, bytes):
            self.transport.write(head + body if body else head)
        else:
            # Full duplex: the body keeps flowing up while the response flows down.
            self.transport.write(head)
            self._pump = loop.create_task(self._send_body(body))
            self._pump.add_done_callback(_retrieve)
        parser = self._parser
        try:
            async with asyncio.timeout(self.pool.response_head_timeout_s):
                await self._head
        except TimeoutError as error:
            self.abort()
            raise UpstreamTimeoutError(
                f"no response head from {self.address} within "
                f"{self.pool.response_head_timeout_s:g} s"
            ) from error
        except BaseException:
            self.abort()
            raise
        return UpstreamResponse(
            status=parser.get_status_code(),
            reason=self._reason.decode("latin-1"),
            headers=self._headers,
            content_length=None if head_only else self._content_length(),
            connection=self,
        )

    async def next_chunk(self) -> bytes | None:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            self._chunk_ready.clear()
            await self._chunk_ready.wait()
        chunk = self._chunks.popleft()
        if self._paused and len(self._chunks) < HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if chunk is None:
            self._finish()
        return chunk

    async def _send_body(self, body: AsyncIterator[bytes]) -> None:
        assert self.transport is not None
        async for chunk in body:
            if not chunk:
                continue
            await self._can_write.wait()
            if self.closed:
                return
            self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        if not self.closed:
            self.transport.write(b"0\r\n\r\n")

    def _finish(self) -> None:
        self.exchange_done = True
        self._parser = None
        body_sent = self._pump is None or (
            self._pump.done() and not self._pump.cancelled() and self._pump.exception() is None
        )
        if self._keep_alive and body_sent and not self.closed:
            self.pool.release(self)
        else:
            self.abort()

    def abort(self) -> None:
        self._parser = None
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        if self.transport is not None and not self.closed:
            self.transport.close()


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a body pump's failure as seen; the exchange itself reports it."""
    if not task.cancelled():
        task.exception()


class UpstreamPool:
    def __init__(
        self, connect_timeout_s: float = 5.0, response_head_timeout_s: float = 300.0
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.response_head_timeout_s = response_head_timeout_s
        """From the request sent to the response's head; a body streaming after that
        (an LLM's tokens) has no such limit."""
        self._idle: dict[str, list[_Connection]] = {}

    def release(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.address, [])
        if len(idle) < MAX_IDLE_PER_ENDPOINT:
            connection.reused = True
            idle.append(connection)
        else:
            connection.abort()

    def forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.address)
        if idle and connection in idle:
            idle.remove(connection)

    async def _connect(self, address: str) -> _Connection:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self, address), host, int(port)
                )
        except (OSError, TimeoutError) as error:
            raise UpstreamConnectError(f"cannot connect to {address}: {error!r}") from error
        return protocol

    async def request(
        self,
        address: str,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        head_only: bool = False,
    ) -> UpstreamResponse:
        """Send one request; the caller must consume the body (or ``abort`` it)."""
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            try:
                return await connection.send(head, body, head_only)
            except UpstreamError as error:
                replayable = body is None or isinstance(body, bytes)
                if error.sent or not replayable:
                    raise
                break  # the pod closed an idle connection: try once on a fresh one
        connection = await self._connect(address)
        return await connection.send(head, body, head_only)

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in list(idle):
                connection.abort()
        self._idle.clear()
