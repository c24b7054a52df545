"""Billing end to end: gateway traffic -> simulated GPU time -> agents -> ledger -> records.

The ground truth is what the agents measured and reported (exact integers read from
their checkpoints); the BillingRecords must equal it exactly, in microseconds, rounded
milliseconds, bursts and decimal amounts, after every fault below. The agents' truth is
itself tied to the model servers' real busy time (within the meter's 1 % bound).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from payper.api.billing_record import BillingRecordSpec
from payper.api.inference_deployment import POD_LABEL
from payper.billing import flush
from payper.billing.pricing import product_key
from payper.billing.records import record_name
from payper.clock import iso
from payper.observed import UNMANAGED
from payper_dev.cluster import podrunner
from payper_dev.loopback import http_ok
from payper_dev.testing.billing import (
    H100_PRICE,
    assert_records_equal_truth,
    model,
    put_record,
    record_spec,
    record_totals,
    records,
    traffic,
)
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import (
    MODEL_PROFILE,
    SYSTEM_NAMESPACE,
    Stack,
    StackOptions,
    inference_deployment,
    running,
    scraped_sum,
)
from payper_dev.testing.usage import agent_token, post_until_acked, post_usage, report

H100 = "NVIDIA-H100-80GB-HBM3"
FLUSH = {"billing": {"flushIntervalSeconds": 1}}


@pytest.fixture(scope="module")
def stack(
    crds_installed: ClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    options = StackOptions(agents=True, operator_extra=FLUSH)
    with running(crds_installed, tmp_path_factory.mktemp("billing"), options) as started:
        yield started


async def test_traffic_becomes_records_equal_to_the_agents_truth(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    rng = random.Random(1)
    stack.deploy(namespace, model("alpha"), model("beta"))
    results = await asyncio.gather(
        traffic(http, stack, namespace, "alpha", rng, 14),
        traffic(http, stack, namespace, "beta", random.Random(2), 14),
    )
    assert {s for r in results for s in r} == {200}
    await stack.settle()
    assert_records_equal_truth(stack, namespace, ["alpha", "beta"])
    # The agents' truth is the model servers' real busy time, to the meter's precision.
    busy_us = 0
    for busy_file in stack.sim_dir.glob("*.busy"):
        identity = json.loads(busy_file.with_suffix(".json").read_text())
        if identity["pod"]["namespace"] == namespace:
            for line in busy_file.read_text().split("\n"):
                parts = line.split()
                if len(parts) == 2:
                    busy_us += (int(parts[1]) - int(parts[0])) * 1000
    measured = sum(v["activeUs"] for k, v in stack.agent_truth().items() if k[0] == namespace)
    assert abs(measured - busy_us) <= 0.01 * busy_us, (measured, busy_us)
    # One record per window: the traffic may straddle a window's end.
    alpha = [
        r for r in records(stack.cluster, namespace) if r["spec"]["inferenceDeployment"] == "alpha"
    ]
    assert {r["spec"]["gpuProduct"] for r in alpha} == {H100}
    for record in alpha:
        status = record["status"]
        assert status["state"] == "Open"
        assert status["idleMs"] == status["provisionedMs"] - status["activeMs"]
        assert record["spec"]["pricePerGpuSecond"] == str(H100_PRICE)
    provisioned, active = (
        sum(r["status"][f] for r in alpha) for f in ("provisionedMs", "activeMs")
    )
    assert provisioned > active > 0
    assert sum(r["status"]["coldStarts"] for r in alpha) == 1
    assert sum(r["status"]["requests"] for r in alpha) == len(results[0])


async def test_counts_before_a_pod_lands_go_to_the_product_it_lands_on(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """The first request is counted before its pod is on a node (here: held unschedulable
    until the spec asks for fewer GPUs); the count waits for the node's product instead of
    opening a record for an unknown one."""
    body = inference_deployment("landing", gpus=9, max_replicas=1, idle_timeout_s=120)
    stack.deploy(namespace, body)
    request = asyncio.create_task(
        http.post(f"{stack.gateway_url}/{namespace}/landing/v1/infer", json={"ms": 50})
    )

    def pending_pod() -> bool:
        pods = stack.cluster.get_json("pods", "-n", namespace, "-l", f"{POD_LABEL}=landing")
        return any(p["status"].get("phase") == "Pending" for p in pods["items"])

    await asyncio.to_thread(eventually, pending_pod, 20, 0.2, "an unschedulable pod")
    # The held request's count reaches the ledger (a demand snapshot, then a flush) while
    # the pod is still pending: two flushes from now, the second after a snapshot.
    flushes = stack.flushes()
    await asyncio.to_thread(eventually, lambda: stack.flushes() >= flushes + 2, 20, 0.2, "flushes")
    gpu = json.dumps({"spec": {"gpu": {"count": 1}}})
    stack.cluster.kubectl("patch", "infd", "landing", "-n", namespace, "--type=merge", "-p", gpu)
    async with await request as response:
        assert response.status == 200
    await stack.settle()
    landing = [
        r
        for r in records(stack.cluster, namespace)
        if r["spec"]["inferenceDeployment"] == "landing"
    ]
    assert {r["spec"]["gpuProduct"] for r in landing} == {H100}
    assert sum(r["status"]["requests"] for r in landing) == 1
    assert sum(r["status"]["coldStarts"] for r in landing) == 1


async def test_operator_and_agents_killed_mid_flight_lose_and_repeat_nothing(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    rng = random.Random(3)
    stack.deploy(namespace, model("gamma"), model("delta"))

    async def chaos() -> None:
        for round_ in range(4):
            await asyncio.sleep(rng.uniform(2.0, 5.0))
            if round_ % 2 == 0:
                assert stack.operator is not None
                stack.operator.stop(sig=signal.SIGKILL)  # during ingestion or a flush
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                await asyncio.to_thread(stack.start_operator)
            else:
                node = rng.choice(list(stack.agents))
                stack.agents[node].stop(sig=signal.SIGKILL)
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                await asyncio.to_thread(stack.start_agent, node)

    results = await asyncio.gather(
        traffic(http, stack, namespace, "gamma", rng, 22),
        traffic(http, stack, namespace, "delta", random.Random(4), 22),
        chaos(),
    )
    assert {s for r in results[:2] for s in r} == {200}
    await stack.settle()
    assert_records_equal_truth(stack, namespace, ["gamma", "delta"])


async def test_a_progress_save_whose_answer_was_lost_does_not_stall_acknowledgements(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """The progress ConfigMap changes under the operator (as when a save commits but its
    answer is lost, so the operator still holds the old resourceVersion): the next save
    conflicts, re-reads, merges by maximum and goes on; nothing stalls or is lost."""
    stack.deploy(namespace, model("acks"))
    rng = random.Random(11)
    first = await traffic(http, stack, namespace, "acks", rng, 6)
    progress = ["configmap", "payper-usage-ledger", "-n", SYSTEM_NAMESPACE]
    await asyncio.to_thread(
        eventually,
        lambda: stack.cluster.kubectl("get", *progress, check=False).returncode == 0,
        30,
        0.2,
        "the progress ConfigMap",
    )
    stack.cluster.kubectl("annotate", *progress, "test.payper.dev/moved=yes", "--overwrite")
    second = await traffic(http, stack, namespace, "acks", rng, 8)
    await stack.settle()

    # What was acknowledged is durable: the stored progress reached every agent's last
    # report (the agents have deleted those reports; a stale copy would strand them).
    def durable() -> bool:
        stored = json.loads(stack.cluster.get_json(*progress)["data"]["appliedThrough"])
        states = {
            node: json.loads((stack.agent_state_dir(node) / "state.json").read_text())
            for node in stack.agents
        }  # progress is keyed by node and agent id
        return all(
            stored.get(f"{node}/{s['agentId']}", 0) == s["nextSequence"] - 1
            for node, s in states.items()
        )

    await asyncio.to_thread(eventually, durable, 20, 0.5, "the stored progress to catch up")
    # And a restarted operator, which starts from the stored progress, goes on.
    assert stack.operator is not None
    stack.operator.stop(sig=signal.SIGKILL)
    await asyncio.to_thread(stack.start_operator)
    third = await traffic(http, stack, namespace, "acks", rng, 6)
    assert set(first + second + third) == {200}
    await stack.settle()
    assert_records_equal_truth(stack, namespace, ["acks"])


def cluster_dead_letters(stack: Stack) -> dict[str, dict[str, Any]]:
    letters = stack.cluster.get_json("configmap", "payper-dead-letters", "-n", SYSTEM_NAMESPACE)
    return {key: json.loads(value) for key, value in (letters.get("data") or {}).items()}


def invented_pod(namespace: str, deployment: str, node: str = "gpu-node-0") -> dict[str, Any]:
    """A pod no one created: for reports refused before the ledger reads them (wrong
    caller, malformed), where what the operator saw does not matter."""
    return {
        "metadata": {
            "name": f"{deployment}-0",
            "namespace": namespace,
            "uid": f"uid-{deployment}",
            "labels": {POD_LABEL: deployment},
        },
        "spec": {"nodeName": node},
    }


async def seen_pod(
    stack: Stack, namespace: str, deployment: str, node: str = "gpu-node-0"
) -> dict[str, Any]:
    """The pod of a new one-replica InferenceDeployment on ``node``, once the operator
    counts it ready: usage applies only for a pod the operator has seen on the reporting
    agent's node (one it has not seen waits, then is refused)."""
    body = inference_deployment(deployment, min_replicas=1, idle_timeout_s=600)
    body["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    stack.deploy(namespace, body)

    def ready() -> dict[str, Any] | None:
        status = stack.cluster.get_json("infd", deployment, "-n", namespace).get("status", {})
        if status.get("readyReplicas") != 1:
            return None
        pods = stack.cluster.get_json("pods", "-n", namespace, "-l", f"{POD_LABEL}={deployment}")
        return next((p for p in pods["items"] if p["spec"].get("nodeName") == node), None)

    return await asyncio.to_thread(eventually, ready, 60, 0.2, f"{deployment}'s pod on {node}")


def bare_pod(
    stack: Stack, namespace: str, name: str, node: str, gpus: bool = True
) -> dict[str, Any]:
    """A tenant's own pod bound to ``node`` (billed to its namespace, not a deployment);
    without ``gpus`` it holds none and runs no stand-in, so it has no record until usage
    is reported for it."""
    body = gpu_pod(name)
    body["spec"]["nodeName"] = node
    if not gpus:
        del body["spec"]["containers"][0]["resources"]
        del body["metadata"]["annotations"]
    stack.cluster.apply_items([body], "-n", namespace)
    pod: dict[str, Any] = stack.cluster.get_json("pod", name, "-n", namespace)
    return pod


async def test_resends_and_out_of_order_reports_apply_exactly_once(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    token = agent_token(stack, "gpu-node-0")
    agent = f"test-agent-{namespace[-6:]}"
    pod = await seen_pod(stack, namespace, "ghost")
    reports = {
        n: report(agent, n, pod, active_us)
        for n, active_us in ((1, 1_500_000), (2, 250_000), (3, 2_000_001))
    }
    for _ in range(3):  # the same report three times
        assert await post_usage(http, stack, token, {"reports": [reports[1]]}) == (
            200,
            {"acked": {agent: 1}},
        )
    # 3 before 2: not applied, not acknowledged, until 2 arrives.
    assert await post_usage(http, stack, token, {"reports": [reports[3]]}) == (
        200,
        {"acked": {agent: 1}},
    )
    assert await post_usage(http, stack, token, {"reports": [reports[2]]}) == (
        200,
        {"acked": {agent: 2}},
    )
    assert await post_usage(
        http, stack, token, {"reports": [reports[3], reports[2], reports[1]]}
    ) == (200, {"acked": {agent: 3}})
    totals = record_totals(stack.cluster, namespace)["ghost"]
    assert totals["activeUs"] == 3_750_001
    assert totals["bursts"] == 3
    assert totals["1s"] == 2000 + 1000 + 3000
    assert totals["amount"] == H100_PRICE * 6


async def test_a_report_the_agent_dropped_is_an_audited_gap_not_a_stall(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """Report 2 was dropped by the agent (past retention): its gap marker stands in for
    it, the ledger records the loss and applies report 3 instead of waiting forever."""
    token = agent_token(stack, "gpu-node-0")
    agent = f"gap-agent-{namespace[-6:]}"
    pod = await seen_pod(stack, namespace, "holey")
    marker = {
        **report(agent, 2, pod, 0),
        "series": [],
        "lostUs": 250_000,
        "lostReason": "retention",
    }
    lost = ("payper_usage_lost_seconds_total", {"node": "gpu-node-0", "reason": "retention"})

    def lost_seconds() -> float:
        return scraped_sum(stack.metrics_url, lost[0], lost[1])

    before = lost_seconds()
    batch = [report(agent, 1, pod, 1_500_000), marker]
    batch.append(report(agent, 3, pod, 2_000_001))
    assert await post_usage(http, stack, token, {"reports": batch}) == (
        200,
        {"acked": {agent: 3}},
    )
    totals = record_totals(stack.cluster, namespace)["holey"]
    assert totals["activeUs"] == 3_500_001, "reports 1 and 3; nothing of the lost one"
    assert lost_seconds() - before == pytest.approx(0.25)
    # The marker resent (the agent did not see the answer) changes nothing.
    assert await post_usage(http, stack, token, {"reports": [marker]}) == (
        200,
        {"acked": {agent: 3}},
    )
    assert record_totals(stack.cluster, namespace)["holey"]["activeUs"] == 3_500_001


async def test_an_agent_cannot_bill_usage_to_a_pod_on_another_node(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """A compromised agent claims GPU time for another node's pod: that series is
    refused and counted; the honest series of the same report are applied."""
    pod = await seen_pod(stack, namespace, "victim", "gpu-node-0")
    other = "gpu-node-1"
    bystander = bare_pod(stack, namespace, "bystander", other, gpus=False)
    agent = f"forger-{namespace[-6:]}"
    forged = report(agent, 1, pod, 7_000_000, node=other)
    # A second claim on the same pod (its sidecar): both land in the dead-letter entry.
    sidecar = report(agent, 1, pod, 2_000_000, node=other)["series"][0]
    forged["series"].append(sidecar | {"container": "sidecar"})
    forged["series"] += report(agent, 1, bystander, 1_000_000)["series"]
    refused = ("payper_usage_series_refused_total", {"node": other})
    before = scraped_sum(stack.metrics_url, *refused)
    # Resent until acknowledged: the operator may not have seen the bystander's pod yet.
    await post_until_acked(http, stack, agent_token(stack, other), {"reports": [forged]}, agent, 1)
    totals = record_totals(stack.cluster, namespace)
    assert totals[""]["activeUs"] == 1_000_000, "the honest series is applied"
    assert totals.get("victim", {}).get("activeUs", 0) == 0, "nothing billed to the victim"
    assert scraped_sum(stack.metrics_url, *refused) - before == 2
    letters = cluster_dead_letters(stack)
    (claim,) = [v for k, v in letters.items() if k.startswith(f"{namespace}.victim-")]
    # Every refused series is filed: before one delta per report and record, the second
    # series of a report in the same record was skipped as "filed before".
    assert (claim["activeUs"], claim["reason"]) == (9_000_000, "pod-on-another-node")
    assert claim["reports"] == [f"{other}/{agent}/1"], "filed once, under the claiming node"


async def test_an_agent_cannot_bill_a_pod_the_operator_never_saw(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """A compromised agent invents a pod in a victim's namespace and claims GPU time for
    it. The operator has never seen that pod on the agent's node: the report waits a
    bounded time (a pod bound a moment ago may not have reached the operator's watch yet),
    then the invented series is refused and filed, and the honest one applied."""
    victim = stack.cluster.namespace("victim")
    try:
        honest_pod = await seen_pod(stack, namespace, "honest")
        agent = f"inventor-{namespace[-6:]}"
        claim = report(agent, 1, invented_pod(victim, "llm"), 4_000_000)
        claim["series"] += report(agent, 1, honest_pod, 1_000_000)["series"]
        token = agent_token(stack, "gpu-node-0")
        waiting = ("payper_usage_reports_total", {"result": "waiting_for_pod"})
        refused = ("payper_usage_series_refused_total", {"reason": flush.UNSEEN_POD})
        before = scraped_sum(stack.metrics_url, *refused)
        started = time.monotonic()
        assert await post_usage(http, stack, token, {"reports": [claim]}) == (
            200,
            {"acked": {agent: 0}},
        ), "held, not applied and not acknowledged"
        assert scraped_sum(stack.metrics_url, *waiting) >= 1
        assert record_totals(stack.cluster, namespace).get("honest", {}).get("activeUs", 0) == 0
        await post_until_acked(http, stack, token, {"reports": [claim]}, agent, 1)
        assert time.monotonic() - started >= flush.UNSEEN_POD_WAIT_MS / 1000 - 1
        assert record_totals(stack.cluster, namespace)["honest"]["activeUs"] == 1_000_000
        assert records(stack.cluster, victim) == [], "nothing billed on the agent's word"
        assert scraped_sum(stack.metrics_url, *refused) - before == 1
        (letter,) = [v for k, v in cluster_dead_letters(stack).items() if k.startswith(victim)]
        assert (letter["activeUs"], letter["reason"]) == (4_000_000, flush.UNSEEN_POD)
        assert letter["reports"] == [f"gpu-node-0/{agent}/1"]
    finally:
        stack.cluster.kubectl("delete", "namespace", victim, "--wait=false", check=False)


def gpu_pod(name: str) -> dict[str, Any]:
    """A bare pod a tenant runs itself: a GPU, the stand-in model server, no Payper label."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {podrunner.ANNOTATION: MODEL_PROFILE}},
        "spec": {
            "containers": [
                {
                    "name": "server",
                    "image": "payper/model-server:test",
                    "ports": [{"containerPort": 8000}],
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        },
    }


async def test_gpu_pods_outside_any_deployment_are_billed_to_their_namespace(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """A tenant runs GPU work where no label points at it: a bare pod of its own, and a
    deployment's pod relabelled away (its ReplicaSet lets go of it, and it keeps running).
    Both are billed, through the owner chain the operator reads (not a label), to the
    namespace's own records at the namespace's plan; the deployment pays none of it."""
    cluster = stack.cluster
    stack.deploy(namespace, inference_deployment("llm", min_replicas=1, idle_timeout_s=300))
    cluster.apply_items([gpu_pod("stray")], "-n", namespace)

    def pod_ready(selector: list[str]) -> dict[str, Any] | None:
        pods = cluster.get_json("pods", "-n", namespace, *selector)["items"]
        return next(
            (
                p
                for p in pods
                if p["status"].get("podIP")
                and p["metadata"].get("annotations", {}).get(podrunner.LISTENING_ANNOTATION)
            ),
            None,
        )

    stray = await asyncio.to_thread(
        eventually, lambda: pod_ready(["--field-selector", "metadata.name=stray"]), 60, 0.2, "stray"
    )
    owned = await asyncio.to_thread(
        eventually, lambda: pod_ready(["-l", f"{POD_LABEL}=llm"]), 60, 0.2, "llm's pod"
    )
    cluster.kubectl("label", "pod", owned["metadata"]["name"], "-n", namespace, f"{POD_LABEL}-")

    def released() -> bool:
        pod = cluster.get_json("pod", owned["metadata"]["name"], "-n", namespace)
        return not pod["metadata"].get("ownerReferences")

    await asyncio.to_thread(eventually, released, 30, 0.2, "the ReplicaSet lets go of the pod")
    for pod in (stray, owned):
        for ms in (300, 700, 1100):
            async with http.post(
                f"http://{pod['status']['podIP']}:8000/v1/infer", json={"ms": ms}
            ) as response:
                assert response.status == 200
    await stack.settle()

    truth = stack.pod_truth()
    uids = [stray["metadata"]["uid"], owned["metadata"]["uid"]]
    expected = sum(truth[uid]["activeUs"] for uid in uids)
    expected_1s = sum(truth[uid]["1s"] for uid in uids)
    assert expected >= 2_000_000, truth
    unmanaged = [
        r for r in records(cluster, namespace) if r["spec"].get("inferenceDeployment") is None
    ]
    assert unmanaged, "the namespace's own records exist"
    assert all(r["metadata"]["name"].startswith("unmanaged.") for r in unmanaged)
    assert all(r["spec"]["plan"] == "default" for r in unmanaged)
    assert sum(int(r["status"]["activeUs"]) for r in unmanaged) == expected
    assert sum(Decimal(r["status"]["amount"]) for r in unmanaged) == (
        H100_PRICE * expected_1s / 1000
    )
    assert record_totals(cluster, namespace).get("llm", {}).get("activeUs", 0) == 0
    spans = {i["uid"] for r in unmanaged for i in r["status"].get("podIntervals") or []}
    assert set(uids) <= spans, "their provisioned GPU time is the namespace's too"


async def test_usage_for_a_deleted_namespace_is_filed_not_a_stall(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """A tenant deletes its namespace while usage for it is still on the way: the record
    can never be written. The change goes to the dead-letter store, the agent's report is
    acknowledged, and the other tenants' series of the same reports are billed."""
    cluster = stack.cluster
    gone = cluster.namespace("doomed")
    bystander = cluster.namespace("bystander")
    token = agent_token(stack, "gpu-node-0")
    agent = f"dead-{gone[-6:]}"
    doomed = bare_pod(stack, gone, "llm-0", "gpu-node-0", gpus=False)
    web = bare_pod(stack, bystander, "web-0", "gpu-node-0", gpus=False)
    # Once the operator has seen the later pod, it has seen the earlier one (one watch).
    first = report(agent, 1, web, 10_000)
    await post_until_acked(http, stack, token, {"reports": [first]}, agent, 1)
    cluster.kubectl("delete", "namespace", gone, "--wait=true", "--timeout=60s", timeout=90)
    try:
        for sequence in range(2, 22):  # the same refused record, twenty times over
            body = report(agent, sequence, doomed, 100_000)
            body["series"] += report(agent, sequence, web, 10_000)["series"]
            assert await post_usage(http, stack, token, {"reports": [body]}) == (
                200,
                {"acked": {agent: sequence}},
            ), "acknowledged: nothing waits behind a record that can never be written"
        assert record_totals(cluster, bystander)[""]["activeUs"] == 21 * 10_000
        entries = {
            key: value
            for key, value in cluster_dead_letters(stack).items()
            if key.startswith(f"{gone}.")
        }
        (entry,) = entries.values()  # one entry per refused record, however many changes
        assert (entry["namespace"], entry["inferenceDeployment"]) == (gone, UNMANAGED)
        assert entry["activeUs"] == 20 * 100_000
        assert entry["reason"] == "namespace-gone"
        assert len(entry["reports"]) == 20
        events = cluster.get_json(
            "events", "-n", SYSTEM_NAMESPACE, "--field-selector", "reason=UsageDeadLettered"
        )["items"]
        about = [e for e in events if f"{gone}/" in e["message"]]
        assert len(about) == 1, "one event for the entry, not one per refused change"
        assert about[0]["involvedObject"]["name"] == "payper-dead-letters"
    finally:
        cluster.kubectl("delete", "namespace", bystander, "--wait=false", check=False)


async def test_a_deleted_namespace_keeps_its_open_records_and_their_late_usage(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """A tenant deletes its namespace while its records are still Open (a way to erase
    an unbilled hour). The deletion completes; before it, the operator moved each open
    record, as last written, into its own namespace, where the pods' last reports and any
    later usage for that window land."""
    cluster = stack.cluster
    leaving = cluster.namespace("leaving")
    stack.deploy(leaving, model("llm"))
    for ms in (400, 900):
        async with http.post(
            f"{stack.gateway_url}/{leaving}/llm/v1/infer", json={"ms": ms}
        ) as response:
            assert response.status == 200, await response.text()
    await stack.settle()
    before = {r["metadata"]["name"]: r for r in records(cluster, leaving)}
    assert before and all(r["status"]["state"] == "Open" for r in before.values())
    (pod,) = cluster.get_json("pods", "-n", leaving, "-l", f"{POD_LABEL}=llm")["items"]

    cluster.kubectl("delete", "namespace", leaving, "--wait=true", "--timeout=90s", timeout=120)
    await stack.settle()  # the pods' last reports, cut after the deletion began
    late_window = min(r["spec"]["window"]["start"] for r in before.values())
    start_ms = int(
        datetime.strptime(late_window, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp() * 1000
    )
    agent = f"late-{leaving[-6:]}"
    late = report(agent, 1, pod, 250_000)  # the gone pod's, as its node's agent cut it
    late |= {"intervalStartMs": start_ms + 1000, "intervalEndMs": start_ms + 2000}
    token = agent_token(stack, pod["spec"]["nodeName"])
    await post_until_acked(http, stack, token, {"reports": [late]}, agent, 1)

    moved = {
        r["metadata"]["name"]: r
        for r in records(cluster, SYSTEM_NAMESPACE)
        if r["metadata"]["labels"].get("payper.dev/moved-from-namespace") == leaving
    }
    assert set(moved) == {f"{leaving}.{name}" for name in before}
    for name, record in before.items():
        assert moved[f"{leaving}.{name}"]["spec"] == record["spec"], "same account and prices"
    truth = stack.agent_truth()[(leaving, "llm")]["activeUs"]
    assert truth > 0
    assert sum(int(r["status"]["activeUs"]) for r in moved.values()) == truth + 250_000
    assert scraped_sum(stack.metrics_url, "payper_billing_records_moved_total") >= len(before)


async def test_a_record_the_ledger_did_not_create_is_never_adopted(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """Exploit: a tenant holding ``payper.dev/*`` in its namespace, on a cluster whose
    admission policy is off (the test stack installs none), pre-creates its deployment's
    records for this hour and the next at price 0. The ledger leaves them alone and keeps
    the real records, at the real price, in its own namespace."""
    cluster = stack.cluster
    tenant = f"system:serviceaccount:{namespace}:tenant"
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "payper-everything"},
        "rules": [{"apiGroups": ["payper.dev"], "resources": ["*"], "verbs": ["*"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "payper-everything"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        },
        "subjects": [{"kind": "User", "name": tenant}],
    }
    cluster.apply_items([role, binding], "-n", namespace)
    hour = 3_600_000
    this_hour = int(time.time() * 1000) // hour * hour
    forged = []
    for start in (this_hour, this_hour + hour):
        spec = BillingRecordSpec.model_validate(
            {
                "inferenceDeployment": "llm",
                "account": namespace,
                "window": {"start": iso(start), "end": iso(start + hour)},
                "plan": "default",
                "granularity": "1s",
                "currency": "USD",
                "pricePerGpuSecond": "0",
                "reservedPricePerGpuHour": "0",
                "gpuProduct": product_key(H100),
            }
        )
        name = record_name("llm", start, product_key(H100))
        forged.append(name)
        record = {
            "apiVersion": "payper.dev/v1alpha1",
            "kind": "BillingRecord",
            "metadata": {"name": name, "labels": {"payper.dev/state": "Open"}},
            "spec": spec.to_wire(),
        }
        cluster.kubectl(
            "create", "-n", namespace, "--as", tenant, "-f", "-", input=json.dumps(record)
        )
    foreign = ("payper_billing_foreign_records_total", {})
    before = scraped_sum(stack.metrics_url, *foreign)
    stack.deploy(namespace, model("llm"))
    for ms in (300, 800):
        async with http.post(f"{stack.gateway_url}/{namespace}/llm/v1/infer", json={"ms": ms}) as r:
            assert r.status == 200, await r.text()
    await stack.settle()

    for name in forged:  # untouched: no usage, no status
        assert not cluster.get_json("brec", name, "-n", namespace).get("status")
    kept = [
        r
        for r in records(cluster, SYSTEM_NAMESPACE)
        if r["metadata"]["labels"].get("payper.dev/moved-from-namespace") == namespace
    ]
    assert kept and {r["metadata"]["name"] for r in kept} <= {f"{namespace}.{n}" for n in forged}
    assert all(r["spec"]["pricePerGpuSecond"] == str(H100_PRICE) for r in kept)
    truth = stack.agent_truth()[(namespace, "llm")]
    assert sum(int(r["status"]["activeUs"]) for r in kept) == truth["activeUs"] > 0
    assert sum(Decimal(r["status"]["amount"]) for r in kept) == H100_PRICE * truth["1s"] / 1000
    assert scraped_sum(stack.metrics_url, *foreign) - before >= 1
    events = cluster.get_json(
        "events", "-n", namespace, "--field-selector", "reason=ForeignBillingRecord"
    )["items"]
    assert events and events[0]["involvedObject"]["name"] in forged


async def test_an_operator_left_at_its_defaults_refuses_simulated_reports(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """A simulated backend could bill anything, so a real cluster's operator (its
    configuration left at the defaults) refuses reports marked simulated: 403 and a
    count, nothing applied; a driver's report from the same caller is applied."""
    assert stack.operator is not None
    stack.operator.stop()
    stack.options.accept_simulated_reports = False
    try:
        await asyncio.to_thread(stack.start_operator)
        token = agent_token(stack, "gpu-node-0")
        agent = f"sim-{namespace[-6:]}"
        pod = await seen_pod(stack, namespace, "llm")
        simulated = report(agent, 1, pod, 5_000) | {"simulated": True}
        status, payload = await post_usage(http, stack, token, {"reports": [simulated]})
        assert status == 403, payload
        assert "acceptSimulatedReports" in json.dumps(payload)
        # (the stack's own agents, simulated too, are refused alike and keep their reports)
        assert scraped_sum(stack.metrics_url, "payper_usage_simulated_refused_total") >= 1
        applied = record_totals(stack.cluster, namespace).get("llm", {}).get("activeUs", 0)
        assert applied == 0, "nothing applied"
        measured = report(agent, 1, pod, 5_000)
        await post_until_acked(http, stack, token, {"reports": [measured]}, agent, 1)
        assert record_totals(stack.cluster, namespace)["llm"]["activeUs"] == 5_000
    finally:
        stack.operator.stop()
        stack.options.accept_simulated_reports = True
        await asyncio.to_thread(stack.start_operator)


async def test_usage_from_the_wrong_caller_or_payload_changes_nothing(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    agent_node0 = agent_token(stack, "gpu-node-0")
    unbound = stack.token("payper-agent")  # a valid agent token, bound to no pod
    gateway = stack.token("payper-gateway")
    victim = invented_pod(namespace, "victim")
    good = {"reports": [report("intruder", 1, victim, 9_000_000)]}
    other_node = {"reports": [report("intruder", 1, victim, 9_000_000, node="gpu-node-1")]}
    malformed = {"reports": [{**report("intruder", 1, victim, 1), "sequence": 0}]}
    oversized = b'{"reports": [' + b" " * (5 * 1024 * 1024) + b"]}"
    cases = [
        (None, good, 401, "unauthenticated"),
        (agent_node0[:-6] + "AAAAAA", good, 401, "unauthenticated"),
        (gateway, good, 403, "may not call"),
        (unbound, good, 403, "not bound to a pod"),
        (agent_node0, other_node, 403, "gpu-node-1"),
        (agent_node0, oversized, 413, "payload larger"),
        (agent_node0, {"reports": []}, 400, "reports"),
    ]
    for token, body, status, message in cases:
        got, payload = await post_usage(http, stack, token, body)
        assert got == status, (message, payload)
        assert message in payload["error"]
    # A report that is not valid is refused alone, naming the field; with no readable
    # sequence there is nothing to move past.
    got, payload = await post_usage(http, stack, agent_node0, malformed)
    assert got == 200 and payload["acked"] == {}, payload
    [refused] = payload["refused"]
    assert refused["sequence"] is None and "sequence" in refused["reason"], refused
    await asyncio.sleep(2)
    assert records(stack.cluster, namespace) == []


BILL_RECORDS = [
    # deployment, window start, granularity, price/s, reserved/h, activeMs, rounded (1ms, 1s, 1m), provisioned
    (
        "chat",
        "2026-11-20T10:00:00Z",
        "1s",
        "0.0012",
        "3.20",
        125_500,
        (125_500, 131_000, 240_000),
        3_600_000,
    ),
    (
        "chat",
        "2026-11-20T11:00:00Z",
        "1s",
        "0.0012",
        "3.20",
        10_250,
        (10_250, 12_000, 60_000),
        1_800_000,
    ),
    (
        "vision",
        "2026-11-20T10:00:00Z",
        "1ms",
        "0.0009",
        "2.50",
        40_123,
        (40_123, 52_000, 360_000),
        900_000,
    ),
]


def test_payper_bill_matches_a_hand_computed_invoice(
    cluster_with_records: tuple[ClusterHandle, str], repo: Path
) -> None:
    cluster, namespace = cluster_with_records
    # By hand: chat 10h: billed 131 s x 0.0012 = 0.157200; chat 11h: 12 s -> 0.014400;
    # vision: 40.123 s x 0.0009 = 0.0361107 -> 0.036111. Total 0.207711.
    # Per-ms:  125.5*0.0012 + 10.25*0.0012 + 40.123*0.0009 = 0.1506+0.0123+0.0361107 -> 0.150600+0.012300+0.036111 = 0.199011
    # Per-s:   131*0.0012 + 12*0.0012 + 52*0.0009 = 0.1572+0.0144+0.0468 = 0.218400
    # Per-min: 240*0.0012 + 60*0.0012 + 360*0.0009 = 0.288+0.072+0.324 = 0.684000
    # Reserved: 1h x 3.20 + 0.5h x 3.20 + 0.25h x 2.50 = 3.2 + 1.6 + 0.625 = 5.425000
    # Saving: 5.425000 - 0.207711 = 5.217289 (96.2 %)
    env = cluster.env()

    def bill(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "payper.cli", "bill", "-n", namespace, *args],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout

    data = json.loads(bill("-o", "json"))
    assert [
        (ln["inferenceDeployment"], ln["windowStart"], ln["amount"]) for ln in data["lines"]
    ] == [
        ("chat", "2026-11-20T10:00:00Z", "0.157200"),
        ("chat", "2026-11-20T11:00:00Z", "0.014400"),
        ("vision", "2026-11-20T10:00:00Z", "0.036111"),
    ]
    assert data["lines"][0]["activeGpuSeconds"] == "125.500"
    assert data["lines"][0]["idleGpuSeconds"] == "3474.500"
    assert data["totals"] == {
        "USD": {
            "activeGpuSeconds": "175.873",
            "billedGpuSeconds": "183.123",
            "provisionedGpuSeconds": "6300.000",
            "idleGpuSeconds": "6124.127",
            "amount": "0.207711",
            "amountAtGranularity": {"1ms": "0.199011", "1s": "0.218400", "1m": "0.684000"},
            "reservedEquivalentAmount": "5.425000",
            "savingVsReserved": "5.217289",
            "savingPercent": "96.2",
        }
    }
    csv_lines = bill("-o", "csv").strip().split("\n")
    assert csv_lines[0].startswith("namespace,inference_deployment,window_start")
    assert csv_lines[3].split(",")[12:] == [
        "0.036111",
        "0.036111",
        "0.046800",
        "0.324000",
        "0.625000",
    ]
    assert csv_lines[4].split(",")[8:] == [
        "175.873",
        "183.123",
        "6300.000",
        "6124.127",
        "0.207711",
        "0.199011",
        "0.218400",
        "0.684000",
        "5.425000",
    ]
    table = bill()
    assert "amount due:            0.207711 USD" in table
    assert "saving vs reserved:    5.217289 USD (96.2 %)" in table
    assert "1m: 0.684000 USD" in table
    window = json.loads(bill("-o", "json", "--from", "2026-11-20T11:00:00", "--to", "2026-11-21"))
    assert [ln["windowStart"] for ln in window["lines"]] == ["2026-11-20T11:00:00Z"]


@pytest.fixture
def cluster_with_records(
    crds_installed: ClusterHandle, namespace: str
) -> tuple[ClusterHandle, str]:
    for (
        deployment,
        start,
        granularity,
        price,
        reserved,
        active,
        rounded,
        provisioned,
    ) in BILL_RECORDS:
        name = f"{deployment}-{start[11:13]}"
        end = start[:11] + f"{int(start[11:13]) + 1:02d}" + start[13:]
        body = {
            "apiVersion": "payper.dev/v1alpha1",
            "kind": "BillingRecord",
            "metadata": {"name": name},
            "spec": {
                "inferenceDeployment": deployment,
                "account": namespace,
                "window": {"start": start, "end": end},
                "plan": "default",
                "granularity": granularity,
                "currency": "USD",
                "pricePerGpuSecond": price,
                "reservedPricePerGpuHour": reserved,
                "gpuProduct": H100,
            },
        }
        crds_installed.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
        billed = rounded[{"1ms": 0, "1s": 1, "1m": 2}[granularity]]
        status = {
            "state": "Final",
            "activeMs": active,
            "activeUs": active * 1000,
            "billedMs": billed,
            "roundedMs": {"1ms": rounded[0], "1s": rounded[1], "1m": rounded[2]},
            "provisionedMs": provisioned,
            "idleMs": provisioned - active,
        }
        crds_installed.kubectl(
            "patch",
            "brec",
            name,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )
    return crds_installed, namespace


# --- a stack with short windows: late usage and a second operator ------------------------

SHORT = {
    "billing": {
        "flushIntervalSeconds": 1,
        "windowSeconds": 20,
        "graceSeconds": 5,
        "recordRetentionDays": 1,
    }
}


@pytest.fixture(scope="module")
def short_stack(
    crds_installed: ClusterHandle, tmp_path_factory: pytest.TempPathFactory, stack: Stack
) -> Iterator[Stack]:
    stack.stop()  # one operator per cluster: the Lease would make a second one wait
    options = StackOptions(agents=True, operator_extra=SHORT)
    with running(crds_installed, tmp_path_factory.mktemp("short-windows"), options) as started:
        yield started


async def test_an_operator_away_for_longer_than_a_window_and_grace_loses_nothing(
    short_stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    stack = short_stack
    stack.deploy(namespace, model("late"))
    rng = random.Random(5)
    first = await traffic(http, stack, namespace, "late", rng, 6)
    assert stack.operator is not None
    stack.operator.stop(sig=signal.SIGKILL)
    # The gateway still serves the warm pod; agents keep metering and queue their reports.
    during = await traffic(http, stack, namespace, "late", rng, 30)
    await asyncio.to_thread(stack.start_operator)
    after = await traffic(http, stack, namespace, "late", rng, 4)
    assert set(first + during + after) == {200}
    await stack.settle()
    assert_records_equal_truth(stack, namespace, ["late"])
    recs = records(stack.cluster, namespace)
    adjustments = [a for r in recs for a in (r.get("status") or {}).get("adjustments", [])]
    assert adjustments, "usage of windows closed while the operator was away must be adjustments"
    finals = [r for r in recs if r["status"]["state"] == "Final"]
    assert finals
    # The state label follows the status (it is set right after the Final status is
    # written), so start-up lists only Open records.
    state = "payper.dev/state"

    def labels_follow_states() -> bool:
        now = records(stack.cluster, namespace)
        listed = stack.cluster.get_json("brec", "-n", namespace, "-l", f"{state}!=Final")
        return all(r["metadata"]["labels"][state] == r["status"]["state"] for r in now) and {
            r["metadata"]["name"] for r in listed["items"]
        } == {r["metadata"]["name"] for r in now if r["status"]["state"] != "Final"}

    eventually(labels_follow_states, 20, 0.5, "state labels that follow the status")
    for adjustment in adjustments:
        assert adjustment["activeUs"] > 0
        assert "already final" in adjustment["reason"]


async def test_two_operators_started_at_once_one_leads(
    short_stack: Stack, namespace: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stack = short_stack
    stack.deploy(namespace, model("twins"))
    assert stack.operator is not None
    stack.operator.stop()  # a clean stop gives the Lease back
    second = Stack(stack.cluster, tmp_path / "second", StackOptions(operator_extra=SHORT))
    _first, second_process = await asyncio.gather(
        asyncio.to_thread(stack.start_operator, "operator-0", False),
        asyncio.to_thread(second.start_operator, "operator-1", False),
    )
    try:
        urls = (stack.operator_url, second.operator_url)
        eventually(lambda: any(_leads(u) for u in urls), 30, 0.2, "a leader")
        await asyncio.sleep(2)
        assert sorted(_leads(u) for u in urls) == [False, True], "exactly one operator leads"
        standby = second if _leads(stack.operator_url) else stack
        status, payload = await post_usage(
            http,
            standby,
            agent_token(stack, "gpu-node-0"),
            {"reports": [report("x", 1, invented_pod(namespace, "y"), 5)]},
        )
        assert (status, "not the leader" in payload["error"]) == (503, True)
        if standby is stack:
            # The gateway and the agents call operator-0 (in a cluster a Service routes to
            # whichever pod is ready, the leader): let it take over before any traffic.
            second_process.stop(sig=signal.SIGKILL)
            eventually(lambda: _leads(stack.operator_url), 40, 0.5, "operator-0 to take over")
        statuses = await traffic(http, stack, namespace, "twins", random.Random(6), 8)
        assert set(statuses) == {200}
    finally:
        second_process.stop()
    await stack.settle()
    assert_records_equal_truth(stack, namespace, ["twins"])
    assert "y" not in record_totals(stack.cluster, namespace)


def _leads(operator_url: str) -> bool:
    return http_ok(f"{operator_url}/readyz")  # only the leader is ready


async def test_final_records_past_their_retention_are_deleted_and_no_others(
    short_stack: Stack, namespace: str
) -> None:
    """``recordRetentionDays: 1``: a Final record whose window ended two days ago is
    deleted; a Final one of twelve hours ago stays, and so does an Open one of two days
    ago that someone labelled Final (a label is not a state: an unbilled hour is never
    erased that way). The operator looks at start, then hourly."""
    stack = short_stack
    hour = 3_600_000
    now = int(time.time() * 1000) // hour * hour
    kept_for = {"old-final": (now - 49 * hour, "Final"), "young-final": (now - 13 * hour, "Final")}
    kept_for["old-open"] = (now - 49 * hour, "Open")
    for name, (start, state) in kept_for.items():
        spec = record_spec(namespace, "llm", iso(start), iso(start + hour))
        labels = {"labels": {"payper.dev/state": "Final"}}
        put_record(stack.cluster, namespace, name, spec, {"state": state}, labels)
    deleted = ("payper_billing_records_deleted_total", {})
    assert stack.operator is not None
    stack.operator.stop()
    await asyncio.to_thread(stack.start_operator)  # it looks at start
    await asyncio.to_thread(
        eventually,
        lambda: (
            "old-final" not in {r["metadata"]["name"] for r in records(stack.cluster, namespace)}
        ),
        30,
        0.5,
        "the expired Final record deleted",
    )
    assert {r["metadata"]["name"] for r in records(stack.cluster, namespace)} == {
        "young-final",
        "old-open",
    }
    assert scraped_sum(stack.metrics_url, *deleted) >= 1
