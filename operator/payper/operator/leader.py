"""Exactly one active operator: leader election on a coordination.k8s.io Lease.

A second instance waits until the Lease expires. Expiry is judged by this instance's own
monotonic clock from the moment it last saw the record change (as client-go does), so
clock skew between nodes cannot hand leadership over early. The leader renews every few
seconds; if it cannot renew within the lease duration it stops (the process exits and
restarts), because another instance may already lead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from payper.kube import ApiError, Kube, resource_path

logger = logging.getLogger(__name__)


class LostLeadership(Exception):  # noqa: N818 - a state, not a programming error
    pass


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        duration_s: int = 15,
        renew_s: float = 2.0,
    ) -> None:
        self.kube = kube
        self.path = resource_path("coordination.k8s.io/v1", "leases", namespace, name)
        self.collection = resource_path("coordination.k8s.io/v1", "leases", namespace)
        self.identity = identity
        self.duration_s = duration_s
        self.renew_s = renew_s
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self.is_leader = False
        self.holder: str | None = None
        """The holder seen by the last attempt."""

    def _spec(self, transitions: int, acquired: str | None = None) -> dict[str, Any]:
        now = _micro_time()
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration_s,
            "acquireTime": acquired or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def try_acquire(self) -> bool:
        lease = await self.kube.get_or_none(self.path)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.path.rsplit("/", 1)[-1]},
                "spec": self._spec(0),
            }
            try:
                await self.kube.create(self.collection, body)
                self.holder = self.identity
            except ApiError as error:
                if error.conflict:
                    return False
                raise
            return True
        spec = lease.get("spec", {})
        record = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        holder = spec.get("holderIdentity")
        self.holder = holder
        expired = time.monotonic() - self._observed_at > spec.get(
            "leaseDurationSeconds", self.duration_s
        )
        if holder not in (None, "", self.identity) and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if holder == self.identity else 1)
        acquired = spec.get("acquireTime") if holder == self.identity else None
        lease["spec"] = self._spec(transitions, acquired)
        try:
            await self.kube.replace(self.path, lease)
        except ApiError as error:
            if error.conflict:
                return False
            raise
        return True

    async def acquire(self) -> None:
        while True:
            try:
                if await self.try_acquire():
                    self.is_leader = True
                    logger.info("acquired the lease %s as %s", self.path, self.identity)
                    return
            except (ApiError, OSError) as error:
                logger.warning("leader election: %s", error)
            await asyncio.sleep(self.renew_s)

    async def keep(self) -> None:
        """Renew until leadership is lost; then raise LostLeadership."""
        last_renewal = time.monotonic()
        while True:
            await asyncio.sleep(self.renew_s)
            # A renewal that is still waiting (a slow or throttling API server: the
            # client retries a 429) must not outlast the lease it renews.
            left = last_renewal + self.duration_s - time.monotonic()
            try:
                async with asyncio.timeout(max(left, 0.001)):
                    renewed = await self.try_acquire()
                if renewed:
                    last_renewal = time.monotonic()
                    continue
            except (ApiError, OSError, TimeoutError) as error:
                logger.warning("lease renewal failed: %s", error or "no answer in time")
            if self.holder not in (None, "", self.identity):
                self.is_leader = False
                raise LostLeadership(f"{self.holder} holds {self.path} now")
            if time.monotonic() - last_renewal > self.duration_s:
                self.is_leader = False
                raise LostLeadership(f"could not renew {self.path} for {self.duration_s}s")

    async def release(self) -> None:
        """Give the lease up at a clean shutdown so a successor need not wait."""
        if not self.is_leader:
            return
        lease = await self.kube.get_or_none(self.path)
        if lease is None or lease.get("spec", {}).get("holderIdentity") != self.identity:
            return
        lease["spec"]["holderIdentity"] = None
        lease["spec"]["leaseDurationSeconds"] = 1
        try:
            await self.kube.replace(self.path, lease)
        except ApiError as error:
            logger.warning("releasing the lease: %s", error)
        self.is_leader = False
