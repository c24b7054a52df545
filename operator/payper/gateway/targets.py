"""What the gateway knows about each InferenceDeployment: ready endpoints, load, waiters.

Fed by watches of InferenceDeployments and their Pods (IP and Ready condition, read from
the Pods themselves: no Service VIP, no EndpointSlice batching delay, and loopback pod IPs
work). Read on every request, so everything here is plain data and O(endpoints) at worst.

API keys: the gateway reads no Secrets. The operator publishes the SHA-256 digests of a
deployment's acceptable keys in its status (``status.auth``, which only the operator may
write); they count only while they were read from the Secret the spec names now.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from payper.api.inference_deployment import AuthStatus, InferenceDeploymentSpec
from payper.gateway import metrics
from payper.observed import Key, PodView


class TargetGone(Exception):  # noqa: N818 - a signal to waiters, not an error of the caller
    """The InferenceDeployment was deleted while a request waited for it."""


QUARANTINE_S = 1.0
"""The longest an endpoint that refused connections is skipped (its process may be
stopping, or not listening yet): it backs off from ``FIRST_QUARANTINE_S``, doubling."""
FIRST_QUARANTINE_S = 0.05


@dataclass
class Endpoint:
    pod: str
    address: str
    in_flight: int = 0
    unreachable_until: float = 0.0
    refusals: int = 0
    """Connections it refused in a row (reset by one it accepts)."""

    def quarantine(self) -> None:
        backoff = min(QUARANTINE_S, FIRST_QUARANTINE_S * 2**self.refusals)
        self.refusals = min(self.refusals + 1, 16)
        self.unreachable_until = time.monotonic() + backoff

    def reachable(self) -> None:
        self.refusals = 0
        self.unreachable_until = 0.0


@dataclass
class Target:
    namespace: str
    name: str
    port: int | None
    cold_start_timeout_s: float
    container_concurrency: int = 0
    """Requests one endpoint is sent at once; 0: no cap."""
    max_queue: int | None = None
    """Requests held for it, if the deployment asks for fewer than the gateway's cap."""
    next_refused_poke: float = 0.0
    """Monotonic time before which a refused request does not poke again (maxQueue 0)."""
    auth_required: bool = False
    """Only requests with one of ``key_digests`` are served (spec.auth, or requireAuth)."""
    key_digests: tuple[bytes, ...] = ()
    """SHA-256 of each accepted key, as the operator published them."""
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    in_flight: int = 0
    queued: int = 0
    requests_total: int = 0
    last_request_at: float | None = None
    """time.monotonic() of the last request's arrival."""
    unreported_cold_start_ms: int | None = None
    """The last cold start a request waited through (held -> forwarded), until the next
    demand report carries it to the operator (its phases' last part)."""
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False
    meters: metrics.TargetMeters = field(init=False)

    def __post_init__(self) -> None:
        self.meters = metrics.TargetMeters(self.namespace, self.name)

    def pick(self) -> Endpoint | None:
        """The reachable ready endpoint with the fewest requests in flight, below its
        concurrency cap."""
        best: Endpoint | None = None
        now = 0.0
        cap = self.container_concurrency
        for endpoint in self.endpoints.values():
            if endpoint.unreachable_until:
                now = now or time.monotonic()
                if endpoint.unreachable_until > now:
                    continue
            if cap and endpoint.in_flight >= cap:
                continue
            if best is None or endpoint.in_flight < best.in_flight:
                best = endpoint
        return best

    def quarantine_left(self) -> float | None:
        """Seconds until the first quarantined endpoint may be tried again; None: none
        is quarantined (every ready endpoint is busy at its cap, or there is none)."""
        now = time.monotonic()
        waits = [e.unreachable_until - now for e in self.endpoints.values()]
        quarantined = [w for w in waits if w > 0]
        return min(quarantined) if quarantined else None

    def released(self, endpoint: Endpoint) -> None:
        """A request on ``endpoint`` ended: a request waiting for a free slot may go."""
        endpoint.in_flight -= 1
        if self.container_concurrency:
            self.ready_event.set()

    async def wait_for_endpoint(self, timeout_s: float) -> Endpoint:
        """Until an endpoint is ready (TimeoutError) or the target is deleted (TargetGone)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.gone:
                raise TargetGone
            endpoint = self.pick()
            if endpoint is not None:
                return endpoint
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.ready_event.clear()
            # Wake at least every QUARANTINE_S: a quarantined endpoint comes back silently.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, QUARANTINE_S)):
                    await self.ready_event.wait()


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


_DECOY = (_digest(os.urandom(32)),)
"""Compared against when there is no such deployment, so that answer costs the same work."""


def published_digests(obj: Mapping[str, Any], spec: InferenceDeploymentSpec) -> tuple[bytes, ...]:
    """The key digests in ``status.auth``, if they were read from the Secret the spec names
    now (a spec that just switched Secrets accepts nothing until the operator publishes the
    new one's); anything malformed accepts nothing."""
    raw = (obj.get("status") or {}).get("auth")
    if spec.auth is None or not isinstance(raw, Mapping):
        return ()
    try:
        published = AuthStatus.model_validate(raw)
    except ValueError:
        return ()
    if published.secret_name != spec.auth.secret_name:
        return ()
    return tuple(bytes.fromhex(digest) for digest in published.key_digests)


class Targets:
    """The gateway's whole view, updated by watch events.

    ``require_auth``: every deployment requires an API key (one without spec.auth then
    accepts nothing), and no answer to a request without a valid key says whether the
    deployment exists.
    """

    def __init__(self, require_auth: bool = False) -> None:
        self.require_auth = require_auth
        self.targets: dict[Key, Target] = {}
        self._pods: dict[Key, dict[str, tuple[str, bool]]] = {}
        """Per deployment: pod name -> (pod IP, ready)."""

    def get(self, key: Key) -> Target | None:
        return self.targets.get(key)

    # -- watch events --------------------------------------------------------------
    def upsert_deployment(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        try:
            spec = InferenceDeploymentSpec.model_validate(obj.get("spec", {}))
        except ValueError:
            self.remove_deployment(key)
            return
        target = self.targets.get(key)
        if target is None:
            target = Target(meta["namespace"], meta["name"], None, 0.0)
            self.targets[key] = target
        target.port = spec.serving_port()
        target.cold_start_timeout_s = float(spec.scaling.cold_start_timeout_seconds)
        target.container_concurrency = spec.scaling.container_concurrency
        target.max_queue = spec.scaling.max_queue
        target.auth_required = spec.auth is not None or self.require_auth
        target.key_digests = published_digests(obj, spec)
        self._refresh(key)

    def remove_deployment(self, key: Key) -> None:
        target = self.targets.pop(key, None)
        if target is not None:
            target.gone = True
            target.ready_event.set()
            target.meters.remove()

    def upsert_pod(self, deployment: str, obj: Mapping[str, Any]) -> None:
        pod = PodView.from_object(obj)
        key = (pod.namespace, deployment)
        self._pods.setdefault(key, {})[pod.name] = (pod.ip or "", pod.serving)
        self._refresh(key)

    def remove_pod(self, deployment: str, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], deployment)
        pods = self._pods.get(key, {})
        pods.pop(meta["name"], None)
        if not pods:
            self._pods.pop(key, None)
        self._refresh(key)

    def _refresh(self, key: Key) -> None:
        target = self.targets.get(key)
        if target is None:
            return
        ready = {pod: ip for pod, (ip, ok) in self._pods.get(key, {}).items() if ok and target.port}
        for pod in list(target.endpoints):
            if pod not in ready:
                del target.endpoints[pod]
        for pod, ip in ready.items():
            address = f"{ip}:{target.port}"
            current = target.endpoints.get(pod)
            if current is None or current.address != address:
                target.endpoints[pod] = Endpoint(pod, address)
        target.meters.ready_endpoints.set(len(target.endpoints))
        if target.endpoints:
            target.ready_event.set()

    # -- auth ----------------------------------------------------------------------
    def authorized(self, target: Target | None, authorization: str | None) -> bool:
        """Constant-time check of ``Authorization: Bearer <key>`` against the published
        digests. A deployment that requires no key is open; one with no published digest
        accepts nothing (fail closed); no key opens a deployment that does not exist, and
        checking costs the same there (a decoy digest)."""
        if target is not None and not target.auth_required:
            return True
        scheme, _, presented = (authorization or "").partition(" ")
        candidate = _digest(presented.strip().encode("latin-1"))
        matched = False
        for digest in target.key_digests if target is not None else _DECOY:
            matched |= hmac.compare_digest(candidate, digest)
        return matched and target is not None and scheme.lower() == "bearer"
