"""What the gateway knows about each InferenceDeployment: ready endpoints, load, waiters.

Fed by watches of InferenceDeployments, their Pods (IP and Ready condition, read from the
Pods themselves: no Service VIP, no EndpointSlice batching delay, and loopback pod IPs
work) and API key Secrets. Read on every request, so everything here is plain data and
O(endpoints) at worst.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from payper.api.inference_deployment import InferenceDeploymentSpec
from payper.gateway import metrics
from payper.observed import Key, PodView

API_KEY_SECRET_TYPE = "payper.dev/api-keys"


class TargetGone(Exception):  # noqa: N818 - a signal to waiters, not an error of the caller
    """The InferenceDeployment was deleted while a request waited for it."""


QUARANTINE_S = 1.0
"""An endpoint that refused a connection is skipped this long (its process may be stopping)."""


@dataclass
class Endpoint:
    pod: str
    address: str
    in_flight: int = 0
    unreachable_until: float = 0.0

    def quarantine(self) -> None:
        self.unreachable_until = time.monotonic() + QUARANTINE_S


@dataclass
class Target:
    namespace: str
    name: str
    port: int | None
    cold_start_timeout_s: float
    auth_secret: str | None
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    in_flight: int = 0
    queued: int = 0
    requests_total: int = 0
    last_request_at: float | None = None
    """time.monotonic() of the last request's arrival."""
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False
    meters: metrics.TargetMeters = field(init=False)

    def __post_init__(self) -> None:
        self.meters = metrics.TargetMeters(self.namespace, self.name)

    def pick(self) -> Endpoint | None:
        """The reachable ready endpoint with the fewest requests in flight."""
        best: Endpoint | None = None
        now = 0.0
        for endpoint in self.endpoints.values():
            if endpoint.unreachable_until:
                now = now or time.monotonic()
                if endpoint.unreachable_until > now:
                    continue
            if best is None or endpoint.in_flight < best.in_flight:
                best = endpoint
        return best

    def quarantine_left(self) -> float:
        """Seconds until the first quarantined endpoint may be tried again."""
        now = time.monotonic()
        waits = [e.unreachable_until - now for e in self.endpoints.values()]
        return max(0.0, min(waits, default=0.0))

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


class Targets:
    """The gateway's whole view, updated by watch events."""

    def __init__(self) -> None:
        self.targets: dict[Key, Target] = {}
        self._pods: dict[Key, dict[str, tuple[str, bool]]] = {}
        """Per deployment: pod name -> (pod IP, ready)."""
        self._keys: dict[Key, list[bytes]] = {}
        """Per Secret (namespace, name): SHA-256 digests of its API keys."""

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
            target = Target(meta["namespace"], meta["name"], None, 0.0, None)
            self.targets[key] = target
        target.port = spec.serving_port()
        target.cold_start_timeout_s = float(spec.scaling.cold_start_timeout_seconds)
        target.auth_secret = spec.auth.secret_name if spec.auth else None
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

    def upsert_secret(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        digests = []
        for value in (obj.get("data") or {}).values():
            raw = base64.b64decode(value).strip()
            if raw:
                digests.append(_digest(raw))
        self._keys[(meta["namespace"], meta["name"])] = digests

    def remove_secret(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        self._keys.pop((meta["namespace"], meta["name"]), None)

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
    def authorized(self, target: Target, authorization: str | None) -> bool:
        """Constant-time check of ``Authorization: Bearer <key>`` against the Secret's keys.

        A deployment without ``spec.auth`` is open; one whose Secret is missing, empty or
        of the wrong type accepts nothing (fail closed).
        """
        if target.auth_secret is None:
            return True
        scheme, _, presented = (authorization or "").partition(" ")
        candidate = _digest(presented.strip().encode())
        matched = False
        for digest in self._keys.get((target.namespace, target.auth_secret), []):
            matched |= hmac.compare_digest(candidate, digest)
        return matched and scheme.lower() == "bearer"
