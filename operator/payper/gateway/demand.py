"""The gateway's side of demand reporting: a poke on the first held request, snapshots
every second. Failures are logged and retried; they never fail a client request.

A snapshot carries, per deployment, the requests in flight on each of its pods that has
any, so the operator can spare busy pods at a scale-down. An operator from before those
counts (mid-upgrade) refuses the field: the snapshot is sent again without it, and the
counts stay out for ``PER_POD_RETRY_S``.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import ssl
import time

import aiohttp

from payper.api.demand import MAX_REPORTED_PODS, DemandSnapshot, DeploymentDemand, Poke
from payper.gateway import metrics
from payper.gateway.targets import Target, Targets
from payper.identity import TokenFile

logger = logging.getLogger(__name__)
RECENT_S = 30.0
PER_POD_RETRY_S = 300.0


def in_flight_by_pod(target: Target) -> dict[str, int]:
    """Requests in flight on each ready pod that has any, the busiest
    ``MAX_REPORTED_PODS`` of them. (A pod being deleted is no endpoint any more: its
    requests still in flight count for the deployment, not for a pod to spare.)"""
    busy = [(e.in_flight, e.pod) for e in target.endpoints.values() if e.in_flight > 0]
    if len(busy) > MAX_REPORTED_PODS:
        busy = heapq.nlargest(MAX_REPORTED_PODS, busy)
    return {pod: count for count, pod in busy}


class DemandReporter:
    def __init__(
        self,
        operator_url: str,
        token: TokenFile,
        gateway_id: str,
        targets: Targets,
        interval_s: float = 1.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.operator_url = operator_url.rstrip("/")
        self.token = token
        self.gateway_id = gateway_id
        self.targets = targets
        self.interval_s = interval_s
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None
        self._per_pod_off_until = 0.0
        """time.monotonic() until which snapshots carry no per-pod counts."""

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, path: str, body: str) -> int:
        headers = {**self.token.header(), "Content-Type": "application/json"}
        async with self.session.post(
            self.operator_url + path, data=body, headers=headers, ssl=self._ssl
        ) as response:
            await response.read()
            return response.status

    async def poke(self, namespace: str, name: str) -> None:
        body = Poke(gateway=self.gateway_id, namespace=namespace, name=name).model_dump_json(
            by_alias=True
        )
        for attempt in range(5):
            try:
                status = await self._post("/v1/poke", body)
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                logger.warning("poke %s/%s failed: %r", namespace, name, error)
            else:
                if status < 300:
                    metrics.POKES.labels("accepted").inc()
                    return
                logger.warning("poke %s/%s answered %d", namespace, name, status)
                if status in (400, 401, 403):
                    metrics.POKES.labels("rejected").inc()
                    return
            await asyncio.sleep(0.1 * 2**attempt)
        metrics.POKES.labels("failed").inc()

    def snapshot(self, per_pod: bool = True) -> DemandSnapshot:
        now = time.monotonic()
        entries = []
        for target in self.targets.targets.values():
            last = target.last_request_at
            if (
                target.in_flight == 0
                and target.queued == 0
                and (last is None or now - last > RECENT_S)
            ):
                continue
            entries.append(
                DeploymentDemand(
                    namespace=target.namespace,
                    name=target.name,
                    in_flight=target.in_flight - target.queued,
                    queued=target.queued,
                    requests_total=target.requests_total,
                    ms_since_last_request=None if last is None else int((now - last) * 1000),
                    cold_start_ms=target.unreported_cold_start_ms,
                    in_flight_by_pod=in_flight_by_pod(target) if per_pod else {},
                )
            )
            # Sent once (a lost report loses it: the phase then stays unmeasured).
            target.unreported_cold_start_ms = None
        return DemandSnapshot(gateway=self.gateway_id, deployments=entries)

    async def report(self) -> int:
        """Send one snapshot; the operator's answer."""
        snapshot = self.snapshot(per_pod=time.monotonic() >= self._per_pod_off_until)
        # Fields at their defaults stay out (an empty per-pod map among them).
        status = await self._post(
            "/v1/demand", snapshot.model_dump_json(by_alias=True, exclude_defaults=True)
        )
        if status == 400 and any(entry.in_flight_by_pod for entry in snapshot.deployments):
            logger.warning(
                "the operator refused per-pod in-flight counts (an older version?): "
                "reporting without them for %.0fs",
                PER_POD_RETRY_S,
            )
            self._per_pod_off_until = time.monotonic() + PER_POD_RETRY_S
            return await self.report()
        return status

    async def run(self) -> None:
        while True:
            try:
                status = await self.report()
                if status >= 300:
                    logger.warning("demand snapshot answered %d", status)
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                logger.warning("demand snapshot failed: %r", error)
            await asyncio.sleep(self.interval_s)
