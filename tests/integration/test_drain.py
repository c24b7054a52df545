"""Scale-down never cuts a stream: end to end, with real model servers on pod IPs.

A long SSE stream runs through the gateway while its deployment scales down. The pod
runner stops terminating pods as a kubelet does (the preStop sleep, SIGTERM, the grace
period; the pod object goes only once the process has exited), so what is tested here is
what the operator, the gateway and the pod template do about it:

- 2 -> 1: the operator marks the streaming pod with its requests in flight as its
  pod-deletion-cost before lowering replicas, so the ReplicaSet controller deletes the
  idle pod and the stream keeps its pod;
- 1 -> 0: the autoscaler does not scale to zero while a stream runs, however short the
  idle timeout; it does once the stream ended;
- forced (maxReplicas lowered below the streams, then the InferenceDeployment deleted):
  the busy pods that must go get no new requests and drain within their grace period,
  and every stream still ends with its last token.

Each stream is one SSE request to the stand-in model server: ``TOKENS`` tokens, one
every ``TOKEN_MS``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from payper.observed import DELETION_COST_ANNOTATION
from payper_dev.loopback import get_text
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import (
    Stack,
    deployment_pods,
    inference_deployment,
    pod_ready,
    running,
    scraped_sum,
    spec_replicas,
)

TOKENS = 100
TOKEN_MS = 200
"""A 20 s stream: far longer than a scale-down and the pod's preStop sleep (5 s)."""


@pytest.fixture(scope="module")
def stack(
    crds_installed: ClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running(crds_installed, tmp_path_factory.mktemp("stack")) as started:
        yield started


def terminating(pod: dict[str, Any]) -> bool:
    return pod["metadata"].get("deletionTimestamp") is not None


def in_flight(pod: dict[str, Any]) -> int:
    """Requests the pod's own model server has in flight (its /stats)."""
    ip = pod["status"].get("podIP")
    stats = get_text(f"http://{ip}:8000/stats") if ip else None
    return int(json.loads(stats)["in_flight"]) if stats else 0


def busy_pods(cluster: ClusterHandle, namespace: str, name: str) -> set[str]:
    return {n for n, p in deployment_pods(cluster, namespace, name).items() if in_flight(p) > 0}


def operator_sees_in_flight(stack: Stack, namespace: str, name: str, count: int) -> bool:
    """The autoscaler has the gateway's snapshot with ``count`` requests in flight (and
    with them the per-pod counts a scale-down marks pods by)."""
    labels = {"namespace": namespace, "inference_deployment": name}
    return scraped_sum(stack.metrics_url, "payper_autoscaler_in_flight_requests", labels) == count


def patch_scaling(cluster: ClusterHandle, namespace: str, name: str, **scaling: int) -> None:
    cluster.kubectl(
        "patch",
        "infd",
        name,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"scaling": scaling}}),
    )


async def stream(
    http: aiohttp.ClientSession,
    stack: Stack,
    namespace: str,
    name: str,
    first_token: asyncio.Event | None = None,
) -> bytes:
    """One whole SSE stream through the gateway; ``first_token`` is set once it flows."""
    body = {"stream": True, "max_tokens": TOKENS, "token_ms": TOKEN_MS}
    url = f"{stack.gateway_url}/{namespace}/{name}/v1/chat/completions"
    async with http.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        first = await response.content.readuntil(b"\n\n")
        if first_token is not None:
            first_token.set()
        return first + await response.read()


def complete(body: bytes) -> bool:
    """Every token, in order, then the end of the stream: nothing was cut."""
    tokens = [
        json.loads(line[6:])["choices"][0]["delta"]["content"]
        for line in body.decode().split("\n\n")
        if line.startswith("data: {")
    ]
    return tokens == [f"tok{i}" for i in range(TOKENS)] and body.endswith(b"data: [DONE]\n\n")


async def until(probe: Any, timeout_s: float, what: str) -> Any:
    """``eventually`` off the event loop: the streams read on meanwhile."""
    return await asyncio.to_thread(eventually, probe, timeout_s, 0.1, what)


async def test_scale_down_from_2_to_1_deletes_the_idle_pod_and_the_stream_completes(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    stack.deploy(
        namespace,
        inference_deployment(
            "pair", min_replicas=2, max_replicas=2, scale_down_delay_s=0, idle_timeout_s=60
        ),
    )
    await until(
        lambda: sum(map(pod_ready, deployment_pods(cluster, namespace, "pair").values())) == 2,
        30,
        "2 ready",
    )
    await until(lambda: stack.gateway_endpoints(namespace).get("pair") == 2, 20, "2 routed")
    running_stream = asyncio.create_task(stream(http, stack, namespace, "pair"))
    (busy,) = await until(lambda: busy_pods(cluster, namespace, "pair"), 20, "a streaming pod")
    (idle,) = set(deployment_pods(cluster, namespace, "pair")) - {busy}
    await until(lambda: operator_sees_in_flight(stack, namespace, "pair", 1), 20, "demand seen")

    patch_scaling(cluster, namespace, "pair", minReplicas=1)
    await until(lambda: spec_replicas(cluster, namespace, "pair") == 1, 20, "scaled to 1")
    # The ReplicaSet controller deleted the idle pod: the busy one carries its stream as
    # its deletion cost.
    await until(
        lambda: (
            idle not in deployment_pods(cluster, namespace, "pair")
            or terminating(deployment_pods(cluster, namespace, "pair")[idle])
        ),
        20,
        "the idle pod deleted",
    )
    kept = deployment_pods(cluster, namespace, "pair")[busy]
    assert not terminating(kept), "the streaming pod was deleted"
    assert kept["metadata"]["annotations"][DELETION_COST_ANNOTATION] == "1"
    assert not running_stream.done(), "the stream outlasts the scale-down"

    assert complete(await asyncio.wait_for(running_stream, 60))
    assert not terminating(deployment_pods(cluster, namespace, "pair")[busy])
    await until(
        lambda: idle not in deployment_pods(cluster, namespace, "pair"), 30, "the idle pod gone"
    )


async def test_scale_to_zero_waits_for_the_stream_to_end(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """An idle timeout of 1 s, far shorter than the stream: the deployment stays at one
    replica for as long as the stream runs, and goes to zero after it."""
    cluster = stack.cluster
    stack.deploy(namespace, inference_deployment("solo", max_replicas=1, idle_timeout_s=1))
    await until(lambda: spec_replicas(cluster, namespace, "solo") == 0, 20, "at zero")
    flowing = asyncio.Event()
    running_stream = asyncio.create_task(stream(http, stack, namespace, "solo", flowing))
    await asyncio.wait_for(flowing.wait(), 60)  # woken from zero: a cold start first
    seen: set[int | None] = set()
    while not running_stream.done():
        seen.add(await asyncio.to_thread(spec_replicas, cluster, namespace, "solo"))
        await asyncio.wait([running_stream], timeout=0.2)
    assert complete(running_stream.result())
    assert seen == {1}, f"replicas while the stream ran: {seen}"
    await until(lambda: spec_replicas(cluster, namespace, "solo") == 0, 30, "zero after it")
    await until(lambda: not deployment_pods(cluster, namespace, "solo"), 30, "the pod gone")


async def test_a_forced_scale_down_drains_the_busy_pods_it_deletes(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """Two streams on two pods; maxReplicas lowered to 1 takes one busy pod away, then
    the InferenceDeployment deleted takes the other (1 -> 0): each pod stays, terminating
    and serving its stream, until that stream ended; no stream is cut."""
    cluster = stack.cluster
    stack.deploy(
        namespace,
        inference_deployment(
            "forced", min_replicas=2, max_replicas=2, scale_down_delay_s=0, idle_timeout_s=60
        ),
    )
    await until(
        lambda: sum(map(pod_ready, deployment_pods(cluster, namespace, "forced").values())) == 2,
        30,
        "2 ready",
    )
    await until(lambda: stack.gateway_endpoints(namespace).get("forced") == 2, 20, "2 routed")
    first = asyncio.create_task(stream(http, stack, namespace, "forced"))
    await until(lambda: len(busy_pods(cluster, namespace, "forced")) == 1, 20, "one streaming")
    second = asyncio.create_task(stream(http, stack, namespace, "forced"))
    await until(lambda: len(busy_pods(cluster, namespace, "forced")) == 2, 20, "both streaming")

    patch_scaling(cluster, namespace, "forced", minReplicas=1, maxReplicas=1)
    (leaving,) = await until(
        lambda: [
            n for n, p in deployment_pods(cluster, namespace, "forced").items() if terminating(p)
        ],
        20,
        "one busy pod deleted",
    )
    (staying,) = set(deployment_pods(cluster, namespace, "forced")) - {leaving}
    # The gateway sends the pod being deleted nothing new.
    await until(lambda: stack.gateway_endpoints(namespace).get("forced") == 1, 20, "1 routed")
    url = f"{stack.gateway_url}/{namespace}/forced/v1/infer"
    async with http.post(url, json={"ms": 10}) as response:
        assert (await response.json())["pod"] == staying

    cluster.kubectl("delete", "infd", "forced", "-n", namespace, "--wait=false")
    await until(
        lambda: terminating(deployment_pods(cluster, namespace, "forced")[staying]),
        30,
        "the last deleted",
    )
    assert not first.done() and not second.done(), "both pods went while streaming"

    for body in await asyncio.wait_for(asyncio.gather(first, second), 60):
        assert complete(body)
    await until(lambda: not deployment_pods(cluster, namespace, "forced"), 30, "both pods gone")
