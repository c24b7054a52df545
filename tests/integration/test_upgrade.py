"""Upgrades lose nothing: from the last released Payper to this tree, with Open
BillingRecords and unacknowledged agent reports in flight, nothing is lost or counted twice.

The released tree comes from this repository's own history (``git archive`` of
``RELEASED``; a shallow clone fetches it, and the test fails, never skips, if it cannot).
Its operator, gateway and agents run from it (``StackOptions.source``) under its chart's
RBAC and its CRDs. In flight at the upgrade: reports the release wrote into records but
never acknowledged (its progress saves are made to fail, as if it died between the two
writes), and reports it never saw (cut while no operator ran). The upgrade is what a
user does: apply the new CRDs (helm never upgrades a chart's ``crds/``), then ``helm
upgrade``: the chart's new RBAC, the operator replaced (``Recreate``: the old one stops
first), the gateway replaced, the agents' DaemonSet rolled node by node on the same host
state directories. The agents also move to a namespace of their own, so the release's
agents lose their identity at the upgrade: node 0's agent is replaced while no operator
runs, so the new agent finds the old one's reports and open bursts on disk; node 1's old
agent meters on until the new operator runs, then stops with reports the new operator
never saw from it, which its successor delivers. The truth is the agents' own
checkpoints, as in ``test_billing``.

The module runs its own cluster (pod IPs in 127.4.0.0/16), always, even with
PAYPER_TEST_KUBECONFIG: it starts from the released CRDs (which, installed in the shared
cluster, would refuse the records other modules write), and the system namespace's
progress ConfigMap, Lease and RBAC are cluster-wide, shared with other modules' stacks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import own_cluster
from payper.billing.pricing import product_key
from payper.billing.records import window_start
from payper.clock import now_ms
from payper_dev.testing.billing import assert_records_equal_truth as records_equal_truth
from payper_dev.testing.billing import record_totals
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import (
    AGENT_POLL_MS,
    SYSTEM_NAMESPACE,
    Stack,
    StackOptions,
    inference_deployment,
)

RELEASED = "83d825bb2252595266e2673972f10d14e126efe7"
"""The last released Payper (the last commit that passed CI): what the upgrade starts from."""
REPO = Path(__file__).resolve().parents[2]
WINDOW_MS = 3_600_000  # the default billing window
FLUSH = {"billing": {"flushIntervalSeconds": 1}}
NODES = ("gpu-node-0", "gpu-node-1")
PROGRESS = ("configmap", "payper-usage-ledger", "-n", SYSTEM_NAMESPACE)
GPU_TIME_OBJECTS = ("configmap", "-n", SYSTEM_NAMESPACE, "-l", "payper.dev/gpu-time")


def _git(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, timeout=timeout, check=False
    )


def _have_release() -> bool:
    return _git("cat-file", "-e", f"{RELEASED}^{{commit}}").returncode == 0


def released_tree(target: Path) -> Path:
    """The released operator, agent, chart and CRDs, from this clone's history; a shallow
    clone fetches the one commit. Never skipped: without it the test fails and says why."""
    if not _have_release():
        shallow = _git("rev-parse", "--is-shallow-repository").stdout.strip() == b"true"
        depth = ["--depth=1"] if shallow else []  # a full clone must stay full
        fetched = _git("fetch", "--no-tags", *depth, "origin", RELEASED, timeout=180)
        if not _have_release():
            pytest.fail(
                f"the released commit {RELEASED} is not in this clone"
                f"{' (shallow)' if shallow else ''} and fetching it from origin failed:\n"
                f"{fetched.stderr.decode(errors='replace')}\n"
                f"Clone with full history, or run: git fetch origin {RELEASED}"
            )
    archive = _git("archive", RELEASED, "operator", "gpu-agent", "charts", "crds")
    assert archive.returncode == 0, archive.stderr.decode(errors="replace")
    target.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return released_tree(tmp_path_factory.mktemp("released") / "payper")


@pytest.fixture(scope="module")
def upgrade_cluster(
    released: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClusterHandle]:
    """A cluster of its own, serving the released CRDs from the start (as a cluster
    running the release does; the garbage collector knows them from its first discovery)."""
    with own_cluster(tmp_path_factory.mktemp("upgrade-cluster"), released / "crds") as handle:
        yield handle


@pytest.fixture(scope="module")
def stack(
    upgrade_cluster: ClusterHandle, released: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The release running: its operator, gateway and agents, under its chart's RBAC."""
    options = StackOptions(agents=True, operator_extra=FLUSH, source=released)
    stack = Stack(upgrade_cluster, tmp_path_factory.mktemp("upgrade"), options)
    try:
        yield stack.start()
    finally:
        stack.stop()


# -- helpers ----------------------------------------------------------------------------


def model(name: str, node: str) -> dict[str, Any]:
    """A deployment pinned to one node: each node's agent has usage of its own."""
    body = inference_deployment(name, idle_timeout_s=600, max_replicas=1)
    body["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    return body


async def traffic(
    http: aiohttp.ClientSession, stack: Stack, namespace: str, name: str, seed: int, seconds: float
) -> list[int]:
    rng = random.Random(seed)
    statuses = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        async with http.post(
            f"{stack.gateway_url}/{namespace}/{name}/v1/infer",
            json={"ms": rng.choice([120, 450, 900])},
        ) as response:
            statuses.append(response.status)
        await asyncio.sleep(rng.choice([0.1, 0.5, 1.5]))
    return statuses


async def both(
    http: aiohttp.ClientSession, stack: Stack, namespace: str, seed: int, seconds: float
) -> None:
    results = await asyncio.gather(
        traffic(http, stack, namespace, "alpha", seed, seconds),
        traffic(http, stack, namespace, "beta", seed + 1, seconds),
    )
    assert {s for r in results for s in r} == {200}


def records(cluster: ClusterHandle, namespace: str) -> dict[str, dict[str, Any]]:
    items = cluster.get_json("brec", "-n", namespace)["items"]
    return {r["metadata"]["name"]: r for r in items}


def active_us(items: dict[str, dict[str, Any]]) -> int:
    return sum(int((r.get("status") or {}).get("activeUs", 0)) for r in items.values())


def assert_records_equal_truth(stack: Stack, namespace: str) -> None:
    """The records hold exactly what the agents measured, and only for the two models."""
    assert set(record_totals(stack.cluster, namespace)) == {"alpha", "beta"}
    records_equal_truth(stack, namespace, ["alpha", "beta"])


def state(stack: Stack, node: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((stack.agent_state_dir(node) / "state.json").read_text())
    return loaded


def pending_reports(stack: Stack, node: str) -> dict[str, dict[str, Any]]:
    """The agent's unacknowledged reports on disk, by file name, as written, each with
    the checkpoint written with it (``stateAfter``)."""
    found = {}
    for path in sorted((stack.agent_state_dir(node) / "reports").glob("*.json")):
        try:
            written = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # acknowledged and deleted by a running agent since the listing
        found[path.name] = {**written["report"], "stateAfter": written["stateAfter"]}
    return found


def reported_us(checkpoint: dict[str, Any]) -> int:
    """Everything an agent has put into its reports so far (its series' reported time)."""
    return sum(int(s["reportedUs"]) for s in checkpoint["meter"].get("series", []))


def stop_agent(stack: Stack, node: str) -> dict[str, Any]:
    """Stop an agent (SIGTERM, as a rolling update does); its checkpoint as it left it."""
    assert stack.agents[node].stop() == 0, stack.agents[node].tail()
    left = state(stack, node)
    reports = pending_reports(stack, node)
    # Graceful: the checkpoint is not older than its last report.
    assert all(r["sequence"] < left["nextSequence"] for r in reports.values())
    return left


def record_without_deployment_is_served(cluster: ClusterHandle, namespace: str) -> bool:
    """Whether the API server's BillingRecord schema has spec.inferenceDeployment
    optional (this tree's CRD; the release required it): a server-side dry run."""
    body = {
        "apiVersion": "payper.dev/v1alpha1",
        "kind": "BillingRecord",
        "metadata": {"name": "schema-probe", "namespace": namespace},
        "spec": {
            "account": namespace,
            "window": {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z"},
            "plan": "default",
            "granularity": "1s",
            "currency": "USD",
            "pricePerGpuSecond": "0.0012",
            "reservedPricePerGpuHour": "3.20",
            "gpuProduct": "NVIDIA-H100-80GB-HBM3",
        },
    }
    done = cluster.kubectl(
        "create", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False
    )
    return done.returncode == 0


def reconcile(stack: Stack) -> dict[str, Any]:
    """``payper reconcile -o json`` over every window. (It exits 1 here: the records of
    the upgrade's window also hold what the release applied, which no reconciliation
    object counts; the test's last assertions pin that difference exactly.)"""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "payper.cli",
            "reconcile",
            "--kubeconfig",
            str(stack.cluster.kubeconfig),
            "--operator-namespace",
            SYSTEM_NAMESPACE,
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        env=stack.cluster.env(),
        timeout=60,
        check=False,
    )
    assert done.stdout, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def can_save_progress(cluster: ClusterHandle) -> bool:
    done = cluster.kubectl(
        "auth",
        "can-i",
        "update",
        "configmaps",
        "-n",
        SYSTEM_NAMESPACE,
        f"--as=system:serviceaccount:{SYSTEM_NAMESPACE}:payper-operator",
        check=False,
    )
    return done.stdout.strip() == "yes"


def forbid_progress_saves(cluster: ClusterHandle) -> None:
    """Take ``update`` on ConfigMaps from the operator's Role: the release keeps writing
    records but can no longer save its progress, as if each flush crashed between the
    two; the reports stay unacknowledged. ``helm upgrade`` gives the right back."""
    role = cluster.get_json("role", "payper-operator", "-n", SYSTEM_NAMESPACE)
    for rule in role["rules"]:
        if "configmaps" in rule["resources"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "update"]
    cluster.kubectl("replace", "-f", "-", input=json.dumps(role))
    eventually(lambda: not can_save_progress(cluster), 20, 0.2, "progress saves forbidden")


def applied_through_progress(reports: dict[str, dict[str, Any]], progress: int) -> int:
    """What an agent's reports up to its stored progress held, from the first report after
    it: the checkpoint written with that report, less the report itself."""
    first = min(reports.values(), key=lambda r: r["sequence"])
    assert first["sequence"] == progress + 1, "every report after the progress is on disk"
    return reported_us(first["stateAfter"]) - sum(s["activeUs"] for s in first["series"])


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the upgrade ------------------------------------------------------------------------


async def test_a_helm_upgrade_from_the_release_loses_and_double_counts_nothing(
    stack: Stack, http: aiohttp.ClientSession, repo: Path
) -> None:
    cluster = stack.cluster
    namespace = cluster.namespace("upgrade")
    stack.deploy(namespace, model("alpha", NODES[0]), model("beta", NODES[1]))

    # 1. The release bills traffic: Open records, every report acknowledged.
    assert not record_without_deployment_is_served(cluster, namespace), "the release's CRDs"
    await both(http, stack, namespace, 1, 6)
    await stack.settle()
    assert_records_equal_truth(stack, namespace)
    # It is the release that runs: its operator keeps no per-GPU reconciliation.
    assert cluster.get_json(*GPU_TIME_OBJECTS)["items"] == []
    agent_ids = {node: state(stack, node)["agentId"] for node in NODES}
    keys = {node: f"{node}/{agent_ids[node]}" for node in NODES}

    # 2. In flight at the upgrade: reports the release wrote into records but never
    #    acknowledged (its progress saves fail, as if it died between the two each time)...
    forbid_progress_saves(cluster)
    await both(http, stack, namespace, 2, 6)
    progress = cluster.get_json(*PROGRESS)
    saved = json.loads(progress["data"]["appliedThrough"])

    def written_beyond_progress() -> bool:
        beyond = {
            agent
            for record in records(cluster, namespace).values()
            for agent, sequence in record["status"]["lastAppliedSequence"].items()
            if sequence > saved[agent]
        }
        return beyond == set(keys.values())

    await asyncio.to_thread(
        eventually, written_beyond_progress, 30, 0.2, "records written beyond the progress"
    )
    # ... then helm upgrade replaces the operator (Recreate: the old one stops first); the
    # gateway serves the warm pods and the agents meter on: reports it never saw.
    assert stack.operator is not None
    assert stack.operator.stop() == 0, stack.operator.tail()
    await both(http, stack, namespace, 3, 6)
    traffic_end = now_ms()
    await asyncio.to_thread(
        eventually,
        lambda: stack.agents_reported_since(traffic_end + 2 * AGENT_POLL_MS),
        30,
        0.2,
        "reports cut after the traffic",
    )
    at_upgrade = records(cluster, namespace)
    assert at_upgrade and {r["status"]["state"] for r in at_upgrade.values()} == {"Open"}
    assert json.loads(cluster.get_json(*PROGRESS)["data"]["appliedThrough"]) == saved
    pending = {node: pending_reports(stack, node) for node in NODES}
    for node in NODES:
        reports = list(pending[node].values())
        assert all("gpus" not in r for r in reports), "written by the release's agent"
        written = max(
            r["status"]["lastAppliedSequence"].get(keys[node], 0) for r in at_upgrade.values()
        )
        assert max(r["sequence"] for r in reports) > written, f"{node}: reports never applied"
        assert any(
            s["activeUs"] > 0 for r in reports if r["sequence"] > written for s in r["series"]
        ), f"{node}: usage never applied"
    # What the release applied and saved progress for: the rest is in flight.
    through_progress = {
        node: applied_through_progress(pending[node], saved[keys[node]]) for node in NODES
    }
    assert active_us(at_upgrade) > sum(through_progress.values())

    # Node 0's agent is rolled now, with the operator away: its reports stay on disk for
    # the new agent, and its meter holds open bursts (a minute-long burst ends a minute
    # after the traffic).
    assert stack.gateway is not None
    stack.gateway.stop()
    old_state = {NODES[0]: stop_agent(stack, NODES[0])}
    assert any("openX100" in s for s in old_state[NODES[0]]["meter"]["series"])
    assert set(pending_reports(stack, NODES[0])) >= set(pending[NODES[0]])

    # 3. The upgrade: this tree's CRDs, then the chart (RBAC), operator and gateway.
    cluster.kubectl("apply", "-f", str(repo / "charts" / "payper" / "crds"))
    await asyncio.to_thread(
        eventually,
        lambda: record_without_deployment_is_served(cluster, namespace),
        30,
        0.2,
        "this tree's BillingRecord schema served",
    )
    stack.options = dataclasses.replace(stack.options, source=None)
    stack.ensure_system()
    assert can_save_progress(cluster)
    await asyncio.to_thread(stack.start_operator, "operator-1")
    await asyncio.to_thread(stack.start_gateway)
    # The agents move to their own namespace: helm deletes the release's DaemonSet and
    # ServiceAccount (the new operator knows only the new one), so node 1's old agent
    # stops with its backlog undelivered, and each new agent (the new ServiceAccount)
    # finds its predecessor's reports on the host and delivers them.
    assert stack.agent_namespace != SYSTEM_NAMESPACE
    old_state[NODES[1]] = stop_agent(stack, NODES[1])
    assert set(pending_reports(stack, NODES[1])) >= set(pending[NODES[1]])
    for node in NODES:
        stack.start_agent(node)
    await asyncio.to_thread(
        eventually,
        lambda: not any(set(pending_reports(stack, n)) & set(pending[n]) for n in NODES),
        60,
        0.2,
        "the release's reports delivered by the new agents",
    )

    # 4. Traffic through the upgraded stack, into the same records, then settle.
    await both(http, stack, namespace, 4, 6)
    await stack.settle()

    # Nothing lost, nothing counted twice: the records equal what the agents measured,
    # before and after the upgrade, exactly.
    assert_records_equal_truth(stack, namespace)
    for node in NODES:
        now = state(stack, node)
        assert now["agentId"] == agent_ids[node], "the new agent continued the old one's state"
        assert now["nextSequence"] > old_state[node]["nextSequence"]
        assert not list((stack.agent_state_dir(node) / "rejected").iterdir())

    # The release's records are continued, not replaced: same objects, totals only grew,
    # one record per deployment, window and product; the usage in flight that the release
    # had not applied landed in the record it wrote for that window, where there was one.
    after = records(cluster, namespace)
    for name, before in at_upgrade.items():
        assert after[name]["metadata"]["uid"] == before["metadata"]["uid"], name
        assert after[name]["status"]["activeUs"] >= before["status"]["activeUs"], name
    record_keys = [
        (r["spec"]["inferenceDeployment"], r["spec"]["window"]["start"], r["spec"]["gpuProduct"])
        for r in after.values()
    ]
    assert len(record_keys) == len(set(record_keys))
    by_key = dict(zip(record_keys, after.values(), strict=True))
    landed: dict[str, int] = {}
    for report in pending[NODES[0]].values():
        for series in report["series"]:
            window = iso(window_start(report["intervalStartMs"], WINDOW_MS))
            key = (series["inferenceDeployment"], window, product_key(series["gpuProduct"]))
            name = by_key[key]["metadata"]["name"]
            applied = at_upgrade.get(name, {}).get("status", {}).get("lastAppliedSequence", {})
            if report["sequence"] > applied.get(keys[NODES[0]], 0):
                landed[name] = landed.get(name, 0) + series["activeUs"]
    assert landed
    for name, usage in landed.items():
        if name in at_upgrade:
            grown = after[name]["status"]["activeUs"] - at_upgrade[name]["status"]["activeUs"]
            assert grown >= usage, name
    for record in after.values():
        assert set(record["status"]["lastAppliedSequence"]) <= set(keys.values())

    # The release's progress is honoured: the same ConfigMap, the same agents, caught up.
    def progress_caught_up() -> bool:
        stored = cluster.get_json(*PROGRESS)
        applied = json.loads(stored["data"]["appliedThrough"])
        assert stored["metadata"]["uid"] == progress["metadata"]["uid"]
        assert set(applied) == set(saved)
        return all(applied[keys[node]] == state(stack, node)["nextSequence"] - 1 for node in NODES)

    await asyncio.to_thread(eventually, progress_caught_up, 20, 0.5, "stored progress")
    letters = cluster.kubectl(
        "get", "configmap", "payper-dead-letters", "-n", SYSTEM_NAMESPACE, "-o", "json", check=False
    )
    if letters.returncode == 0:
        assert not json.loads(letters.stdout).get("data"), "nothing was dead-lettered"

    # The per-GPU reconciliation copes with the release's reports (no per-GPU times): it
    # counts them apart, exactly once, those the release had already written into records
    # included; every GPU row adds up. Only what the release applied and saved progress
    # for is in records and in no reconciliation object.
    result = reconcile(stack)
    total = result["recordsActiveUs"]
    assert result["inRecordsUs"] == total - sum(through_progress.values())
    nodes = result["nodes"]
    assert set(nodes) == set(NODES)
    for node, summary in nodes.items():
        released_reported = reported_us(old_state[node])
        assert summary["unreconciledInRecordsUs"] == released_reported - through_progress[node]
        assert summary["unreconciledInRecordsUs"] > 0, node
        assert summary["gpus"], node
        assert all(row["addsUp"] for row in summary["gpus"]), node
    released_reported = sum(reported_us(old_state[node]) for node in NODES)
    attributed = sum(n["attributedInRecordsUs"] for n in nodes.values())
    assert attributed == total - released_reported > 0
