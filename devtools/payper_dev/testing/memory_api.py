"""An in-memory Kubernetes API behind Payper's own client, with faults injectable per call.

``MemoryKube`` is a ``payper.kube.Kube`` whose one round trip (``send``) is answered by a
store in this process instead of an API server: every helper of the client (get, list with
paging, create, replace, the status subresource, merge patches, deletes with
preconditions, events, the 429 retry) runs unchanged on top of it. So the money path's
I/O shell — the ledger, its record store, its progress, the exporter — is tested against
conflicts, refusals, timeouts and lost answers in milliseconds, where the real API server
(tests/integration) takes seconds per case.

What it keeps of the API server's behaviour, because the ledger depends on it:
resourceVersions and 409 Conflict on a stale one (422 on none, in the update of a custom
resource); 409 AlreadyExists; 404; the status subresource (a write of the object ignores
its status, a write of the status everything else); the BillingRecord CRD's rules (spec
immutable, a Final record's status frozen: 422); label selectors (``k=v``, ``k!=v``,
``k``, ``!k``) with ``limit`` and ``continue``; deletes with a UID precondition (409) and
finalizers (a deletion timestamp until the last one goes); 403 for a create in a namespace
being terminated (with the ``NamespaceTerminating`` cause); watches of a collection, and
410 Gone for one from a version older than the last ``expire_watches`` (etcd compacted).
Not kept: label or field selectors on watches, field selectors on lists, server-side
apply, admission webhooks and policies.

Faults: ``fail`` queues an answer (an error status, a timeout, or the call committed and
its answer lost) for the calls a matcher picks; ``calls`` logs every call, so a test can
fail "call number k" of a flush.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from payper.kube import Answer, Credentials, Kube, WatchExpiredError

STATUS_SUBRESOURCE = {"billingrecords", "inferencedeployments"}
"""The kinds whose status is a subresource (as their CRDs say)."""
CUSTOM_RESOURCES = "/apis/payper.dev/"
"""The path prefix of the kinds that are custom resources (CRDs): an update (PUT) of one
must carry a resourceVersion (422 otherwise), where a ConfigMap's may leave it out."""
LOST = "lost"
"""A fault kind: the call is carried out, then its answer is lost (a timeout)."""
TIMEOUT = "timeout"
"""A fault kind: the call times out before it reaches the store."""
DISCONNECT = "disconnect"
"""A fault kind: the connection breaks before the call reaches the store (the client
raises ``ConnectionError``, as for aiohttp's ServerDisconnectedError)."""


@dataclass
class Call:
    method: str
    path: str
    params: dict[str, str]


@dataclass
class Fault:
    """What the next ``times`` calls that ``matches`` picks answer: an HTTP status, or
    ``TIMEOUT`` / ``LOST``."""

    matches: Callable[[Call], bool]
    answer: int | str
    times: int = 1
    retry_after: str | None = None


@dataclass
class _Where:
    collection: str
    """The collection path (with namespace, if namespaced), e.g. /api/v1/namespaces/x/pods."""
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


def _where(path: str) -> _Where:
    parts = [unquote(p) for p in path.strip("/").split("/")]
    base = 2 if parts[0] == "api" else 3  # api/v1 | apis/group/version
    rest = parts[base:]
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:  # not the namespace object itself
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    prefix = "/" + "/".join(parts[:base])
    collection = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    return _Where(collection, plural, namespace, name, subresource)


def _status(code: int, reason: str, message: str) -> Answer:
    return Answer(
        code,
        {"kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message},
    )


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _selected(labels: Mapping[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.rstrip("=")) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class MemoryApi:
    """The store: objects by collection path and name, one resourceVersion counter."""

    objects: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    terminating: set[str] = field(default_factory=set)
    """Namespaces being deleted: a create in one answers 403."""
    calls: list[Call] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    events: list[tuple[int, str, str, dict[str, Any]]] = field(default_factory=list)
    """Every change as a watch sees it: (resourceVersion, collection, type, object)."""
    expired_before: int = 0
    """A watch from an older resourceVersion answers 410 Gone (``expire_watches``)."""
    _versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _last: int = 0
    _changed: asyncio.Event | None = None

    def fail(
        self,
        answer: int | str,
        method: str | None = None,
        path_contains: str = "",
        times: int = 1,
        retry_after: str | None = None,
        when: Callable[[Call], bool] | None = None,
    ) -> None:
        """The next ``times`` calls with ``method`` whose path contains ``path_contains``
        (and that ``when`` picks) answer ``answer``: a status code, ``TIMEOUT`` or ``LOST``."""

        def matches(call: Call) -> bool:
            return (
                (method is None or call.method == method)
                and path_contains in call.path
                and (when is None or when(call))
            )

        self.faults.append(Fault(matches, answer, times, retry_after))

    def items(self, path: str) -> list[dict[str, Any]]:
        """The objects of a collection path (a copy), or of every namespace's, for a
        collection path without namespace."""
        where = _where(path)
        return [copy.deepcopy(o) for o in self._scope(where).values()]

    def get(self, path: str) -> dict[str, Any] | None:
        where = _where(path)
        found = self.objects.get(where.collection, {}).get(where.name or "")
        return copy.deepcopy(found) if found is not None else None

    def _scope(self, where: _Where) -> dict[str, dict[str, Any]]:
        if where.namespace is not None:
            return dict(self.objects.get(where.collection, {}))
        suffix = f"/{where.plural}"
        merged: dict[str, dict[str, Any]] = {}
        for collection, objects in self.objects.items():
            if collection.endswith(suffix):
                for name, obj in objects.items():
                    merged[f"{collection}/{name}"] = obj
        return merged

    def _version(self) -> str:
        self._last = next(self._versions)
        return str(self._last)

    def _emit(self, where: _Where, kind: str, obj: dict[str, Any]) -> None:
        version = int(obj["metadata"]["resourceVersion"])
        self.events.append((version, where.collection, kind, copy.deepcopy(obj)))
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def expire_watches(self) -> None:
        """As etcd's compaction: every open watch ends with 410 Gone, and a watch from a
        resourceVersion up to now is refused so; the watcher must list again."""
        self.expired_before = self._last + 1
        self._wake()

    async def changed(self, timeout_s: float) -> bool:
        """Until the next change (True), or ``timeout_s`` (False)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def watched(self, collection: str, where: _Where) -> bool:
        """Whether a change in ``collection`` is seen by a watch of ``where``."""
        if where.namespace is not None:
            return collection == where.collection
        return collection.endswith(f"/{where.plural}") and collection.startswith(
            where.collection.rsplit("/", 1)[0]
        )

    def answer(self, method: str, path: str, body: Any, params: Mapping[str, str]) -> Answer:
        call = Call(method, path, dict(params))
        self.calls.append(call)
        for fault in self.faults:
            if fault.times > 0 and fault.matches(call):
                fault.times -= 1
                if fault.answer == TIMEOUT:
                    raise TimeoutError(f"{method} {path}: injected timeout")
                if fault.answer == DISCONNECT:
                    raise ConnectionError(f"{method} {path}: injected disconnect")
                if fault.answer == LOST:
                    self._carry_out(method, path, body, params)
                    raise TimeoutError(f"{method} {path}: injected lost answer")
                assert isinstance(fault.answer, int)
                answer = _status(fault.answer, "Injected", f"injected {fault.answer}")
                return Answer(answer.status, answer.payload, fault.retry_after)
        return self._carry_out(method, path, body, params)

    def _carry_out(self, method: str, path: str, body: Any, params: Mapping[str, str]) -> Answer:
        where = _where(path)
        if method == "GET":
            return self._get(where, params)
        if method == "POST":
            return self._create(where, body)
        if method == "PUT":
            return self._replace(where, body)
        if method == "PATCH":
            return self._patch(where, body)
        if method == "DELETE":
            return self._delete(where, body or {})
        return _status(405, "MethodNotAllowed", method)

    def _get(self, where: _Where, params: Mapping[str, str]) -> Answer:
        if where.name is not None:
            found = self.objects.get(where.collection, {}).get(where.name)
            if found is None:
                return _status(404, "NotFound", f'{where.plural} "{where.name}" not found')
            return Answer(200, copy.deepcopy(found))
        selector = params.get("labelSelector", "")
        chosen = [
            obj
            for _, obj in sorted(self._scope(where).items())
            if _selected(obj["metadata"].get("labels") or {}, selector)
        ]
        start = int(params.get("continue") or 0)
        limit = int(params.get("limit") or 0) or len(chosen) or 1
        page = chosen[start : start + limit]
        more = start + limit < len(chosen)
        metadata = {"resourceVersion": self._version()}
        if more:
            metadata["continue"] = str(start + limit)
        return Answer(200, {"items": copy.deepcopy(page), "metadata": metadata})

    def _create(self, where: _Where, body: dict[str, Any]) -> Answer:
        obj = copy.deepcopy(body)
        metadata = obj.setdefault("metadata", {})
        name = metadata.get("name") or f"{metadata.get('generateName', 'x-')}{uuid.uuid4().hex[:5]}"
        if where.namespace in self.terminating:
            refused = _status(
                403,
                "Forbidden",
                f'{where.plural} "{name}" is forbidden: unable to create new content in '
                f"namespace {where.namespace} because it is being terminated",
            )
            refused.payload["details"] = {
                "name": name,
                "kind": where.plural,
                "causes": [
                    {
                        "reason": "NamespaceTerminating",
                        "message": f"namespace {where.namespace} is being terminated",
                        "field": "metadata.namespace",
                    }
                ],
            }
            return refused
        collection = self.objects.setdefault(where.collection, {})
        if name in collection:
            return _status(409, "AlreadyExists", f'{where.plural} "{name}" already exists')
        if where.plural in STATUS_SUBRESOURCE:
            obj.pop("status", None)
        metadata.update(
            name=name,
            uid=str(uuid.uuid4()),
            resourceVersion=self._version(),
            creationTimestamp="2026-01-01T00:00:00Z",
        )
        if where.namespace is not None:
            metadata["namespace"] = where.namespace
        collection[name] = obj
        self._emit(where, "ADDED", obj)
        return Answer(201, copy.deepcopy(obj))

    def _checked_write(self, where: _Where, new: dict[str, Any]) -> Answer:
        """Store ``new`` in place of the object at ``where``: resourceVersion and the CRD's
        rules checked, a deleted object with no finalizer left removed."""
        collection = self.objects.get(where.collection, {})
        old = collection.get(where.name or "")
        if old is None:
            return _status(404, "NotFound", f'{where.plural} "{where.name}" not found')
        wanted = (new.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != old["metadata"]["resourceVersion"]:
            return _status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {where.plural} "{where.name}": the object '
                "has been modified; please apply your changes to the latest version",
            )
        if where.plural == "billingrecords":
            if new.get("spec") != old.get("spec"):
                return _status(422, "Invalid", "spec: Invalid value: spec is immutable")
            if (old.get("status") or {}).get("state") == "Final" and new.get("status") != old.get(
                "status"
            ):
                return _status(
                    422,
                    "Invalid",
                    "status: Invalid value: a Final BillingRecord cannot be modified",
                )
        metadata = new.setdefault("metadata", {})
        for kept in ("uid", "creationTimestamp", "deletionTimestamp", "namespace", "name"):
            if kept in old["metadata"]:
                metadata[kept] = old["metadata"][kept]
        metadata["resourceVersion"] = self._version()
        if metadata.get("deletionTimestamp") and not metadata.get("finalizers"):
            del collection[where.name or ""]
            self._emit(where, "DELETED", new)
        else:
            collection[where.name or ""] = new
            self._emit(where, "MODIFIED", new)
        return Answer(200, copy.deepcopy(new))

    def _replace(self, where: _Where, body: dict[str, Any]) -> Answer:
        old = self.objects.get(where.collection, {}).get(where.name or "")
        if old is None:
            return _status(404, "NotFound", f'{where.plural} "{where.name}" not found')
        if where.collection.startswith(CUSTOM_RESOURCES) and not (body.get("metadata") or {}).get(
            "resourceVersion"
        ):  # a custom resource allows no unconditional update
            return _status(
                422,
                "Invalid",
                f'{where.plural} "{where.name}" is invalid: metadata.resourceVersion: '
                "Invalid value: 0: must be specified for an update",
            )
        new = copy.deepcopy(body)
        if where.plural in STATUS_SUBRESOURCE:
            if where.subresource == "status":
                new = {
                    **copy.deepcopy(old),
                    "status": new.get("status"),
                    "metadata": {
                        **old["metadata"],
                        "resourceVersion": (body.get("metadata") or {}).get("resourceVersion"),
                    },
                }
                if new["status"] is None:
                    new.pop("status")
            elif "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        return self._checked_write(where, new)

    def _patch(self, where: _Where, body: Any) -> Answer:
        old = self.objects.get(where.collection, {}).get(where.name or "")
        if old is None:
            return _status(404, "NotFound", f'{where.plural} "{where.name}" not found')
        patch = copy.deepcopy(body)
        wanted = (patch.get("metadata") or {}).pop("resourceVersion", None)
        if where.plural in STATUS_SUBRESOURCE:
            if where.subresource == "status":
                patch = {"status": patch["status"]} if "status" in patch else {}
            else:
                patch.pop("status", None)
        new = _merge(old, patch)
        new["metadata"]["resourceVersion"] = wanted or old["metadata"]["resourceVersion"]
        return self._checked_write(where, new)

    def _delete(self, where: _Where, options: Mapping[str, Any]) -> Answer:
        collection = self.objects.get(where.collection, {})
        old = collection.get(where.name or "")
        if old is None:
            return _status(404, "NotFound", f'{where.plural} "{where.name}" not found')
        uid = (options.get("preconditions") or {}).get("uid")
        if uid is not None and uid != old["metadata"]["uid"]:
            return _status(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {uid}, "
                f"UID in object meta: {old['metadata']['uid']}",
            )
        if old["metadata"].get("finalizers"):
            old["metadata"].setdefault("deletionTimestamp", "2026-01-01T00:00:00Z")
            old["metadata"]["resourceVersion"] = self._version()
            self._emit(where, "MODIFIED", old)
            return Answer(200, copy.deepcopy(old))
        del collection[where.name or ""]
        old["metadata"]["resourceVersion"] = self._version()
        self._emit(where, "DELETED", old)
        return Answer(200, {"kind": "Status", "status": "Success"})


class MemoryKube(Kube):
    """Payper's API client over a ``MemoryApi``: only the round trip is replaced."""

    def __init__(self, api: MemoryApi | None = None) -> None:
        # No connection, so no client configuration: ``send`` is the only way out.
        super().__init__(Credentials("memory://", False, None))  # type: ignore[arg-type]
        self.api = api or MemoryApi()

    async def send(
        self,
        method: str,
        path: str,
        data: bytes | None,
        params: Mapping[str, str] | None,
        content_type: str,
    ) -> Answer:
        body = json.loads(data) if data is not None else None
        return self.api.answer(method, path, body, params or {})

    async def watch(
        self,
        path: str,
        resource_version: str,
        params: Mapping[str, str] | None = None,
        timeout_s: int = 300,
    ) -> AsyncIterator[dict[str, Any]]:
        """The changes after ``resource_version`` as the API server streams them, waiting
        for more until ``timeout_s`` passes without one (the server closes the watch);
        ``WatchExpiredError`` for a version older than the last ``expire_watches``."""
        where = _where(path)
        since = int(resource_version)
        seen = 0
        while True:
            if since < self.api.expired_before:
                raise WatchExpiredError(f"too old resource version: {since}")
            events = self.api.events
            while seen < len(events):
                version, collection, kind, obj = events[seen]
                seen += 1
                if version > since and self.api.watched(collection, where):
                    since = version
                    yield {"type": kind, "object": copy.deepcopy(obj)}
                if since < self.api.expired_before:
                    break
            if seen >= len(self.api.events) and not await self.api.changed(timeout_s):
                return
