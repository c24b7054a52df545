"""The request path: route, authenticate, hold through a cold start, forward, stream back.

Every request is streamed both ways, never buffered whole (LLM servers stream tokens);
a client that disconnects cancels the upstream request (aiohttp handler cancellation).
Requests for a deployment with no ready endpoint wait in a bounded per-deployment queue
while the operator is poked to scale it up; they are forwarded the moment a pod is ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from payper.gateway import metrics
from payper.gateway.routing import Route, route
from payper.gateway.targets import Endpoint, Target, TargetGone, Targets

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
COLD_START_HEADER = "X-Payper-Cold-Start-Ms"
MAX_ATTEMPTS = 3


class UpstreamUnreachable(Exception):  # noqa: N818 - control flow: try another endpoint
    """The connection to an endpoint failed before any byte of the request was sent."""


SMALL_BODY = 64 * 1024


@dataclass(frozen=True)
class GatewaySettings:
    domain: str = "payper.local"
    max_queue: int = 100
    """Requests held per deployment while it has no ready endpoint."""
    retry_after_s: int = 5
    upstream_connect_timeout_s: float = 5.0


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"error": message, "status": status}),
        content_type="application/json",
        headers=headers,
    )


def _upstream_headers(request: web.Request, target: Target) -> CIMultiDict[str]:
    connection_tokens = {
        token.strip().lower() for token in request.headers.get("Connection", "").split(",")
    }
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in connection_tokens:
            continue
        if lowered == "authorization" and target.auth_secret is not None:
            continue  # the gateway consumed the tenant's API key; it is not the model's
        headers.add(name, value)
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    if request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    return headers


def _downstream_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    connection_tokens = {
        token.strip().lower() for token in upstream.headers.get("Connection", "").split(",")
    }
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.headers.items():
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in connection_tokens:
            continue
        headers.add(name, value)
    return headers


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
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.settings.upstream_connect_timeout_s
                ),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(lambda _: self.close())
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        found = route(request.headers.get("Host"), request.raw_path, self.settings.domain)
        if found is None:
            if request.path == "/healthz":
                return web.Response(text="ok")
            return json_error(404, "no InferenceDeployment matches this host or path")
        target = self.targets.get(found.key)
        if target is None:
            metrics.REQUESTS.labels(found.namespace, found.name, "404").inc()
            return json_error(404, f"InferenceDeployment {found.namespace}/{found.name} not found")
        if not self.targets.authorized(target, request.headers.get("Authorization")):
            metrics.REQUESTS.labels(found.namespace, found.name, "401").inc()
            return json_error(
                401,
                "a valid API key is required: Authorization: Bearer <key>",
                headers={"WWW-Authenticate": 'Bearer realm="payper"'},
            )
        started = time.monotonic()
        target.requests_total += 1
        target.last_request_at = started
        target.in_flight += 1
        metrics.IN_FLIGHT.labels(found.namespace, found.name).inc()
        try:
            response = await self._serve(request, found, target, started)
        finally:
            target.in_flight -= 1
            metrics.IN_FLIGHT.labels(found.namespace, found.name).dec()
        metrics.REQUESTS.labels(found.namespace, found.name, str(response.status)).inc()
        metrics.DURATION.labels(found.namespace, found.name).observe(time.monotonic() - started)
        return response

    async def _serve(
        self, request: web.Request, found: Route, target: Target, started: float
    ) -> web.StreamResponse:
        cold_start_ms: int | None = None
        for _ in range(MAX_ATTEMPTS):
            endpoint = target.pick()
            if endpoint is None:
                held = await self._hold(found, target, started)
                if isinstance(held, web.StreamResponse):
                    return held
                endpoint = held
                if cold_start_ms is None:
                    cold_start_ms = int((time.monotonic() - started) * 1000)
                    metrics.QUEUE_WAIT.labels(*found.key).observe(cold_start_ms / 1000)
            try:
                return await self._forward(request, found, endpoint, target, cold_start_ms)
            except UpstreamUnreachable:
                endpoint.quarantine()
        return json_error(
            502, f"no endpoint of {found.namespace}/{found.name} accepted the request"
        )

    async def _hold(self, found: Route, target: Target, started: float) -> Endpoint | web.Response:
        """Wait for a ready endpoint, within the queue bound and the cold start timeout."""
        if target.queued >= self.settings.max_queue:
            return json_error(
                503,
                f"{found.namespace}/{found.name} is starting and its queue is full "
                f"({self.settings.max_queue} requests); retry later",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        target.queued += 1
        metrics.QUEUED.labels(*found.key).inc()
        if target.queued == 1 and not target.endpoints:
            # Only a deployment with no ready pod needs waking (not one whose pods are
            # briefly unreachable).
            asyncio.get_running_loop().create_task(self.poke(found.namespace, found.name))
        remaining = target.cold_start_timeout_s - (time.monotonic() - started)
        try:
            return await target.wait_for_endpoint(remaining)
        except TimeoutError:
            return json_error(
                504,
                f"{found.namespace}/{found.name} did not become ready within its cold start "
                f"timeout ({target.cold_start_timeout_s:.0f}s)",
            )
        except TargetGone:
            return json_error(
                404, f"InferenceDeployment {found.namespace}/{found.name} was deleted"
            )
        finally:
            target.queued -= 1
            metrics.QUEUED.labels(*found.key).dec()

    async def _forward(
        self,
        request: web.Request,
        found: Route,
        endpoint: Endpoint,
        target: Target,
        cold_start_ms: int | None,
    ) -> web.StreamResponse:
        headers = _upstream_headers(request, target)
        body: object = None
        if request.body_exists:
            length = request.content_length
            body = (
                await request.read()
                if length is not None and length <= SMALL_BODY
                else request.content
            )
        endpoint.in_flight += 1
        streaming: web.StreamResponse | None = None
        try:
            async with self.session.request(
                request.method,
                f"http://{endpoint.address}{found.path}",
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as upstream:
                out_headers = _downstream_headers(upstream)
                if cold_start_ms is not None:
                    out_headers[COLD_START_HEADER] = str(cold_start_ms)
                length = upstream.content_length
                if length is not None and length <= SMALL_BODY:
                    return web.Response(
                        status=upstream.status,
                        reason=upstream.reason,
                        headers=out_headers,
                        body=await upstream.read(),
                    )
                streaming = web.StreamResponse(
                    status=upstream.status, reason=upstream.reason, headers=out_headers
                )
                if length is not None:
                    streaming.content_length = length
                await streaming.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await streaming.write(chunk)
                await streaming.write_eof()
                return streaming
        except aiohttp.ClientConnectorError as error:
            # Nothing was sent: the process behind a still-Ready pod is gone or not yet up.
            logger.info("upstream %s refused %s/%s: %r", endpoint.address, *found.key, error)
            raise UpstreamUnreachable from error
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            metrics.UPSTREAM_ERRORS.labels(found.namespace, found.name).inc()
            logger.warning("upstream %s for %s/%s failed: %r", endpoint.address, *found.key, error)
            if streaming is not None:
                raise  # headers are out: all that is left is to cut the connection
            return json_error(502, f"upstream {endpoint.pod} failed: {type(error).__name__}")
        finally:
            endpoint.in_flight -= 1
