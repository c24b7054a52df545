"""The one module of Payper that talks to the Kubernetes API.

A small asyncio client on aiohttp: the gateway, the operator's own loops, the agent and
the CLI all need list/watch/patch/apply without blocking an event loop, and the official
``kubernetes`` client is synchronous. Credentials come from the ``kubernetes`` package's
kubeconfig / in-cluster loaders, so every auth method they support works here too
(client certificates, tokens, exec plugins, rotating projected tokens).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from payper.api.common import ApiModel

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
logger = logging.getLogger(__name__)
STRICT = {"fieldValidation": "Strict"}
WARNINGS_ENV = "PAYPER_API_WARNINGS"
"""``error`` turns every warning the API server sends into an ApiError (the tests set it)."""
THROTTLED_RETRIES = 10
"""A 429 (the API server's flow control, or a resource's storage still initializing
after a CRD change) was not acted on: the request is sent again after its Retry-After,
at most this many times (as client-go does). Callers with a deadline of their own (the
lease renewal) bound the whole call."""
MAX_RETRY_AFTER_S = 10.0
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def retry_after_s(value: str | None) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds; 1 if absent or not a
    number), within 0.1 and ``MAX_RETRY_AFTER_S``."""
    try:
        seconds = float(value) if value is not None else 1.0
    except ValueError:
        seconds = 1.0
    if math.isnan(seconds):
        seconds = 1.0
    return min(max(seconds, 0.1), MAX_RETRY_AFTER_S)


class ApiError(Exception):
    """The API server answered with an error status; ``reason`` is its Status reason. Raised
    as one of the subclasses below where the status says what happened (``api_error``)."""

    def __init__(self, status: int, body: Any, method: str, path: str) -> None:
        self.status = status
        self.body = body
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        self.message = body.get("message", str(body)) if isinstance(body, dict) else str(body)
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def causes(self) -> list[str]:
        """The reasons of the Status's ``details.causes``."""
        details = self.body.get("details") if isinstance(self.body, dict) else None
        causes = (details or {}).get("causes") if isinstance(details, dict) else None
        return [c.get("reason", "") for c in causes or [] if isinstance(c, dict)]


class NotFoundError(ApiError):
    """404: the object (or its namespace) does not exist."""


class ConflictError(ApiError):
    """409: a stale resourceVersion, a name taken, or a failed precondition."""


class ForbiddenError(ApiError):
    """403: RBAC, an admission policy, or a namespace being terminated."""


class NamespaceTerminatingError(ForbiddenError):
    """403 with the cause ``NamespaceTerminating``: nothing new is created there again."""


class InvalidError(ApiError):
    """422: the object breaks its schema or a validation rule (a Final record changed)."""


class ThrottledError(ApiError):
    """429 after every retry: the API server's flow control kept refusing."""


class ServerError(ApiError):
    """5xx: the API server (or etcd) failed; a retry may succeed."""


_BY_STATUS: dict[int, type[ApiError]] = {
    404: NotFoundError,
    409: ConflictError,
    403: ForbiddenError,
    422: InvalidError,
    429: ThrottledError,
}


def api_error(status: int, body: Any, method: str, path: str) -> ApiError:
    """The error an answer means, as the most specific ``ApiError`` subclass."""
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    error = kind(status, body, method, path)
    if kind is ForbiddenError and "NamespaceTerminating" in error.causes:
        return NamespaceTerminatingError(status, body, method, path)
    return error


class WatchExpiredError(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again and re-watch."""


def resource_path(
    api_version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The REST path of a collection or object, e.g. ``/apis/apps/v1/namespaces/x/deployments``."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [prefix]
    if namespace is not None:
        parts.append(f"namespaces/{quote(namespace, safe='')}")
    parts.append(plural)
    if name is not None:
        parts.append(quote(name, safe=""))
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


@dataclass
class Credentials:
    host: str
    ssl_context: ssl.SSLContext | bool
    configuration: k8s_client.Configuration

    def authorization(self) -> str | None:
        cfg = self.configuration
        if cfg.refresh_api_key_hook is not None:
            cfg.refresh_api_key_hook(cfg)
        value = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
        if value is None:
            return None
        prefix = cfg.api_key_prefix.get("authorization")
        return f"{prefix} {value}" if prefix else str(value)


def load_credentials(kubeconfig: str | os.PathLike[str] | None = None) -> Credentials:
    """From a kubeconfig file (argument, then KUBECONFIG), else in-cluster, else ~/.kube/config."""
    cfg = k8s_client.Configuration()
    path = os.fspath(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG")
    if path:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=cfg, persist_config=False
        )
    elif os.path.exists(IN_CLUSTER_TOKEN) and "KUBERNETES_SERVICE_HOST" in os.environ:
        k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=cfg, persist_config=False
        )
    context: ssl.SSLContext | bool
    if cfg.verify_ssl:
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if cfg.cert_file and cfg.key_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
    else:
        context = False
    return Credentials(host=cfg.host.rstrip("/"), ssl_context=context, configuration=cfg)


@dataclass(frozen=True)
class Answer:
    """What the API server answered to one call."""

    status: int
    payload: Any
    retry_after: str | None = None
    warnings: list[str] = field(default_factory=list)


class Kube:
    """An async Kubernetes API client; use as ``async with Kube.connect(...) as kube``."""

    def __init__(self, credentials: Credentials, timeout_s: float = 30.0) -> None:
        self.credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def connect(cls, kubeconfig: str | os.PathLike[str] | None = None) -> Kube:
        return cls(load_credentials(kubeconfig))

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.credentials.ssl_context, limit=64)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        auth = self.credentials.authorization()
        if auth:
            headers["Authorization"] = auth
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call: its answer, a 429 sent again after its Retry-After (at most
        ``THROTTLED_RETRIES`` times), an error status raised as ``ApiError``."""
        data = None if body is None else json.dumps(body).encode()
        throttled = 0
        while True:
            answer = await self.send(method, path, data, params, content_type)
            if answer.status == 429 and throttled < THROTTLED_RETRIES:
                throttled += 1
                wait = retry_after_s(answer.retry_after)
                logger.info("%s %s: 429 (%s), again in %.1fs", method, path, answer.payload, wait)
                await asyncio.sleep(wait)
                continue
            if answer.status >= 400:
                raise api_error(answer.status, answer.payload, method, path)
            if answer.warnings:
                logger.warning("Kubernetes API warning on %s %s: %s", method, path, answer.warnings)
                if os.environ.get(WARNINGS_ENV) == "error":
                    message = "; ".join(answer.warnings)
                    raise ApiError(299, {"message": message}, method, path)
            return answer.payload

    async def send(
        self,
        method: str,
        path: str,
        data: bytes | None,
        params: Mapping[str, str] | None,
        content_type: str,
    ) -> Answer:
        """One HTTP round trip to the API server, its answer as it came (the one method an
        in-memory API for tests replaces: ``payper_dev.testing.memory_api``). A broken
        connection is a ``ConnectionError`` (an ``OSError``), as a refused one already is:
        callers that go on after a failed call need not know aiohttp."""
        try:
            async with self.session.request(
                method,
                self.credentials.host + path,
                data=data,
                params=params,
                headers=self._headers(content_type if data is not None else None),
                timeout=self._timeout,
            ) as response:
                raw = await response.read()
                try:
                    payload: Any = json.loads(raw) if raw else None
                except ValueError:
                    payload = raw.decode(errors="replace")
                return Answer(
                    response.status,
                    payload,
                    response.headers.get("Retry-After"),
                    response.headers.getall("Warning", []),
                )
        except aiohttp.ClientError as error:
            if isinstance(error, OSError):
                raise
            raise ConnectionError(f"{method} {path}: {error!r}") from error

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        return await self.request("GET", path, params=params)

    async def get_or_none(self, path: str) -> Any:
        try:
            return await self.get(path)
        except ApiError as error:
            if error.not_found:
                return None
            raise

    async def create(self, path: str, body: Mapping[str, Any]) -> Any:
        return await self.request("POST", path, body=body)

    async def replace(self, path: str, body: Mapping[str, Any]) -> Any:
        return await self.request("PUT", path, body=body)

    async def patch(
        self,
        path: str,
        body: Any,
        patch_type: str = MERGE_PATCH,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        return await self.request("PATCH", path, body=body, params=params, content_type=patch_type)

    async def replace_status(self, path: str, obj: Mapping[str, Any], status: ApiModel) -> Any:
        """Replace a status subresource (optimistic concurrency on ``obj``'s
        resourceVersion) with a typed status, serialised here; strict as below."""
        return await self.request(
            "PUT", path, body={**obj, "status": status.to_wire()}, params=STRICT
        )

    async def write_status(self, path: str, status: ApiModel, clear: tuple[str, ...] = ()) -> Any:
        """Merge-patch a status subresource with a typed status, serialised here and only
        here; strict field validation turns a field the CRD does not know into an error
        instead of a silent prune. ``clear``: status fields to remove (a merge patch keeps
        the fields it does not mention)."""
        wire = status.to_wire()
        for name in clear:
            wire.setdefault(name, None)
        return await self.patch(path, {"status": wire}, params=STRICT)

    async def apply(
        self, path: str, body: Mapping[str, Any], field_manager: str, force: bool = True
    ) -> Any:
        """Server-side apply: idempotent, and owns exactly the fields in ``body``."""
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        return await self.request("PATCH", path, body=body, params=params, content_type=APPLY_PATCH)

    async def post_event(
        self,
        involved: Mapping[str, str],
        namespace: str,
        reason: str,
        message: str,
        at_iso: str,
        type_: str = "Warning",
    ) -> bool:
        """Post a core/v1 Event about ``involved`` (apiVersion, kind, name[, namespace]);
        whether it was posted. An event is news for people, never worth failing over: a
        refusal is logged, not raised."""
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved['name'][:200]}.", "namespace": namespace},
            "involvedObject": dict(involved),
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": "payper-operator"},
            "firstTimestamp": at_iso,
            "lastTimestamp": at_iso,
            "count": 1,
        }
        try:
            await self.create(resource_path("v1", "events", namespace), event)
        except (ApiError, OSError, TimeoutError) as error:
            logger.warning("event %s about %s not posted: %s", reason, involved["name"], error)
            return False
        return True

    async def delete(
        self, path: str, params: Mapping[str, str] | None = None, body: Any = None
    ) -> Any:
        """DELETE; None when it was gone already. ``body``: DeleteOptions (preconditions,
        grace)."""
        try:
            return await self.request("DELETE", path, params=params, body=body)
        except ApiError as error:
            if error.not_found:
                return None
            raise

    async def list(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """All pages of a collection, merged into one list object."""
        query = dict(params or {})
        query.setdefault("limit", "500")
        result: dict[str, Any] | None = None
        while True:
            page = await self.get(path, query)
            if result is None:
                result = page
            else:
                result["items"].extend(page["items"])
                result["metadata"] = page["metadata"]
            token = page.get("metadata", {}).get("continue")
            if not token:
                return result
            query["continue"] = token

    async def watch(
        self,
        path: str,
        resource_version: str,
        params: Mapping[str, str] | None = None,
        timeout_s: int = 300,
    ) -> AsyncIterator[dict[str, Any]]:
        """Events from ``resource_version`` on; ends when the server closes the watch.

        Raises WatchExpiredError when the version is too old; the caller lists again.
        """
        query = {
            **(params or {}),
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        async with self.session.get(
            self.credentials.host + path,
            params=query,
            headers=self._headers(None),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout_s + 30),
        ) as response:
            if response.status >= 400:
                raise ApiError(response.status, await response.text(), "WATCH", path)
            async for line in _lines(response.content, path):
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object", {})
                    if status.get("code") == 410:
                        raise WatchExpiredError(status.get("message", "resource version expired"))
                    raise ApiError(status.get("code", 500), status, "WATCH", path)
                yield event

    async def wait_ready(self, deadline_s: float) -> None:
        """Until /readyz answers ok, or TimeoutError after ``deadline_s``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline_s
        last: Exception | None = None
        while loop.time() < until:
            try:
                if await self.request("GET", "/readyz") in ("ok", None):
                    return
            except (ApiError, aiohttp.ClientError, OSError) as error:
                last = error
            await asyncio.sleep(0.2)
        raise TimeoutError(f"API server at {self.credentials.host} not ready: {last}")


MAX_WATCH_EVENT_BYTES = 16 * 1024 * 1024
"""Far above the largest object the API server stores (etcd's request limit, 1.5 MiB, as
JSON): aiohttp's own line limit (512 KiB) broke watches on a large Secret or object."""


async def _lines(content: aiohttp.StreamReader, path: str) -> AsyncIterator[bytes]:
    """The newline-delimited events of a watch, each whole, however large (within bounds)."""
    buffer = bytearray()
    scanned = 0
    async for chunk in content.iter_any():
        buffer += chunk
        while (newline := buffer.find(b"\n", scanned)) >= 0:
            yield bytes(buffer[:newline])
            del buffer[: newline + 1]
            scanned = 0
        scanned = len(buffer)
        if scanned > MAX_WATCH_EVENT_BYTES:
            raise ApiError(413, {"message": "watch event over 16 MiB"}, "WATCH", path)
    # A partial last line is a cut connection: the next watch resumes before that event.


EventHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


class Informer:
    """List, then watch, a collection; keeps a cache and calls ``handler`` on every change.

    ``handler(type, obj)`` gets ``ADDED``, ``MODIFIED`` or ``DELETED``. After a broken or
    expired watch it lists again and reconciles the cache, emitting the events that were
    missed (objects deleted meanwhile arrive as ``DELETED``), so a consumer never needs
    its own resync logic. ``synced`` is set once the first list has been delivered.
    With ``metadata_only`` the cache keeps each object's name, namespace and
    resourceVersion and nothing else (Secrets: their data is never held here), and a
    deletion found by a relist is delivered with that metadata alone.
    """

    def __init__(
        self,
        kube: Kube,
        path: str,
        handler: EventHandler,
        params: Mapping[str, str] | None = None,
        retry_s: float = 1.0,
        metadata_only: bool = False,
    ) -> None:
        self.kube = kube
        self.path = path
        self.handler = handler
        self.params = dict(params or {})
        self.retry_s = retry_s
        self.metadata_only = metadata_only
        self.cache: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()

    def _kept(self, obj: dict[str, Any]) -> dict[str, Any]:
        if not self.metadata_only:
            return obj
        meta = obj.get("metadata", {})
        kept = ("namespace", "name", "resourceVersion")
        return {"metadata": {name: meta[name] for name in kept if name in meta}}

    @staticmethod
    def key(obj: Mapping[str, Any]) -> str:
        meta = obj.get("metadata", {})
        return f"{meta.get('namespace', '')}/{meta.get('name', '')}"

    async def _relist(self) -> str:
        listing = await self.kube.list(self.path, self.params)
        fresh = {self.key(item): item for item in listing.get("items", [])}
        for key in list(self.cache):
            if key not in fresh:
                await self.handler("DELETED", self.cache.pop(key))
        for key, item in fresh.items():
            kind = "MODIFIED" if key in self.cache else "ADDED"
            old = self.cache.get(key)
            self.cache[key] = self._kept(item)
            if old is None or old["metadata"].get("resourceVersion") != item["metadata"].get(
                "resourceVersion"
            ):
                await self.handler(kind, item)
        self.synced.set()
        return str(listing["metadata"]["resourceVersion"])

    async def run(self) -> None:
        """Runs until cancelled."""
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._relist()
                async for event in self.kube.watch(self.path, version, self.params):
                    obj = event["object"]
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if event["type"] == "BOOKMARK":
                        continue
                    key = self.key(obj)
                    if event["type"] == "DELETED":
                        self.cache.pop(key, None)
                    else:
                        self.cache[key] = self._kept(obj)
                    await self.handler(event["type"], obj)
            except WatchExpiredError:
                version = None
            except (TimeoutError, ApiError, aiohttp.ClientError, OSError, ValueError) as error:
                logger.warning(
                    "watch %s failed (%s); relisting in %.1fs", self.path, error, self.retry_s
                )
                version = None
                await asyncio.sleep(self.retry_s)
