"""The request path: route, authenticate, hold through a cold start, forward, stream back.

Every request is streamed both ways, never buffered whole (LLM servers stream tokens);
a client that disconnects cancels the upstream request. Requests for a deployment with
no ready endpoint wait in a bounded per-deployment queue while the operator is poked to
scale it up; they are forwarded the moment a pod is ready.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from payper.gateway import metrics, workers
from payper.gateway.routing import Route, route
from payper.gateway.server import ClientGone, Request, Responder
from payper.gateway.targets import Endpoint, Target, TargetGone, Targets
from payper.gateway.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeoutError,
)

logger = logging.getLogger(__name__)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
    )
)
FORWARDING_HEADERS = frozenset(
    (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip")
)
"""Set by the gateway itself; a client's own are believed only from a trusted proxy."""
COLD_START_HEADER = "X-Payper-Cold-Start-Ms"
SMALL_BODY = 64 * 1024
JSON = [("Content-Type", "application/json")]
UNAUTHORIZED = "a valid API key is required: Authorization: Bearer <key>"
UNAUTHORIZED_HEADERS = [("WWW-Authenticate", 'Bearer realm="payper"')]


class UpstreamUnreachable(Exception):  # noqa: N818 - control flow: try another endpoint
    """The connection to an endpoint failed before any byte of the request was sent."""


@dataclass(frozen=True)
class GatewaySettings:
    domain: str = "payper.local"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    """Peers (a load balancer in front) whose X-Forwarded-*/Forwarded headers are kept
    and extended; anyone else's are replaced by what the gateway itself sees."""
    max_queue: int = 100
    """Requests held per deployment while it has no ready endpoint (this process's share
    of the platform's cap)."""
    workers: int = 1
    """Processes sharing this gateway's bounds: a deployment's own ``maxQueue`` is
    divided among them too."""
    retry_after_s: int = 5
    upstream_connect_timeout_s: float = 5.0
    upstream_response_head_timeout_s: float = 300.0
    """A pod that sends no response head this long after the request is answered 504."""

    def trusts(self, peer: str) -> bool:
        if not self.trusted_proxies or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)


async def send_error(
    responder: Responder, status: int, message: str, headers: list[tuple[str, str]] | None = None
) -> None:
    body = json.dumps({"error": message, "status": status}).encode()
    await responder.send(status, [*JSON, *(headers or [])], body)


def _connection_tokens(value: bytes | None) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",")} if value else set()


RequestBody = bytes | AsyncIterator[bytes] | None


async def request_body(request: Request) -> tuple[RequestBody, bytes]:
    """The body to send upstream and its framing header: small bodies are read whole.

    A streamed body is an iterator that a failed connection attempt leaves untouched, so
    either kind can be sent again to another endpoint.
    """
    if not request.expects_body:
        return None, b"Content-Length: 0"
    length = request.content_length
    if length is not None and length <= SMALL_BODY:
        body = await request.read()
        return body, b"Content-Length: %d" % len(body)
    return request.body_chunks(), b"Transfer-Encoding: chunked"


def _forwarded_for(peer: bytes) -> bytes:
    """A node of RFC 7239's ``for=``: IPv6 addresses are bracketed and quoted."""
    return b'"[%b]"' % peer if b":" in peer else peer


def request_head(
    request: Request,
    target: Target,
    address: str,
    path: str,
    framing: bytes,
    trusted: bool = False,
) -> bytes:
    """The upstream request line and headers: hop-by-hop headers dropped, and the
    forwarding headers set by the gateway itself: ``X-Forwarded-For/Proto/Host`` and
    ``Forwarded`` (RFC 7239). A client's own are extended only when it is a ``trusted``
    proxy; from anyone else they are dropped, never passed on as the truth."""
    tokens: set[bytes] = set()
    host = b""
    prior: dict[bytes, bytes] = {}
    for name, value in request.headers:
        lowered = name.lower()
        if lowered == b"connection":
            tokens |= _connection_tokens(value)
        elif lowered == b"host":
            host = value
        elif trusted and lowered in FORWARDING_HEADERS and lowered not in prior:
            prior[lowered] = value
    parts = [f"{request.method} {path} HTTP/1.1\r\nHost: {address}\r\n".encode("latin-1")]
    for name, value in request.headers:
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in tokens or lowered in FORWARDING_HEADERS:
            continue
        if lowered == b"authorization" and target.auth_required:
            continue  # the gateway consumed the tenant's API key; it is not the model's
        parts.append(b"%b: %b\r\n" % (name, value))
    peer = request.remote.encode()
    proto = prior.get(b"x-forwarded-proto", b"http").split(b",")[0].strip().lower()
    if proto not in (b"http", b"https"):
        proto = b"http"
    original_host = prior.get(b"x-forwarded-host", host).split(b",")[0].strip()
    chain = prior.get(b"x-forwarded-for")
    forwarded = b'for=%b;host="%b";proto=%b' % (
        _forwarded_for(peer),
        original_host.replace(b'"', b""),
        proto,
    )
    if b"forwarded" in prior:
        forwarded = prior[b"forwarded"] + b", " + forwarded
    parts.append(b"X-Forwarded-For: %b\r\n" % (chain + b", " + peer if chain else peer))
    parts.append(b"X-Forwarded-Proto: %b\r\nX-Forwarded-Host: %b\r\n" % (proto, original_host))
    parts.append(b"Forwarded: %b\r\n%b\r\n\r\n" % (forwarded, framing))
    return b"".join(parts)


def response_headers(upstream: UpstreamResponse) -> list[tuple[str, str]]:
    tokens: set[bytes] = set()
    for name, value in upstream.headers:
        if name.lower() == b"connection":
            tokens |= _connection_tokens(value)
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in upstream.headers
        if name.lower() not in HOP_BY_HOP and name.lower() not in tokens
    ]


class Gateway:
    def __init__(
        self,
        targets: Targets,
        settings: GatewaySettings,
        poke: Callable[[str, str], Coroutine[Any, Any, None]],
    ) -> None:
        self.targets = targets
        self.settings = settings
        self.poke = poke
        self.pool = UpstreamPool(
            settings.upstream_connect_timeout_s, settings.upstream_response_head_timeout_s
        )

    def close(self) -> None:
        self.pool.close()

    async def handle(self, request: Request, responder: Responder) -> None:
        if sum(1 for name, _ in request.headers if name.lower() == b"host") > 1:
            # Which one would route and which one the model sees? Neither: refused.
            await send_error(responder, 400, "more than one Host header")
            return
        found = route(request.header(b"host"), request.target, self.settings.domain)
        if found is None:
            if request.target == "/healthz":
                await responder.send(200, [("Content-Type", "text/plain")], b"ok")
                return
            metrics.UNROUTED.inc()
            await send_error(responder, 404, "no InferenceDeployment matches this host or path")
            return
        target = self.targets.get(found.key)
        if target is None and not self.targets.require_auth:
            metrics.UNROUTED.inc()
            await send_error(
                responder, 404, f"InferenceDeployment {found.namespace}/{found.name} not found"
            )
            return
        # With requireAuth, a deployment that does not exist gets the very answer one
        # that exists gives a request without a valid key (same status, headers, body,
        # and the same digest work): strangers cannot list deployments.
        authorized = self.targets.authorized(target, request.header(b"authorization"))
        if target is None or not authorized:
            if target is None:
                metrics.UNROUTED.inc()
            else:
                target.meters.answered(401)
            await send_error(responder, 401, UNAUTHORIZED, UNAUTHORIZED_HEADERS)
            return
        meters = target.meters
        started = time.monotonic()
        target.requests_total += 1
        target.last_request_at = started
        target.in_flight += 1
        meters.in_flight.inc()
        try:
            await self._serve(request, responder, found, target, started)
        finally:
            target.in_flight -= 1
            meters.in_flight.dec()
            meters.answered(responder.status or 499)
            meters.duration.observe(time.monotonic() - started)

    async def _serve(
        self, request: Request, responder: Responder, found: Route, target: Target, started: float
    ) -> None:
        cold_start_ms: int | None = None
        body, framing = await request_body(request)  # read once: a retry sends it again
        # A refused connection sent nothing: it is retried (backing off, on the same or
        # another ready pod) for as long as the request's deadline allows, never a 502
        # while there is time (a Ready pod whose process is not listening yet, or stopping).
        deadline = started + target.cold_start_timeout_s
        while time.monotonic() < deadline:
            endpoint = target.pick()
            quarantine = target.quarantine_left() if endpoint is None else None
            if quarantine is not None:
                # Pods are ready but refused us a moment ago: no cold start to wait for,
                # just a pause (the shortest quarantine) before the next attempt.
                await asyncio.sleep(min(quarantine, max(0.0, deadline - time.monotonic())))
                continue
            if endpoint is None:  # none ready (a cold start), or all busy at their cap
                waking = not target.endpoints
                held_since = time.monotonic()
                endpoint = await self._hold(responder, found, target, started)
                if endpoint is None:
                    return
                target.meters.queue_wait.observe(time.monotonic() - held_since)
                if waking and cold_start_ms is None:
                    cold_start_ms = int((time.monotonic() - started) * 1000)
                    target.unreported_cold_start_ms = cold_start_ms
            try:
                await self._forward(
                    request, responder, found, endpoint, target, cold_start_ms, body, framing
                )
                endpoint.reachable()
                return
            except UpstreamUnreachable:
                endpoint.quarantine()
        await send_error(
            responder,
            502,
            f"no endpoint of {found.namespace}/{found.name} accepted the request within "
            f"its deadline ({target.cold_start_timeout_s:.0f}s)",
        )

    async def _hold(
        self, responder: Responder, found: Route, target: Target, started: float
    ) -> Endpoint | None:
        """Wait for a ready endpoint, within the queue bound and the cold start timeout.

        None means an error response was sent instead.
        """
        limit = self.settings.max_queue
        if target.max_queue is not None:  # the deployment asks for fewer
            limit = min(limit, workers.share(target.max_queue, self.settings.workers))
        if target.queued >= limit:
            now = time.monotonic()
            if not target.endpoints and not target.queued and now >= target.next_refused_poke:
                # Nothing held (a deployment whose maxQueue is 0) still wakes it, the
                # client told to come back in Retry-After; at most one poke a second,
                # however many requests a stranger sends.
                target.next_refused_poke = now + 1.0
                asyncio.get_running_loop().create_task(self.poke(found.namespace, found.name))
            retry = [("Retry-After", str(self.settings.retry_after_s))]
            if target.endpoints:  # warm: its replicas are busy (at their cap): too many
                await send_error(
                    responder,
                    429,
                    f"{found.namespace}/{found.name} is busy and its queue is full "
                    f"({limit} requests); retry later",
                    retry,
                )
            else:
                await send_error(
                    responder,
                    503,
                    f"{found.namespace}/{found.name} is starting and its queue is full "
                    f"({limit} requests); retry later",
                    retry,
                )
            return None
        target.queued += 1
        target.meters.queued.inc()
        if target.queued == 1 and not target.endpoints:
            # Only a deployment with no ready pod needs waking (not one whose pods are
            # briefly unreachable).
            asyncio.get_running_loop().create_task(self.poke(found.namespace, found.name))
        remaining = target.cold_start_timeout_s - (time.monotonic() - started)
        try:
            return await target.wait_for_endpoint(remaining)
        except TimeoutError:
            await send_error(
                responder,
                504,
                f"{found.namespace}/{found.name} did not become ready within its cold start "
                f"timeout ({target.cold_start_timeout_s:.0f}s)",
            )
        except TargetGone:
            await send_error(
                responder, 404, f"InferenceDeployment {found.namespace}/{found.name} was deleted"
            )
        finally:
            target.queued -= 1
            target.meters.queued.dec()
        return None

    async def _forward(
        self,
        request: Request,
        responder: Responder,
        found: Route,
        endpoint: Endpoint,
        target: Target,
        cold_start_ms: int | None,
        body: RequestBody,
        framing: bytes,
    ) -> None:
        trusted = self.settings.trusts(request.remote)
        head = request_head(request, target, endpoint.address, found.path, framing, trusted)
        endpoint.in_flight += 1
        upstream: UpstreamResponse | None = None
        started = False
        try:
            upstream = await self.pool.request(
                endpoint.address, head, body, head_only=request.method == "HEAD"
            )
            headers = response_headers(upstream)
            if cold_start_ms is not None:
                headers.append((COLD_START_HEADER, str(cold_start_ms)))
            length = upstream.content_length
            if length is not None and length <= SMALL_BODY:
                payload = await upstream.read()
                await responder.send(upstream.status, headers, payload, upstream.reason)
                return
            await responder.start(upstream.status, upstream.reason, headers, length)
            started = True
            async for chunk in upstream.chunks():
                await responder.write(chunk)
            await responder.end()
        except UpstreamConnectError as error:
            # Nothing was sent: the process behind a still-Ready pod is gone or not yet up.
            logger.info("upstream %s refused %s/%s: %s", endpoint.address, *found.key, error)
            raise UpstreamUnreachable from error
        except UpstreamError as error:
            target.meters.upstream_errors.inc()
            logger.warning("upstream %s for %s/%s failed: %s", endpoint.address, *found.key, error)
            if started:
                raise ClientGone from error  # the headers are out: all that is left is to cut
            status = 504 if isinstance(error, UpstreamTimeoutError) else 502
            await send_error(responder, status, f"upstream {endpoint.pod} failed: {error}")
        finally:
            target.released(endpoint)
            if upstream is not None and not upstream.finished:
                upstream.connection.abort()  # cancelled or failed mid-body: never reuse
