"""The operator's HTTP API for its own components: gateways' demand, agents' usage.

Separate from ``/metrics``. Every call is authenticated with a projected ServiceAccount
token (TokenReview) and authorised by ServiceAccount; bodies are size-limited and
validated. Only the leader accepts calls (``/readyz`` fails on a standby, so a Service
routes to the leader alone); a standby answers 503 and the caller retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from payper.api.common import field_errors
from payper.api.demand import DemandSnapshot, Poke
from payper.api.usage import NewerAgentError, parse_batch
from payper.billing import metrics as billing_metrics
from payper.billing.ledger import Ledger
from payper.clock import now_ms
from payper.operator import metrics
from payper.operator.auth import Caller, Forbidden, TokenVerifier, Unauthenticated, bearer_token
from payper.operator.controller import Controller

logger = logging.getLogger(__name__)
MAX_BODY = 4 * 1024 * 1024
M = TypeVar("M", bound=BaseModel)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


def validation_message(error: ValidationError) -> str:
    return "invalid payload: " + "; ".join(field_errors(error, root="(body)")[:5])


async def body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise HttpError(413, f"payload larger than {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise HttpError(413, f"payload larger than {MAX_BODY} bytes")
    return raw


async def parse(request: web.Request, model: type[M]) -> M:
    try:
        return model.model_validate_json(await body(request))
    except ValidationError as error:
        raise HttpError(400, validation_message(error)) from error


class ApiServer:
    def __init__(
        self,
        controller: Controller,
        verifier: TokenVerifier,
        is_leader: Callable[[], bool],
        ledger: Ledger | None = None,
    ) -> None:
        self.controller = controller
        self.ledger = ledger
        self.verifier = verifier
        self.is_leader = is_leader
        identity = controller.config.identity
        self.gateways = set(identity.gateway_service_accounts)
        self.agents = set(identity.agent_service_accounts)

    async def caller(self, request: web.Request, allowed: set[str]) -> Caller:
        try:
            caller = await self.verifier.verify(bearer_token(request.headers.get("Authorization")))
            caller.require(allowed)
        except Unauthenticated as error:
            raise HttpError(401, f"unauthenticated: {error}") from error
        except Forbidden as error:
            raise HttpError(403, str(error)) from error
        return caller

    def guarded(
        self, kind: str, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def wrapped(request: web.Request) -> web.Response:
            if not self.is_leader():
                metrics.API_REQUESTS.labels(kind, "not_leader").inc()
                return error_response(503, "this operator instance is not the leader")
            try:
                response = await handler(request)
            except HttpError as error:
                metrics.API_REQUESTS.labels(kind, str(error.status)).inc()
                if kind == "usage":
                    billing_metrics.USAGE_REPORTS.labels(f"rejected_{error.status}").inc()
                return error_response(error.status, error.message)
            metrics.API_REQUESTS.labels(kind, "ok").inc()
            return response

        return wrapped

    async def demand(self, request: web.Request) -> web.Response:
        await self.caller(request, self.gateways)
        snapshot = await parse(request, DemandSnapshot)
        self.controller.demand.record(snapshot, now_ms())
        for entry in snapshot.deployments:
            self.controller.billing.count_requests(
                snapshot.gateway, (entry.namespace, entry.name), entry.requests_total
            )
            if entry.cold_start_ms is not None:
                self.controller.observe_cold_start_total(
                    (entry.namespace, entry.name), entry.cold_start_ms
                )
            if entry.queued > 0:
                tracked = self.controller.registry.get((entry.namespace, entry.name))
                if tracked is not None and tracked.replicas == 0:
                    await self.controller.wake(tracked.key)
        self.controller.billing.saw_gateway(snapshot.gateway)
        return web.json_response({"accepted": len(snapshot.deployments)})

    async def poke(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        await self.caller(request, self.gateways)
        poke = await parse(request, Poke)
        key = (poke.namespace, poke.name)
        self.controller.demand.poke(poke.gateway, key, now_ms())
        tracked = await self.controller.wake(key)
        if tracked is None:
            raise HttpError(404, f"InferenceDeployment {poke.namespace}/{poke.name} is not known")
        metrics.SCALE_FROM_ZERO_LATENCY.observe(time.perf_counter() - started)
        return web.json_response({"replicas": tracked.replicas}, status=202)

    async def usage(self, request: web.Request) -> web.Response:
        """Each report of the batch is validated on its own: a report that is not valid is
        refused alone (filed, moved past, listed under ``refused``), never its batch."""
        caller = await self.caller(request, self.agents)
        try:
            reports, refused = parse_batch(await body(request))
        except ValidationError as error:
            raise HttpError(400, validation_message(error)) from error
        except NewerAgentError as error:
            raise HttpError(400, str(error)) from error
        if caller.node_name is None:
            raise HttpError(
                403, "the agent's token is not bound to a pod on a node (use a projected token)"
            )
        for report in reports:
            if report.node != caller.node_name:
                raise HttpError(
                    403,
                    f"report {report.sequence} is about node {report.node!r}, but the caller "
                    f"runs on {caller.node_name!r}",
                )
        if self.ledger is None:
            raise HttpError(503, "billing is not running")
        if not self.ledger.config.accept_simulated_reports and any(r.simulated for r in reports):
            metrics.SIMULATED_REFUSED.inc()
            raise HttpError(
                403,
                "simulated usage reports are refused: this agent runs the simulated backend, "
                "which is for development clusters only (billing.acceptSimulatedReports)",
            )
        receipt = await self.ledger.submit(reports, refused, caller.node_name)
        return web.json_response(receipt.to_wire())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def readyz(_: web.Request) -> web.Response:
            leader = self.is_leader()
            return web.Response(
                status=200 if leader else 503, text="leader" if leader else "standby"
            )

        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_post("/v1/demand", self.guarded("demand", self.demand))
        app.router.add_post("/v1/poke", self.guarded("poke", self.poke))
        app.router.add_post("/v1/usage", self.guarded("usage", self.usage))
        return app
