"""The in-memory API (``payper_dev.testing.memory_api``) answers as kube-apiserver does.

The ledger's fault tests (test_ledger_faults.py) prove "no money lost" only as far as
the fake behind them refuses, conflicts and loses what a real API server would: a fake
that accepts a stale resourceVersion, a changed spec or a frozen status would let a
ledger bug through. So each rule the money path relies on is pinned here, through
Payper's own client (``MemoryKube`` replaces only its round trip).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from payper.api.billing_record import FINAL, BillingRecordStatus
from payper.billing.deadletter import refused_for_good
from payper.kube import (
    ApiError,
    ConflictError,
    ForbiddenError,
    Informer,
    InvalidError,
    NamespaceTerminatingError,
    NotFoundError,
    ServerError,
    WatchExpiredError,
    api_error,
    resource_path,
)
from payper_dev.testing.billing import record_spec
from payper_dev.testing.memory_api import LOST, TIMEOUT, MemoryApi, MemoryKube

API = "payper.dev/v1alpha1"
NS = "team-a"


def rec_path(name: str | None = None, subresource: str | None = None) -> str:
    return resource_path(API, "billingrecords", NS, name, subresource)


def cm_path(name: str | None = None, namespace: str = NS) -> str:
    return resource_path("v1", "configmaps", namespace, name)


def record(name: str, **status: Any) -> dict[str, Any]:
    spec = record_spec("acme", "llama", "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z")
    body = {"apiVersion": API, "kind": "BillingRecord", "metadata": {"name": name}}
    return {**body, "spec": spec, "status": status}


def config_map(name: str, labels: dict[str, str] | None = None, **data: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}, "data": data}


async def refused(call: Awaitable[Any], status: int, reason: str | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await call
    assert caught.value.status == status, caught.value
    if reason is not None:
        assert caught.value.reason == reason
    return caught.value


@pytest.fixture
def kube() -> MemoryKube:
    return MemoryKube()


async def test_create_gives_uid_and_version_and_a_second_create_already_exists(
    kube: MemoryKube,
) -> None:
    created = await kube.create(cm_path(), config_map("c", a="1"))
    assert created["metadata"]["uid"] and created["metadata"]["resourceVersion"]
    assert created["metadata"]["namespace"] == NS
    await refused(kube.create(cm_path(), config_map("c", a="2")), 409, "AlreadyExists")
    assert (await kube.get(cm_path("c")))["data"] == {"a": "1"}


async def test_a_missing_object_is_404_and_get_or_none_is_none(kube: MemoryKube) -> None:
    await refused(kube.get(cm_path("nope")), 404, "NotFound")
    assert await kube.get_or_none(cm_path("nope")) is None


async def test_replace_with_a_stale_version_conflicts_and_with_the_current_one_succeeds(
    kube: MemoryKube,
) -> None:
    created = await kube.create(cm_path(), config_map("c", a="1"))
    first = await kube.replace(cm_path("c"), {**created, "data": {"a": "2"}})
    assert first["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
    assert first["metadata"]["uid"] == created["metadata"]["uid"]
    await refused(kube.replace(cm_path("c"), {**created, "data": {"a": "3"}}), 409, "Conflict")
    assert (await kube.get(cm_path("c")))["data"] == {"a": "2"}


async def test_a_custom_resource_is_not_updated_without_a_version(kube: MemoryKube) -> None:
    await kube.create(rec_path(), record("r1"))
    await kube.create(cm_path(), config_map("c"))
    await refused(kube.replace(rec_path("r1"), record("r1")), 422, "Invalid")
    unversioned = BillingRecordStatus(bursts=1)
    await refused(kube.replace_status(rec_path("r1", "status"), record("r1"), unversioned), 422)
    assert await kube.replace(cm_path("c"), config_map("c", a="1"))  # a ConfigMap may


async def test_status_is_a_subresource(kube: MemoryKube) -> None:
    created = await kube.create(rec_path(), record("r1", bursts=7))
    assert "status" not in created, "a create drops the status"
    relabelled = {**created, "metadata": {**created["metadata"], "labels": {"x": "y"}}}
    written = await kube.replace_status(
        rec_path("r1", "status"), relabelled, BillingRecordStatus(bursts=3)
    )
    assert written["status"]["bursts"] == 3
    assert "labels" not in written["metadata"], "a status write changes only the status"
    replaced = await kube.replace(rec_path("r1"), {**written, "status": {"bursts": 99}})
    assert replaced["status"] == written["status"], "an object write keeps the stored status"
    assert (await kube.get(rec_path("r1")))["status"]["bursts"] == 3


async def test_a_billing_records_spec_is_immutable(kube: MemoryKube) -> None:
    created = await kube.create(rec_path(), record("r1"))
    changed = {**created, "spec": {**created["spec"], "pricePerGpuSecond": "0"}}
    await refused(kube.replace(rec_path("r1"), changed), 422, "Invalid")
    await refused(kube.patch(rec_path("r1"), {"spec": {"plan": "free"}}), 422, "Invalid")
    assert (await kube.get(rec_path("r1")))["spec"] == created["spec"]


async def test_a_final_records_status_is_frozen_but_its_labels_are_not(kube: MemoryKube) -> None:
    created = await kube.create(rec_path(), record("r1"))
    final = BillingRecordStatus(state=FINAL, bursts=2)
    frozen = await kube.replace_status(rec_path("r1", "status"), created, final)
    later = BillingRecordStatus(state=FINAL, bursts=3)
    await refused(kube.replace_status(rec_path("r1", "status"), frozen, later), 422, "Invalid")
    await refused(kube.write_status(rec_path("r1", "status"), later), 422, "Invalid")
    patched = await kube.patch(rec_path("r1"), {"metadata": {"labels": {"exported": "yes"}}})
    assert patched["metadata"]["labels"] == {"exported": "yes"}
    assert patched["status"] == frozen["status"]


async def test_a_status_patch_without_status_leaves_it(kube: MemoryKube) -> None:
    created = await kube.create(rec_path(), record("r1"))
    await kube.replace_status(rec_path("r1", "status"), created, BillingRecordStatus(bursts=4))
    patched = await kube.patch(rec_path("r1", "status"), {"metadata": {"labels": {"a": "b"}}})
    assert patched["status"]["bursts"] == 4
    assert "labels" not in patched["metadata"]


async def test_a_merge_patch_merges_maps_and_removes_nulls(kube: MemoryKube) -> None:
    created = await kube.create(
        cm_path(), config_map("c", {"keep": "1", "drop": "2"}, a="1", b="2")
    )
    patch = {"metadata": {"labels": {"drop": None, "new": "3"}}, "data": {"b": None, "c": "3"}}
    patched = await kube.patch(cm_path("c"), patch)
    assert patched["metadata"]["labels"] == {"keep": "1", "new": "3"}
    assert patched["data"] == {"a": "1", "c": "3"}
    assert patched["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "data": {}}
    await refused(kube.patch(cm_path("c"), stale), 409, "Conflict")


@pytest.mark.parametrize(
    ("selector", "names"),
    [
        ("tier=gold", ["c0", "c2", "c4"]),
        ("tier!=gold", ["c1", "c3"]),
        ("odd", ["c1", "c3"]),
        ("!odd", ["c0", "c2", "c4"]),
        ("tier=gold,!odd,tier!=silver", ["c0", "c2", "c4"]),
        ("tier=bronze", []),
    ],
)
async def test_a_label_selector_picks(kube: MemoryKube, selector: str, names: list[str]) -> None:
    await five_config_maps(kube)
    listed = await kube.list(cm_path(), {"labelSelector": selector})
    assert [o["metadata"]["name"] for o in listed["items"]] == names


async def five_config_maps(kube: MemoryKube) -> None:
    for i in range(5):
        labels = {"tier": "gold"} if i % 2 == 0 else {"tier": "silver", "odd": ""}
        await kube.create(cm_path(), config_map(f"c{i}", labels))


async def test_a_list_follows_its_continue_tokens(kube: MemoryKube) -> None:
    await five_config_maps(kube)
    page = await kube.get(cm_path(), {"limit": "2"})
    assert len(page["items"]) == 2 and page["metadata"]["continue"]
    listed = await kube.list(cm_path(), {"limit": "2"})
    assert [o["metadata"]["name"] for o in listed["items"]] == [f"c{i}" for i in range(5)]
    assert [c.params.get("continue") for c in kube.api.calls[-3:]] == [None, "2", "4"]


async def test_a_delete_with_a_wrong_uid_precondition_conflicts(kube: MemoryKube) -> None:
    await kube.create(cm_path(), config_map("c"))
    wrong = {"preconditions": {"uid": "not-its-uid"}}
    await refused(kube.delete(cm_path("c"), body=wrong), 409, "Conflict")
    assert await kube.get_or_none(cm_path("c")) is not None


async def test_finalizers_hold_a_deleted_object_until_they_go(kube: MemoryKube) -> None:
    body = config_map("c")
    body["metadata"]["finalizers"] = ["payper.dev/export"]
    created = await kube.create(cm_path(), body)
    await kube.delete(cm_path("c"), body={"preconditions": {"uid": created["metadata"]["uid"]}})
    held = await kube.get(cm_path("c"))
    assert held["metadata"]["deletionTimestamp"]
    await kube.patch(cm_path("c"), {"metadata": {"finalizers": None}})
    assert await kube.get_or_none(cm_path("c")) is None
    assert await kube.delete(cm_path("c")) is None, "a 404 on delete is 'gone already'"


async def test_a_create_in_a_terminating_namespace_is_forbidden() -> None:
    kube = MemoryKube(MemoryApi(terminating={"leaving"}))
    error = await refused(kube.create(cm_path(namespace="leaving"), config_map("c")), 403)
    assert "being terminated" in error.message
    assert kube.api.items(cm_path(namespace="leaving")) == []
    # Told apart by the Status's cause, as client-go's HasStatusCause does, not its words.
    assert isinstance(error, NamespaceTerminatingError)
    assert refused_for_good(error) == "namespace-terminating"


@pytest.mark.parametrize(
    ("status", "body", "kind", "for_good"),
    [
        (
            403,
            {"reason": "Forbidden", "message": "being terminated, says a webhook"},
            ForbiddenError,
            None,
        ),
        (404, {"reason": "NotFound"}, NotFoundError, "namespace-gone"),
        (409, {"reason": "Conflict"}, ConflictError, None),
        (422, {"reason": "Invalid"}, InvalidError, "invalid"),
        (503, {"reason": "ServiceUnavailable"}, ServerError, None),
    ],
)
def test_an_error_status_is_raised_as_what_it_means(
    status: int, body: dict[str, Any], kind: type[ApiError], for_good: str | None
) -> None:
    error = api_error(status, body, "PUT", "/x")
    assert type(error) is kind and error.status == status
    assert refused_for_good(error) == for_good


async def test_an_injected_status_answers_the_next_matching_call_only(kube: MemoryKube) -> None:
    created = await kube.create(cm_path(), config_map("c", a="1"))
    kube.api.fail(500, method="PUT")
    await kube.get(cm_path("c"))  # not a PUT: not failed
    await refused(kube.replace(cm_path("c"), {**created, "data": {"a": "2"}}), 500)
    assert (await kube.get(cm_path("c")))["data"] == {"a": "1"}, "nothing was written"
    assert (await kube.replace(cm_path("c"), {**created, "data": {"a": "2"}}))["data"]["a"] == "2"
    assert [(c.method, c.path) for c in kube.api.calls] == [
        ("POST", cm_path()),
        ("GET", cm_path("c")),
        ("PUT", cm_path("c")),
        ("GET", cm_path("c")),
        ("PUT", cm_path("c")),
    ]


async def test_a_timeout_changes_nothing(kube: MemoryKube) -> None:
    kube.api.fail(TIMEOUT)
    with pytest.raises(TimeoutError):
        await kube.create(cm_path(), config_map("c"))
    assert await kube.get_or_none(cm_path("c")) is None


async def test_a_lost_answer_was_carried_out(kube: MemoryKube) -> None:
    kube.api.fail(LOST, method="POST")
    with pytest.raises(TimeoutError):
        await kube.create(cm_path(), config_map("c", a="1"))
    assert (await kube.get(cm_path("c")))["data"] == {"a": "1"}
    await refused(kube.create(cm_path(), config_map("c")), 409, "AlreadyExists")


async def test_a_throttled_call_is_sent_again_after_retry_after(kube: MemoryKube) -> None:
    await kube.create(cm_path(), config_map("c", a="1"))
    kube.api.fail(429, retry_after="0.1", times=2)
    assert (await kube.get(cm_path("c")))["data"] == {"a": "1"}
    assert [(c.method, c.path) for c in kube.api.calls[1:]] == [("GET", cm_path("c"))] * 3


async def test_a_watch_streams_changes_and_an_expired_one_makes_the_informer_list_again(
    kube: MemoryKube,
) -> None:
    """The operator's Informer over the in-memory watch: list, then changes as they come;
    after a 410 Gone (etcd compacted what it missed) it lists again and delivers the
    deletion it never saw as an event."""
    await kube.create(cm_path(), config_map("a"))
    seen: list[tuple[str, str]] = []
    delivered = asyncio.Event()

    async def handler(kind: str, obj: dict[str, Any]) -> None:
        seen.append((kind, obj["metadata"]["name"]))
        delivered.set()

    async def until(condition: Callable[[], bool]) -> None:
        """Until the informer delivered what ``condition`` wants, at most 2 s."""
        async with asyncio.timeout(2):
            while not condition():
                delivered.clear()
                await delivered.wait()

    informer = Informer(kube, cm_path(), handler, retry_s=0.01)
    running = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 2)
        assert seen == [("ADDED", "a")]
        b = await kube.create(cm_path(), config_map("b"))
        await kube.replace(cm_path("b"), {**b, "data": {"x": "1"}})
        await until(lambda: len(seen) == 3)
        assert seen[1:] == [("ADDED", "b"), ("MODIFIED", "b")]
        del kube.api.objects[cm_path()]["b"]  # gone, and its event compacted away
        kube.api.expire_watches()
        await until(lambda: len(seen) == 4)
        assert seen[3] == ("DELETED", "b")
        assert sorted(informer.cache) == [f"{NS}/a"]
    finally:
        running.cancel()
    with pytest.raises(WatchExpiredError):
        async for _ in kube.watch(cm_path(), "1"):
            pass
