"""Serving end to end: operator + gateway + real model-server processes on pod IPs.

One operator, one gateway and a pod runner for the whole module; every test has its own
namespace. Scaling windows are shortened by the stack's operator configuration.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from payper.api.inference_deployment import POD_LABEL
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import (
    SYSTEM_NAMESPACE,
    Stack,
    deployment_pods,
    inference_deployment,
    pod_ready,
    running,
    spec_replicas,
)


@pytest.fixture(scope="module")
def stack(
    crds_installed: ClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running(crds_installed, tmp_path_factory.mktemp("stack")) as started:
        yield started


def apply(cluster: ClusterHandle, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def get(cluster: ClusterHandle, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def ready_pods(cluster: ClusterHandle, namespace: str, name: str) -> int:
    return sum(pod_ready(p) for p in deployment_pods(cluster, namespace, name).values())


def condition(
    cluster: ClusterHandle,
    namespace: str,
    name: str,
    type_: str,
    status: str | None = None,
    reason: str | None = None,
) -> dict[str, Any] | None:
    """The condition of that type, if it has the given status and reason (when given)."""
    obj = get(cluster, namespace, "infd", name)
    for cond in (obj or {}).get("status", {}).get("conditions", []):
        if (
            cond["type"] == type_
            and status in (None, cond["status"])
            and reason in (None, cond["reason"])
        ):
            return dict(cond)
    return None


async def infer(
    http: aiohttp.ClientSession, stack: Stack, namespace: str, name: str, ms: int = 50, **kw: Any
) -> tuple[int, dict[str, str], Any]:
    async with http.post(
        f"{stack.gateway_url}/{namespace}/{name}/v1/infer", json={"ms": ms}, **kw
    ) as r:
        body = await r.json(content_type=None)
        return r.status, dict(r.headers), body


async def test_first_request_scales_from_zero_and_reports_the_cold_start(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    stack.deploy(namespace, inference_deployment("llm", idle_timeout_s=60))
    eventually(lambda: spec_replicas(cluster, namespace, "llm") == 0, 20, what="Deployment at 0")
    eventually(
        lambda: condition(cluster, namespace, "llm", "ScaledToZero", status="True"),
        20,
        what="ScaledToZero",
    )
    assert ready_pods(cluster, namespace, "llm") == 0

    started = time.monotonic()
    status, headers, body = await infer(http, stack, namespace, "llm", ms=20)
    elapsed = time.monotonic() - started
    assert status == 200, body
    assert body["pod"].startswith("llm-")
    cold_start_ms = int(headers["X-Payper-Cold-Start-Ms"])
    assert cluster.cold_start_ms - 300 <= cold_start_ms <= elapsed * 1000
    assert spec_replicas(cluster, namespace, "llm") == 1
    # A warm request carries no cold-start header.
    status, headers, _ = await infer(http, stack, namespace, "llm")
    assert status == 200
    assert "X-Payper-Cold-Start-Ms" not in headers
    ready = eventually(
        lambda: condition(cluster, namespace, "llm", "Ready", status="True"),
        10,
        what="Ready=True",
    )
    assert ready["reason"] == "Serving"
    obj = get(cluster, namespace, "infd", "llm")
    assert obj is not None
    assert obj["status"]["url"] == f"http://llm.{namespace}.payper.local/"
    assert float(obj["status"]["lastColdStartSeconds"]) > 0

    # The cold start in phases: the operator's marks, then the gateway's part.
    def phases() -> dict[str, Any] | None:
        cold = ((get(cluster, namespace, "infd", "llm") or {}).get("status") or {}).get(
            "lastColdStart"
        )
        return cold if cold and cold["phasesMs"].get("forward") is not None else None

    cold = eventually(phases, 15, what="the last cold start's phases, the gateway's included")
    assert cold["pod"] == body["pod"]
    measured = cold["phasesMs"]
    assert "image" not in measured  # kwok pulls no image: not measured, never guessed
    assert set(measured) == {"create", "schedule", "start", "ready", "forward"}
    assert all(v >= 0 for v in measured.values())
    # Each phase is a difference on one clock; together they are the gateway's total, or
    # held -> Ready as the operator saw it where that was longer.
    assert sum(measured.values()) >= cold_start_ms
    assert measured["forward"] <= cold_start_ms


async def test_burst_scales_out_and_idle_returns_to_zero(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    stack.deploy(
        namespace,
        inference_deployment("burst", max_replicas=3, idle_timeout_s=6, scale_down_delay_s=2),
    )
    results = await asyncio.gather(
        *(infer(http, stack, namespace, "burst", ms=6000) for _ in range(3))
    )
    assert [r[0] for r in results] == [200, 200, 200]
    assert spec_replicas(cluster, namespace, "burst") == 3
    # Held requests went to the first ready pod; now all three are up, and the gateway
    # spreads the next burst over them (least requests in flight).
    await asyncio.to_thread(
        eventually, lambda: stack.gateway_endpoints(namespace).get("burst") == 3, 20
    )
    results = await asyncio.gather(
        *(infer(http, stack, namespace, "burst", ms=1000) for _ in range(3))
    )
    assert len({r[2]["pod"] for r in results}) == 3
    idle_since = time.monotonic()
    eventually(lambda: spec_replicas(cluster, namespace, "burst") == 0, 30, what="scale to zero")
    assert time.monotonic() - idle_since >= 5.0  # not before the idle timeout (6 s, 1 s ticks)
    eventually(lambda: ready_pods(cluster, namespace, "burst") == 0, 20, what="pods gone")


async def test_no_request_fails_while_replicas_change_0_3_1(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    stack.deploy(
        namespace,
        inference_deployment("steady", max_replicas=3, idle_timeout_s=60, scale_down_delay_s=2),
    )
    statuses: list[int] = []
    observed: list[int] = []
    concurrency = {"n": 1}
    stop = asyncio.Event()

    async def worker(index: int) -> None:
        while not stop.is_set():
            if index >= concurrency["n"]:
                await asyncio.sleep(0.05)
                continue
            status, _, _ = await infer(http, stack, namespace, "steady", ms=300)
            statuses.append(status)

    async def watch_replicas() -> None:
        while not stop.is_set():
            replicas = await asyncio.to_thread(spec_replicas, cluster, namespace, "steady")
            if replicas is not None and (not observed or observed[-1] != replicas):
                observed.append(replicas)
            await asyncio.sleep(0.3)

    tasks = [asyncio.create_task(worker(i)) for i in range(3)] + [
        asyncio.create_task(watch_replicas())
    ]
    try:
        await asyncio.sleep(4)
        concurrency["n"] = 3
        await asyncio.to_thread(
            eventually,
            lambda: ready_pods(cluster, namespace, "steady") == 3,
            30,
            0.2,
            "3 ready replicas",
        )
        await asyncio.sleep(2)
        concurrency["n"] = 1
        await asyncio.to_thread(
            eventually,
            lambda: spec_replicas(cluster, namespace, "steady") == 1,
            40,
            0.2,
            "back to 1",
        )
        await asyncio.sleep(3)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert observed[0] == 0 or observed[:2] == [0, 1] or observed[0] == 1
    assert 3 in observed
    assert observed[-1] == 1
    assert len(statuses) > 30
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


async def test_queue_limit_and_cold_start_timeout_answer_503_and_504(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    stack.deploy(
        namespace,
        inference_deployment("stuck", cold_start="1h", cold_start_timeout_s=4, idle_timeout_s=60),
    )
    eventually(
        lambda: (
            get(cluster, namespace, "infd", "stuck")
            and spec_replicas(cluster, namespace, "stuck") == 0
        ),
        20,
    )
    limit = stack.options.max_queue
    results = await asyncio.gather(
        *(infer(http, stack, namespace, "stuck") for _ in range(limit + 5))
    )
    by_status: dict[int, list[tuple[int, dict[str, str], Any]]] = {}
    for result in results:
        by_status.setdefault(result[0], []).append(result)
    assert sorted(by_status) == [503, 504]
    assert len(by_status[503]) == 5
    assert len(by_status[504]) == limit
    assert by_status[503][0][1]["Retry-After"] == "5"
    assert "queue is full" in by_status[503][0][2]["error"]
    assert "cold start timeout" in by_status[504][0][2]["error"]
    assert by_status[504][0][1]["Content-Type"].startswith("application/json")
    degraded = eventually(
        lambda: condition(cluster, namespace, "stuck", "Degraded", reason="ColdStartTimeout"),
        15,
        what="Degraded=ColdStartTimeout",
    )
    assert degraded["status"] == "True"
    assert "coldStartTimeoutSeconds" in degraded["message"]


async def test_a_flood_on_a_busy_replica_queues_to_the_deployments_bound_then_429(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """An eager (or hostile) client floods a warm deployment whose replica takes one
    request at a time (containerConcurrency 1) and which holds at most 2 (its own
    maxQueue, below the platform's cap): one runs, two wait, every other is told 429 with
    Retry-After at once; the held ones are served once the replica is free."""
    manifest = inference_deployment("one-at-a-time", min_replicas=1, max_replicas=1)
    manifest["spec"]["scaling"] |= {"containerConcurrency": 1, "maxQueue": -1}
    refused = stack.cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False
    )
    assert refused.returncode != 0
    assert "spec.scaling.maxQueue" in refused.stderr, refused.stderr
    manifest["spec"]["scaling"]["maxQueue"] = 2
    assert stack.options.max_queue > 2
    stack.deploy(namespace, manifest)
    eventually(
        lambda: stack.gateway_endpoints(namespace).get("one-at-a-time") == 1,
        30,
        what="a ready replica routed",
    )
    release = asyncio.Event()

    async def held_open() -> AsyncIterator[bytes]:
        yield b"first;"
        await asyncio.wait_for(release.wait(), 60)  # bounded: the test ends either way

    url = f"{stack.gateway_url}/{namespace}/one-at-a-time"
    async with http.post(f"{url}/echo", data=held_open()) as running:
        assert running.status == 200
        assert await running.content.readexactly(len(b"first;")) == b"first;"  # at the pod
        held = [
            asyncio.create_task(infer(http, stack, namespace, "one-at-a-time")) for _ in range(2)
        ]

        def queued() -> bool:
            gauge = stack.gateway_gauge("payper_gateway_queued_requests", namespace)
            return gauge.get("one-at-a-time") == 2

        # In a thread: the loop keeps sending the held requests meanwhile.
        await asyncio.to_thread(eventually, queued, 20, 0.1, "two requests held")
        told = await asyncio.gather(
            *(infer(http, stack, namespace, "one-at-a-time") for _ in range(5))
        )
        assert [status for status, _, _ in told] == [429] * 5
        assert all(headers["Retry-After"] == "5" for _, headers, _ in told)
        assert "queue is full (2 requests)" in told[0][2]["error"]
        assert not any(task.done() for task in held), "the held ones wait for the replica"
        release.set()
        assert await running.read() == b""
    assert [(await task)[0] for task in held] == [200, 200]


async def test_server_sent_events_stream_through_unbuffered(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    stack.deploy(namespace, inference_deployment("chat", min_replicas=1))
    eventually(
        lambda: ready_pods(stack.cluster, namespace, "chat") == 1, 20, what="a ready replica"
    )
    # Ready is kwok's timer, not the server's socket: one request first, so the timing
    # below measures streaming, not a server still starting.
    assert (await infer(http, stack, namespace, "chat"))[0] == 200
    url = f"http://chat.{namespace}.payper.local/v1/chat/completions"
    body = {"stream": True, "max_tokens": 10, "token_ms": 300}
    started = time.monotonic()
    async with http.post(
        stack.gateway_url + "/v1/chat/completions",
        json=body,
        headers={"Host": url.split("/")[2]},
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        first = await response.content.readuntil(b"\n\n")
        first_at = time.monotonic() - started
        rest = await response.read()
        total = time.monotonic() - started
    assert first.startswith(b"data: ")
    assert b"tok0" in first
    assert rest.endswith(b"data: [DONE]\n\n")
    assert total >= 3.0  # 10 tokens x 300 ms
    assert first_at < 1.5, f"first chunk after {first_at:.2f}s of {total:.2f}s"


async def test_request_body_streams_and_a_disconnect_cancels_upstream(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    stack.deploy(namespace, inference_deployment("pipe", min_replicas=1))
    eventually(lambda: ready_pods(cluster, namespace, "pipe") == 1, 20, what="a ready replica")
    echoed: asyncio.Queue[bytes] = asyncio.Queue()

    async def body() -> AsyncIterator[bytes]:
        for index in range(3):
            yield f"part-{index};".encode()
            # The next part is sent only once this one came back: both directions stream.
            await asyncio.wait_for(echoed.get(), 10)

    async with http.post(f"{stack.gateway_url}/{namespace}/pipe/echo", data=body()) as response:
        received = b""
        while len(received) < len(b"part-0;part-1;part-2;"):
            chunk = await response.content.readany()
            if not chunk:
                break
            received += chunk
            await echoed.put(chunk)
    assert received == b"part-0;part-1;part-2;"

    pod = cluster.get_json("pods", "-n", namespace, "-l", "payper.dev/inference-deployment=pipe")[
        "items"
    ][0]
    stats_url = f"http://{pod['status']['podIP']}:8000/stats"
    async with http.get(stats_url) as r:
        before = (await r.json())["cancelled"]
    response = await http.post(
        f"{stack.gateway_url}/{namespace}/pipe/v1/chat/completions",
        json={"stream": True, "max_tokens": 100, "token_ms": 100},
    )
    await response.content.readuntil(b"\n\n")
    response.close()  # the client goes away mid-stream

    async def cancelled() -> int:
        async with http.get(stats_url) as r:
            return int((await r.json())["cancelled"])

    for _ in range(50):
        if await cancelled() > before:
            break
        await asyncio.sleep(0.1)
    assert await cancelled() == before + 1


async def test_routing_headers_and_errors(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    stack.deploy(
        namespace,
        inference_deployment("web", min_replicas=1),
        inference_deployment("hollow", min_replicas=1, runner=False),
    )
    eventually(
        lambda: stack.gateway_endpoints(namespace) == {"web": 1, "hollow": 1},
        20,
        what="the gateway sends to web's and hollow's ready pods",
    )
    headers = {
        "Host": f"web.{namespace}.payper.local",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "must not pass",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "X-Forwarded-For": "203.0.113.9",
        "X-Tenant": "kept",
    }
    async with http.get(f"{stack.gateway_url}/some/path?q=1", headers=headers) as r:
        assert r.status == 200
        seen = await r.json()
    assert seen["path"] == "/some/path?q=1"
    upstream = {k.lower(): v for k, v in seen["headers"].items()}
    assert upstream["x-tenant"] == "kept"
    assert "x-hop" not in upstream
    assert "proxy-authorization" not in upstream
    # The client is no trusted proxy: its X-Forwarded-For is replaced, not extended.
    assert upstream["x-forwarded-for"] == "127.0.0.1"
    assert upstream["x-forwarded-proto"] == "http"
    assert upstream["x-forwarded-host"] == f"web.{namespace}.payper.local"
    assert upstream["forwarded"] == f'for=127.0.0.1;host="web.{namespace}.payper.local";proto=http'

    async with http.get(f"{stack.gateway_url}/{namespace}/web/deeper/x") as r:
        assert (await r.json())["path"] == "/deeper/x"
    for url, expected in (
        (f"{stack.gateway_url}/{namespace}/absent/v1", 404),
        (f"{stack.gateway_url}/", 404),
        (f"{stack.gateway_url}/{namespace}/hollow/v1/infer", 502),
    ):
        async with http.get(url) as r:
            assert r.status == expected, url
            assert r.headers["Content-Type"].startswith("application/json")
            assert (await r.json())["status"] == expected


async def test_invalid_or_impossible_specs_end_in_clear_conditions(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    apply(
        cluster,
        namespace,
        inference_deployment("no-such-gpu", min_replicas=1, product="NVIDIA-B200"),
    )
    apply(cluster, namespace, inference_deployment("capped", max_replicas=1, target_concurrency=1))
    bad_template = inference_deployment("bad-pod", min_replicas=1)
    bad_template["spec"]["template"]["spec"]["restartPolicy"] = "Sometimes"
    apply(cluster, namespace, bad_template)

    def reason(name: str, wanted: str) -> dict[str, Any] | None:
        return condition(cluster, namespace, name, "Degraded", status="True", reason=wanted)

    unschedulable = eventually(
        lambda: reason("no-such-gpu", "Unschedulable"), 30, what="Unschedulable"
    )
    assert "nvidia.com/gpu.product=NVIDIA-B200" in unschedulable["message"]
    invalid = eventually(lambda: reason("bad-pod", "InvalidSpec"), 30, what="InvalidSpec")
    assert "restartPolicy" in invalid["message"]
    ready = condition(cluster, namespace, "no-such-gpu", "Ready")
    assert ready is not None
    assert ready["status"] == "False"
    assert ready["reason"] == "Unschedulable"

    load = [asyncio.create_task(infer(http, stack, namespace, "capped", ms=5000)) for _ in range(3)]
    capped = await asyncio.to_thread(
        eventually, lambda: reason("capped", "MaxReplicasReached"), 20, 0.2, "capped"
    )
    assert "maxReplicas is 1" in capped["message"]
    assert spec_replicas(cluster, namespace, "capped") == 1
    assert {r[0] for r in await asyncio.gather(*load)} == {200}
    assert stack.operator is not None
    assert stack.operator.alive(), stack.operator.tail()


async def test_deleting_removes_children_and_the_route(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    stack.deploy(namespace, inference_deployment("gone", min_replicas=1))
    eventually(lambda: ready_pods(cluster, namespace, "gone") == 1, 20, what="ready")
    status, _, _ = await infer(http, stack, namespace, "gone")
    assert status == 200
    cluster.kubectl("delete", "infd", "gone", "-n", namespace)
    eventually(
        lambda: get(cluster, namespace, "deployment", "gone") is None,
        30,
        what="Deployment collected",
    )
    eventually(
        lambda: get(cluster, namespace, "service", "gone") is None, 30, what="Service collected"
    )
    eventually(
        lambda: get(cluster, namespace, "networkpolicy", "gone") is None,
        30,
        what="NetworkPolicy collected",
    )
    status, _, body = await infer(http, stack, namespace, "gone")
    assert status == 404
    assert "not found" in body["error"]


async def test_each_deployment_is_fenced_to_the_gateway(stack: Stack, namespace: str) -> None:
    """Tenant A must not call team B's pods (or Service) directly, around B's API keys,
    on B's bill: the operator fences every deployment's pods with a NetworkPolicy that
    admits only the gateway's pods, on the serving port, before any pod runs. (kwok
    nodes enforce nothing: this checks the policy the API server holds; the real node
    enforces it, which tests/node/test_fence.py shows.)"""
    cluster = stack.cluster
    stack.deploy(namespace, inference_deployment("fenced"))
    policy = eventually(
        lambda: get(cluster, namespace, "networkpolicy", "fenced"), 20, what="the fence"
    )
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {POD_LABEL: "fenced"}}
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": SYSTEM_NAMESPACE}
    }
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    (owner,) = policy["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"]) == ("InferenceDeployment", "fenced")
    # Someone with the built-in edit role deletes the fence: the next reconcile (any
    # change of the deployment) puts it back.
    cluster.kubectl("delete", "networkpolicy", "fenced", "-n", namespace)
    patch = {"spec": {"scaling": {"idleTimeoutSeconds": 31}}}
    cluster.kubectl(
        "patch", "infd", "fenced", "-n", namespace, "--type=merge", "-p", json.dumps(patch)
    )
    eventually(
        lambda: get(cluster, namespace, "networkpolicy", "fenced"), 20, what="the fence again"
    )


async def test_the_service_is_optional_and_a_tenants_own_is_never_deleted(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """``spec.service.enabled: false`` deletes the Service the operator made (the gateway
    needs none) and the deployment still serves; a Service the tenant made under the same
    name is never the operator's to delete."""
    cluster = stack.cluster
    stack.deploy(namespace, inference_deployment("plain"), inference_deployment("own"))
    eventually(
        lambda: all(get(cluster, namespace, "service", n) for n in ("plain", "own")),
        20,
        what="both Services",
    )

    def switch_off(name: str) -> None:
        patch = {"spec": {"service": {"enabled": False}}}
        cluster.kubectl(
            "patch", "infd", name, "-n", namespace, "--type=merge", "-p", json.dumps(patch)
        )

    switch_off("plain")
    eventually(
        lambda: get(cluster, namespace, "service", "plain") is None, 20, what="the Service gone"
    )
    status, _, _ = await infer(http, stack, namespace, "plain")
    assert status == 200
    # The tenant replaces the operator's Service with one of its own, same name (no
    # owner), then turns the operator's off: the tenant's stays.
    cluster.kubectl("delete", "service", "own", "-n", namespace)
    mine = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "own", "labels": {"team": "mine"}},
        "spec": {"selector": {"app": "mine"}, "ports": [{"port": 81, "targetPort": 9000}]},
    }
    switch_off("own")
    cluster.apply_items([mine], "-n", namespace)
    patch = {"spec": {"scaling": {"idleTimeoutSeconds": 31}}}  # one more reconcile
    cluster.kubectl(
        "patch", "infd", "own", "-n", namespace, "--type=merge", "-p", json.dumps(patch)
    )
    eventually(
        lambda: (
            (get(cluster, namespace, "infd", "own") or {})
            .get("status", {})
            .get("observedGeneration")
            == 3
        ),
        20,
        what="the last change reconciled",
    )
    service = get(cluster, namespace, "service", "own")
    assert service is not None and service["metadata"]["labels"] == {"team": "mine"}


async def test_demand_endpoints_refuse_wrong_identities(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    apply(cluster, namespace, inference_deployment("guarded"))
    eventually(lambda: spec_replicas(cluster, namespace, "guarded") == 0, 20, what="at zero")
    poke = {"gateway": "intruder", "namespace": namespace, "name": "guarded"}
    gateway_token = stack.token("payper-gateway")
    agent_token = stack.token("payper-agent")
    wrong_audience = stack.token("payper-gateway", audience="someone-else")
    forged = gateway_token[:-8] + "AAAAAAAA"
    cases = [
        ({}, 401),
        ({"Authorization": "Bearer not-a-token"}, 401),
        ({"Authorization": f"Bearer {forged}"}, 401),
        ({"Authorization": f"Bearer {wrong_audience}"}, 401),
        ({"Authorization": f"Bearer {agent_token}"}, 403),
    ]
    for path in ("/v1/poke", "/v1/demand"):
        payload = (
            poke
            if path == "/v1/poke"
            else {
                "gateway": "intruder",
                "deployments": [{"namespace": namespace, "name": "guarded", "queued": 50}],
            }
        )
        for headers, expected in cases:
            async with http.post(stack.operator_url + path, json=payload, headers=headers) as r:
                assert r.status == expected, (path, headers.keys(), await r.text())
    async with http.post(
        stack.operator_url + "/v1/poke",
        json={"gateway": "g", "namespace": namespace},
        headers={"Authorization": f"Bearer {gateway_token}"},
    ) as r:
        assert r.status == 400
        assert "name" in (await r.json())["error"]
    await asyncio.sleep(2.5)
    assert spec_replicas(cluster, namespace, "guarded") == 0
    assert ready_pods(cluster, namespace, "guarded") == 0


async def test_api_keys_are_required_before_anything_wakes(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    first, second = "key-alice-1-" + "a" * 32, "key-alice-2-" + "b" * 32
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "keys"},
        "type": "payper.dev/api-keys",
        "data": {"alice": base64.b64encode(first.encode()).decode()},
    }
    apply(cluster, namespace, secret)
    stack.deploy(namespace, inference_deployment("private", auth_secret="keys", idle_timeout_s=60))
    eventually(lambda: spec_replicas(cluster, namespace, "private") == 0, 20, what="at zero")
    eventually(
        lambda: condition(cluster, namespace, "private", "ApiKeysAccepted", status="True"),
        20,
        what="the key's digest published",
    )
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {first}"}):
        status, response_headers, body = await infer(
            http, stack, namespace, "private", headers=headers
        )
        assert status == 401, headers
        assert response_headers["WWW-Authenticate"].startswith("Bearer")
        assert "API key" in body["error"]
    await asyncio.sleep(2.5)
    assert spec_replicas(cluster, namespace, "private") == 0

    async def status_with(key: str) -> int:
        return (
            await infer(
                http, stack, namespace, "private", headers={"Authorization": f"Bearer {key}"}
            )
        )[0]

    async def until(key: str, wanted: int, limit_s: float = 10) -> None:
        deadline = time.monotonic() + limit_s
        while await status_with(key) != wanted:
            assert time.monotonic() < deadline, f"no {wanted} within {limit_s}s"
            await asyncio.sleep(0.1)

    await until(first, 200)  # the gateway's watch may trail the status read above
    assert spec_replicas(cluster, namespace, "private") == 1

    secret["data"] = {"alice": base64.b64encode(second.encode()).decode()}
    apply(cluster, namespace, secret)
    await until(first, 401)
    await until(second, 200)


async def test_operator_restart_keeps_warm_deployments_and_children(
    stack: Stack, namespace: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cluster = stack.cluster
    stack.deploy(
        namespace,
        inference_deployment("warm", max_replicas=3, idle_timeout_s=60, scale_down_delay_s=2),
    )
    stop = asyncio.Event()
    statuses: list[int] = []

    async def worker() -> None:
        while not stop.is_set():
            statuses.append((await infer(http, stack, namespace, "warm", ms=400))[0])

    workers = [asyncio.create_task(worker()) for _ in range(2)]
    try:
        await asyncio.to_thread(
            eventually, lambda: ready_pods(cluster, namespace, "warm") == 2, 30, 0.2, "2 ready"
        )
        replica_sets_before = cluster.kubectl(
            "get", "rs", "-n", namespace, "-o", "name"
        ).stdout.split()
        assert stack.operator is not None
        stack.operator.stop(sig=9)
        await asyncio.to_thread(stack.start_operator)
        observed = []
        for _ in range(24):  # 6 s: three times the scale-down delay
            observed.append(await asyncio.to_thread(spec_replicas, cluster, namespace, "warm"))
            await asyncio.sleep(0.25)
        assert min(o or 0 for o in observed) == 2, observed
        for kind in ("deployments", "services", "rs"):
            names = cluster.kubectl("get", kind, "-n", namespace, "-o", "name").stdout.split()
            assert len(names) == 1, (kind, names)
        assert (
            cluster.kubectl("get", "rs", "-n", namespace, "-o", "name").stdout.split()
            == replica_sets_before
        )
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert set(statuses) == {200}
