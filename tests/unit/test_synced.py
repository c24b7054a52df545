"""The ledger prices no record before the operator's watches have delivered the cluster once.

After a restart, the first flush could run before the namespace's labels (plan grants
select by label) reached the operator: the record, whose spec never changes, would bill a
whole window at the default plan. ``Synced`` lists what the API server holds when
leadership begins and counts the view synced once the registry has seen all of it, or
once a bounded deadline passed (an object deleted in between never arrives).
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from payper.api.common import API_VERSION
from payper.billing.config import BillingConfig
from payper.kube import resource_path
from payper.observed import PodView
from payper.operator.synced import Synced
from payper_dev.testing.memory_ledger import GRACE_S, T0, WINDOW_S, Agent, World

NODE = "gpu-node-0"
PLANS = {
    "windowSeconds": WINDOW_S,
    "graceSeconds": GRACE_S,
    "plans": {
        name: {
            "granularity": "1s",
            "currency": "USD",
            "pricePerGpuSecond": {"default": price},
            "reservedPricePerGpuHour": {"default": "3"},
        }
        for name, price in (("default", "1"), ("gold", "2"))
    },
    "grants": [{"namespaceSelector": {"tier": "gold"}, "plans": ["gold"], "defaultPlan": "gold"}],
}


def deadline_passed() -> float:
    name = "payper_operator_watch_sync_deadline_passed_total"
    return REGISTRY.get_sample_value(name) or 0.0


async def gold_namespace_world() -> tuple[World, Synced, dict[str, object]]:
    world = World(BillingConfig.model_validate(PLANS))
    synced = Synced(world.registry, deadline_ms=60_000, clock=lambda: world.now)
    world.ledger.synced = synced
    await world.ledger.load()
    await world.node(NODE)
    await world.kube.create(
        resource_path("v1", "namespaces"),
        {"metadata": {"name": "team-gold", "labels": {"tier": "gold"}}},
    )
    pod = await world.pod("team-gold", "server", NODE)
    return world, synced, pod


async def test_no_record_is_priced_before_the_namespace_labels_arrive() -> None:
    world, synced, pod = await gold_namespace_world()
    await synced.list_once(world.kube)
    agent = Agent("a", NODE)
    sent = [agent.report(T0 + 100, [(pod, 5_000)])]
    [receipt] = await world.flush_with((NODE, sent))
    assert receipt.acked == {"a": 0} and world.records() == [], "nothing priced yet"
    assert not synced()

    world.registry.observe_namespace("team-gold", {"tier": "gold"})  # the watch delivers it
    assert synced()
    [receipt] = await world.flush_with((NODE, sent))
    assert receipt.acked == {"a": 1}
    [record] = world.records("team-gold")
    assert record["spec"]["plan"] == "gold", "priced with the labels the watch delivered"


async def test_an_object_that_never_arrives_holds_billing_only_until_the_deadline() -> None:
    world, synced, pod = await gold_namespace_world()
    await world.kube.create(
        resource_path(API_VERSION, "inferencedeployments", "team-gold"),
        {"metadata": {"name": "deleted-meanwhile"}, "spec": {}},
    )
    await synced.list_once(world.kube)
    world.registry.observe_namespace("team-gold", {"tier": "gold"})
    assert synced.missing() == (0, 1, 0), "the deployment was never delivered"
    assert not synced()
    before = deadline_passed()
    world.now += 60_000
    assert synced() and deadline_passed() == before + 1
    [receipt] = await world.flush_with((NODE, [Agent("a", NODE).report(T0, [(pod, 7)])]))
    assert receipt.acked == {"a": 1}


@pytest.mark.parametrize("deleted", [False, True])
async def test_listed_pods_count_once_seen_alive_or_deleted(deleted: bool) -> None:
    world, synced, pod = await gold_namespace_world()
    world.registry.all_pods.clear()  # as after a restart: the pod watch has not listed yet
    await synced.list_once(world.kube)
    world.registry.observe_namespace("team-gold", {"tier": "gold"})
    assert synced.missing() == (0, 0, 1)
    world.registry.observe_pod(PodView.from_object(pod), None, deleted=deleted)
    assert synced()


async def test_nothing_counts_as_synced_before_the_listing() -> None:
    _, synced, _ = await gold_namespace_world()
    assert not synced()


async def test_a_deployment_being_deleted_counts_once_its_event_arrived() -> None:
    """kopf resumes no handler for an object being deleted (a namespace going, say): it is
    never tracked, but its watch event arrives, and that is what counts."""
    world, synced, _ = await gold_namespace_world()
    await world.kube.create(
        resource_path(API_VERSION, "inferencedeployments", "team-gold"),
        {"metadata": {"name": "leaving"}, "spec": {}},
    )
    await synced.list_once(world.kube)
    world.registry.observe_namespace("team-gold", {"tier": "gold"})
    assert not synced()
    world.registry.saw_deployment(("team-gold", "leaving"))
    assert synced()


async def test_an_object_deleted_before_its_watch_delivered_it_is_dropped_when_looked_up() -> None:
    world, synced, pod = await gold_namespace_world()
    world.registry.all_pods.clear()  # the pod watch has not listed yet
    await synced.list_once(world.kube)
    world.registry.observe_namespace("team-gold", {"tier": "gold"})
    assert synced.missing() == (0, 0, 1) and not synced()
    await synced.forget_gone(world.kube)
    assert not synced(), "the pod is still there: it must arrive"
    meta = pod["metadata"]
    await world.kube.delete(resource_path("v1", "pods", meta["namespace"], meta["name"]))
    await synced.forget_gone(world.kube)
    assert synced(), "deleted before the watch saw it: it never arrives, and is dropped"


async def test_a_failing_listing_is_tried_again_and_then_counts() -> None:
    world, synced, _ = await gold_namespace_world()
    world.registry.observe_namespace("team-gold", {"tier": "gold"})
    world.api.fail(500, method="GET", path_contains="/namespaces", times=2)
    before = deadline_passed()
    await asyncio.wait_for(synced.run(world.kube, every_s=0.001), 5)
    assert synced() and synced.missing() == (0, 0, 0)
    assert deadline_passed() == before, "caught up, not by the deadline"
