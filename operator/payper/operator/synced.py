"""Synced: the operator's view has caught up with the cluster once, after it starts leading.

The ledger prices a new record from what the operator sees: the namespace's labels (plan
grants select by label) and the deployment's spec (its plan). A record's spec is a
snapshot that never changes, so a record created before the watches delivered those
would price a whole window wrong (the platform's default plan instead of the one
granted). So when an operator starts leading it lists, once, every Namespace,
InferenceDeployment and Pod (names only, page by page), and the view counts as synced
once each listed object has reached the registry through the watches. An object deleted
in between never arrives: it is looked up again every few seconds and dropped once the
API server no longer has it; past ``deadline_ms`` (a stuck watch, a listing that keeps
failing) the view counts as synced anyway, said in a log line and a metric, so billing
never waits for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from payper.api.common import API_VERSION
from payper.api.inference_deployment import PLURAL as INFERENCE_DEPLOYMENTS
from payper.clock import now_ms
from payper.kube import ApiError, Kube, resource_path
from payper.observed import Key
from payper.operator import metrics
from payper.operator.state import Registry

logger = logging.getLogger(__name__)
DEADLINE_MS = 120_000
PAGE = 500


async def _names(kube: Kube, path: str) -> list[tuple[str, str, str]]:
    """(namespace, name, uid) of every object of a collection, a page at a time (only
    these are kept: 10,000 pods are a few hundred kB here)."""
    found: list[tuple[str, str, str]] = []
    query = {"limit": str(PAGE)}
    while True:
        page = await kube.get(path, query)
        for item in page.get("items") or []:
            meta = item["metadata"]
            found.append((meta.get("namespace", ""), meta["name"], meta.get("uid", "")))
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return found
        query["continue"] = token


class Synced:
    def __init__(
        self,
        registry: Registry,
        deadline_ms: int = DEADLINE_MS,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.registry = registry
        self.deadline_ms = deadline_ms
        self.clock = clock
        self.namespaces: set[str] = set()
        self.deployments: set[Key] = set()
        self.pods: dict[str, tuple[str, str]] = {}
        """Listed pods not seen yet: UID -> (namespace, name)."""
        self._started: int | None = None
        self._listed = False
        self._done = False

    async def run(self, kube: Kube, every_s: float = 2.0) -> None:
        """List once (again after a failure), then, until synced, look up what is still
        missing: an object deleted since the listing never arrives, and is dropped. The
        deadline counts from here."""
        self._started = self.clock()
        while not self._listed and not self():
            try:
                await self.list_once(kube)
            except (ApiError, OSError, TimeoutError) as error:
                logger.warning("listing what the watches must deliver: %s (again)", error)
                await asyncio.sleep(every_s)
        while not self():
            await asyncio.sleep(every_s)
            await self.forget_gone(kube)

    async def list_once(self, kube: Kube) -> None:
        """What the API server holds now: what the watches must deliver."""
        self._started = self._started if self._started is not None else self.clock()
        self.namespaces = {n for _, n, _ in await _names(kube, resource_path("v1", "namespaces"))}
        self.deployments = {
            (ns, n)
            for ns, n, _ in await _names(kube, resource_path(API_VERSION, INFERENCE_DEPLOYMENTS))
        }
        self.pods = {uid: (ns, n) for ns, n, uid in await _names(kube, resource_path("v1", "pods"))}
        self._listed = True
        self._done = False

    async def forget_gone(self, kube: Kube, most: int = PAGE) -> None:
        """Drop the missing objects the API server no longer has (at most ``most``)."""
        paths: list[tuple[str, Callable[[], None]]] = []
        for name in list(self.namespaces):
            paths.append(
                (resource_path("v1", "namespaces", name=name), _drop(self.namespaces, name))
            )
        for key in list(self.deployments):
            path = resource_path(API_VERSION, INFERENCE_DEPLOYMENTS, *key)
            paths.append((path, _drop(self.deployments, key)))
        for uid, (namespace, name) in list(self.pods.items()):
            path = resource_path("v1", "pods", namespace, name)
            paths.append((path, _drop_pod(self.pods, uid)))
        for path, drop in paths[:most]:
            try:
                if await kube.get_or_none(path) is None:
                    drop()
            except (ApiError, OSError, TimeoutError) as error:
                logger.warning("looking up %s: %s", path, error)
                return

    def missing(self) -> tuple[int, int, int]:
        """Listed namespaces, deployments and pods the registry has not seen yet."""
        registry = self.registry
        self.namespaces = {
            n
            for n in self.namespaces
            if n not in registry.namespace_labels and not registry.namespace_ending(n)
        }
        self.deployments = {
            k
            for k in self.deployments
            if k not in registry.tracked and k not in registry.seen_deployments
        }
        self.pods = {
            uid: where
            for uid, where in self.pods.items()
            if uid not in registry.all_pods and uid not in registry.gone_pods
        }
        return len(self.namespaces), len(self.deployments), len(self.pods)

    def __call__(self) -> bool:
        """Whether the view has caught up once (it stays so)."""
        if self._done:
            return True
        if self._started is None:
            return False
        missing = self.missing()
        if self._listed and not any(missing):
            self._done = True
            logger.info("the operator's watches have caught up with the cluster")
        elif self.clock() - self._started >= self.deadline_ms:
            self._done = True
            metrics.SYNC_DEADLINE_PASSED.inc()
            logger.warning(
                "the watches did not deliver %d namespaces, %d InferenceDeployments and %d "
                "pods listed (or the listing failed) within %d s: billing goes on",
                *missing,
                self.deadline_ms // 1000,
            )
        return self._done


def _drop(found: set[Any], item: Any) -> Callable[[], None]:
    return lambda: found.discard(item)


def _drop_pod(pods: dict[str, tuple[str, str]], uid: str) -> Callable[[], None]:
    return lambda: pods.pop(uid, None) and None
