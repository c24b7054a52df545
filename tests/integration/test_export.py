"""Usage leaves the cluster exactly once per sink: a CloudEvents sink on loopback, parsed
with the CloudEvents SDK, through a sink outage, a sink that answers too late, an
operator SIGKILL, and a tenant who edits the export state on its records.

Short windows (20 s, grace 5 s) so that records become Final, then Exported, within a
test."""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from payper.billing import intake, seal
from payper.billing.outbox import FINALIZER, annotation, identity
from payper.billing.records import MOVED_FROM_LABEL, STATE_LABEL
from payper.clock import iso, now_ms, parse_iso
from payper_dev.testing.billing import (
    ended_records,
    exported,
    kill_mid_export,
    model,
    put_record,
    record_spec,
    records,
    traffic,
    wait_exported,
)
from payper_dev.testing.cloudevents_receiver import CloudEventsReceiver, Received
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import SYSTEM_NAMESPACE, Stack, StackOptions, running, scraped_sum
from payper_dev.testing.usage import agent_token, post_until_acked, post_usage, report

SINK = "meter"
SOURCE = "//payper/test"


@pytest.fixture(scope="module")
def receiver() -> Iterator[CloudEventsReceiver]:
    started = CloudEventsReceiver().start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def export_stack(
    crds_installed: ClusterHandle,
    tmp_path_factory: pytest.TempPathFactory,
    receiver: CloudEventsReceiver,
) -> Iterator[Stack]:
    billing = {
        "flushIntervalSeconds": 1,
        "windowSeconds": 20,
        "graceSeconds": 5,
        "export": {
            "sinks": [
                {
                    "name": SINK,
                    "type": "cloudevents",
                    "url": receiver.url,
                    "timeoutSeconds": 1,
                    "batchSize": 20,
                }
            ],
            "source": SOURCE,
            "minBackoffSeconds": 0.2,
            "maxBackoffSeconds": 1,
        },
    }
    options = StackOptions(agents=True, operator_extra={"billing": billing})
    with running(crds_installed, tmp_path_factory.mktemp("export"), options) as started:
        yield started


def unique(events: list[Received]) -> dict[str, Received]:
    """Events by id; a resend must repeat its event exactly."""
    by_id: dict[str, Received] = {}
    for event in events:
        assert by_id.setdefault(event.id, event) == event, f"{event.id} with two contents"
    return by_id


def exported_sums(events: dict[str, Received]) -> dict[str, tuple[int, int, Decimal]]:
    """Per record identity (the UID that starts every id), what the sink was told."""
    sums: dict[str, tuple[int, int, Decimal]] = defaultdict(lambda: (0, 0, Decimal(0)))
    for event in events.values():
        uid = event.id[:36]
        active, billed, amount = sums[uid]
        sums[uid] = (
            active + event.data["activeMs"],
            billed + event.data["billedMs"],
            amount + Decimal(event.data["amount"]),
        )
    return sums


def assert_sink_holds_records(
    records_: list[dict[str, Any]], events: dict[str, Received], namespace: str
) -> None:
    sums = exported_sums(events)
    for record in records_:
        status = record.get("status") or {}
        uid = identity(record["metadata"])
        expected = (
            int(status.get("activeMs", 0)),
            int(status.get("billedMs", 0)),
            Decimal(status.get("amount", "0")),
        )
        assert sums.get(uid, (0, 0, Decimal(0))) == expected, record["metadata"]["name"]
    mine = [e for e in events.values() if e.subject == namespace]
    assert mine and all(
        e.source == SOURCE and e.data["account"] == namespace and e.data["currency"] == "USD"
        for e in mine
    )


async def test_usage_reaches_the_sink_once_through_an_outage_a_slow_sink_and_a_kill(
    export_stack: Stack,
    receiver: CloudEventsReceiver,
    namespace: str,
    http: aiohttp.ClientSession,
) -> None:
    stack = export_stack
    stack.deploy(namespace, model("metered"))
    rng = random.Random(11)
    statuses = await traffic(http, stack, namespace, "metered", rng, 6)
    # Down for several flush intervals: nothing is lost, nothing waits on it but itself.
    receiver.mode = "down"
    statuses += await traffic(http, stack, namespace, "metered", rng, 5)
    failed = {"sink": SINK, "result": "failed"}
    assert scraped_sum(stack.metrics_url, "payper_export_events_total", failed) > 0
    # Slow: it keeps what it is sent but answers after the operator gave up (1 s): the
    # operator resends those deltas, under the same ids.
    receiver.slow_s, receiver.mode = 2.0, "slow"
    statuses += await traffic(http, stack, namespace, "metered", rng, 5)
    # Killed mid-export: sent, and the acknowledgements never written.
    assert set(statuses) == {200}

    def sink_back() -> None:
        receiver.mode = "up"

    await kill_mid_export(http, stack, namespace, "metered", rng, sink_back)

    done = await wait_exported(stack, namespace, now_ms())
    events = receiver.events()
    by_id = unique(events)
    assert len(events) > len(by_id), "the slow sink and the kill made the operator resend"
    assert_sink_holds_records(done, by_id, namespace)
    assert sum(int(r["status"]["activeMs"]) for r in done) > 0


async def test_a_record_not_yet_exported_outlives_its_namespace(
    export_stack: Stack,
    receiver: CloudEventsReceiver,
    cluster: ClusterHandle,
    http: aiohttp.ClientSession,
) -> None:
    """The sink is down when the tenant deletes its namespace: its records, Open and
    Final, move into the operator's namespace (the finalizer holds them meanwhile), the
    namespace goes, and the sink gets every millisecond once it is back."""
    stack = export_stack
    doomed = cluster.namespace("export-doomed")
    stack.deploy(doomed, model("gone"))
    receiver.mode = "down"
    try:
        statuses = await traffic(http, stack, doomed, "gone", random.Random(15), 4)
        assert set(statuses) == {200}
        await stack.settle()

        def final_unexported() -> bool:
            return any(
                (r.get("status") or {}).get("state") == "Final"
                and int(r["status"].get("activeMs", 0)) > 0
                and not exported(r)
                for r in records(cluster, doomed)
            )

        await asyncio.to_thread(eventually, final_unexported, 90, 0.5, "a Final record owed")
        # Those not yet Exported (one of a window with no usage may be, already) are held
        # by the finalizer.
        held = {r["metadata"]["name"]: r for r in records(cluster, doomed) if not exported(r)}
        assert all(FINALIZER in r["metadata"].get("finalizers", []) for r in held.values())
        cluster.kubectl("delete", "namespace", doomed, "--wait=false")

        def gone() -> bool:
            found = cluster.kubectl("get", "namespace", doomed, check=False)
            return found.returncode != 0

        await asyncio.to_thread(eventually, gone, 90, 0.5, f"namespace {doomed} deleted")
    finally:
        receiver.mode = "up"
    moved = {
        r["metadata"]["name"].removeprefix(f"{doomed}."): r
        for r in records(cluster, SYSTEM_NAMESPACE)
        if (r["metadata"].get("labels") or {}).get(MOVED_FROM_LABEL) == doomed
    }
    assert set(held) <= set(moved)
    by_ms = max(parse_iso(r["spec"]["window"]["end"]) for r in held.values())

    def copies_exported() -> bool:
        copies = [
            r
            for r in records(cluster, SYSTEM_NAMESPACE)
            if (r["metadata"].get("labels") or {}).get(MOVED_FROM_LABEL) == doomed
            and parse_iso(r["spec"]["window"]["end"]) <= by_ms
        ]
        return bool(copies) and all(exported(r) for r in copies)

    await asyncio.to_thread(eventually, copies_exported, 90, 0.5, "the copies exported")
    copies = {
        name: cluster.get_json("brec", moved[name]["metadata"]["name"], "-n", SYSTEM_NAMESPACE)
        for name in held
    }
    for name, copy in copies.items():  # its events keep the original's ids
        assert identity(copy["metadata"]) == held[name]["metadata"]["uid"]
    assert_sink_holds_records(list(copies.values()), unique(receiver.events()), doomed)


async def test_exported_records_past_their_retention_go_and_unexported_ones_stay(
    export_stack: Stack, receiver: CloudEventsReceiver, namespace: str
) -> None:
    """With sinks and no recordRetentionDays, Exported records go 3 days after their
    window; a Final record not yet exported stays however old (here: one held for a
    forged export state), and so does a young one."""
    stack = export_stack
    secret = stack.cluster.get_json("secret", seal.SECRET_NAME, "-n", SYSTEM_NAMESPACE)
    key = base64.b64decode(secret["data"][seal.SECRET_KEY])
    hour = 3_600_000
    now = now_ms() // hour * hour
    starts = {"old": now - 97 * hour, "young": now - 25 * hour, "old-held": now - 97 * hour}
    for name, start in starts.items():
        spec = record_spec(namespace, "llm", iso(start), iso(start + hour))
        annotations = {seal.ANNOTATION: seal.seal(key, namespace, name, spec)}
        if name == "old-held":
            annotations[annotation(SINK)] = json.dumps({"n": 1, "sent": {}, "mac": "0" * 64})
        status = {"state": "Final", "activeMs": 2500, "billedMs": 3000, "amount": "0.003600"}
        metadata = {"labels": {STATE_LABEL: "Final"}, "annotations": annotations}
        put_record(stack.cluster, namespace, name, spec, status, metadata)
    made = {r["metadata"]["name"]: r for r in records(stack.cluster, namespace)}
    assert stack.operator is not None
    stack.operator.stop()
    await asyncio.to_thread(stack.start_operator)  # it lists what is not Exported at start

    def old_gone() -> bool:
        return "old" not in {r["metadata"]["name"] for r in records(stack.cluster, namespace)}

    await asyncio.to_thread(eventually, old_gone, 60, 0.5, "the old Exported record deleted")
    young = stack.cluster.get_json("brec", "young", "-n", namespace)
    await asyncio.to_thread(
        eventually,
        lambda: exported(stack.cluster.get_json("brec", "young", "-n", namespace)),
        60,
        0.5,
        "the young record Exported",
    )
    held = stack.cluster.get_json("brec", "old-held", "-n", namespace)
    assert not exported(held)
    mine = {"namespace": namespace}
    assert scraped_sum(stack.metrics_url, "payper_export_held_records", mine) == 1
    assert_sink_holds_records([made["old"], young], unique(receiver.events()), namespace)


def forge(stack: Stack, namespace: str, name: str, edit: Any) -> None:
    """As a tenant allowed to edit its namespace's records (a careless platform admin
    granted ``payper.dev/*``) would: rewrite the sink's export annotation."""
    record = stack.cluster.get_json("brec", name, "-n", namespace)
    text = (record["metadata"].get("annotations") or {}).get(annotation(SINK))
    forged = edit(json.loads(text)) if text else {"n": 1, "sent": {}, "mac": "0" * 64}
    stack.cluster.kubectl(
        "annotate",
        "--overwrite",
        "brec",
        name,
        "-n",
        namespace,
        f"{annotation(SINK)}={json.dumps(forged)}",
    )


def sealed_record(stack: Stack, namespace: str, state: str = "Open") -> str:
    """A record with usage whose export state the operator has written, Open (or, with
    ``state`` "Final", any not yet Exported)."""
    found: list[str] = []

    def sealed() -> bool:
        found[:] = [
            r["metadata"]["name"]
            for r in records(stack.cluster, namespace)
            if (r["metadata"].get("annotations") or {}).get(annotation(SINK))
            and (r.get("status") or {}).get("state") in {"Open", state}
            and not exported(r)
            and int(r["status"].get("activeMs", 0)) > 0
        ]
        return bool(found)

    eventually(sealed, 60, 0.5, "a sealed open record")
    return found[0]


def all_sent(wire: dict[str, Any]) -> dict[str, Any]:
    """A forged state: far more than was ever used is "already sent", nothing pending."""
    return {"n": wire["n"] + 50, "sent": {"own": [10**9, 10**9, "1000000"]}, "mac": wire["mac"]}


async def test_a_tenant_who_marks_its_usage_sent_is_exported_all_the_same(
    export_stack: Stack,
    receiver: CloudEventsReceiver,
    namespace: str,
    http: aiohttp.ClientSession,
) -> None:
    stack = export_stack
    stack.deploy(namespace, model("forger"))
    rng = random.Random(12)
    statuses = await traffic(http, stack, namespace, "forger", rng, 4)
    name = await asyncio.to_thread(sealed_record, stack, namespace)
    # "Everything sent", keeping the operator's MAC, while the operator runs.
    forge(stack, namespace, name, all_sent)
    statuses += await traffic(http, stack, namespace, "forger", rng, 4)
    assert set(statuses) == {200}
    await stack.settle()
    done = await wait_exported(stack, namespace, now_ms())
    assert name in {r["metadata"]["name"] for r in done}
    assert_sink_holds_records(done, unique(receiver.events()), namespace)


async def test_a_record_forged_while_no_operator_ran_is_held_not_exported_or_deleted(
    export_stack: Stack,
    receiver: CloudEventsReceiver,
    namespace: str,
    http: aiohttp.ClientSession,
) -> None:
    """With no operator to remember the truth, a forged export state cannot be told from
    a real one's replay: the record is held (metric), never exported on a guess."""
    stack = export_stack
    stack.deploy(namespace, model("held"))
    rng = random.Random(13)
    statuses = await traffic(http, stack, namespace, "held", rng, 4)
    await asyncio.to_thread(sealed_record, stack, namespace)
    assert stack.operator is not None
    stack.operator.stop(sig=signal.SIGKILL)  # at once: a graceful stop still flushes
    try:
        # Chosen once no operator runs: not one Exported meanwhile.
        name = await asyncio.to_thread(sealed_record, stack, namespace, "Final")
        forge(stack, namespace, name, all_sent)
    finally:
        await asyncio.to_thread(stack.start_operator)
    statuses += await traffic(http, stack, namespace, "held", rng, 2)
    assert set(statuses) == {200}
    mine = {"namespace": namespace}
    held = lambda: scraped_sum(stack.metrics_url, "payper_export_held_records", mine) == 1  # noqa: E731
    await asyncio.to_thread(eventually, held, 30, 0.3, "the record held")
    await stack.settle()

    # It still bills (the ledger writes it) and becomes Final; the namespace's other
    # records are Exported meanwhile; it is not, and it is kept.
    def final() -> bool:
        record = stack.cluster.get_json("brec", name, "-n", namespace)
        return (record.get("status") or {}).get("state") == "Final"

    await asyncio.to_thread(eventually, final, 60, 0.5, "the held record Final")
    ended_by = now_ms()

    def others_exported() -> bool:
        ended = [
            r for r in ended_records(stack, namespace, ended_by) if r["metadata"]["name"] != name
        ]
        return all(exported(r) for r in ended)

    await asyncio.to_thread(eventually, others_exported, 60, 0.5, "the other records exported")
    record = stack.cluster.get_json("brec", name, "-n", namespace)
    assert not exported(record)
    assert int(record["status"]["activeMs"]) > 0
    assert scraped_sum(stack.metrics_url, "payper_export_held_records", mine) == 1


def focus_validator() -> Path:
    found = os.environ.get("PAYPER_FOCUS_VALIDATOR")
    assert found and Path(found).exists(), (
        "the FOCUS tests need focus-validator: `make focus-validator`, which `make test` "
        "runs (it sets PAYPER_FOCUS_VALIDATOR)"
    )
    return Path(found)


def validate_focus(path: Path, repo: Path) -> str:
    """focus-validator's verdict on a file. It reads its currency list relative to the
    working directory (its package's parent) and exits 0 either way: its text says."""
    validator = focus_validator()
    python = validator.parent / "python"
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import focus_validator, os; print(os.path.dirname(os.path.dirname(focus_validator.__file__)))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()
    result = subprocess.run(
        [
            str(validator),
            "--data-file",
            str(path),
            "--validate-version",
            "1.0",
            "--override-file",
            str(repo / "tests" / "focus-validator-overrides.yaml"),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=where,
        timeout=300,
    )
    return result.stdout + result.stderr


def late_record(cluster: ClusterHandle, namespace: str) -> None:
    """A Final record holding a correction of the window before it (by hand)."""
    spec = record_spec(namespace, "chat", "2026-11-20T11:00:00Z", "2026-11-20T12:00:00Z")
    status = {
        "state": "Final",
        "activeMs": 12500,
        "activeUs": 12_500_000,
        "billedMs": 15000,
        "roundedMs": {"1ms": 12500, "1s": 15000, "1m": 120000},
        "amount": "0.018000",
        "adjustments": [
            {
                "originalWindowStart": "2026-11-20T10:00:00Z",
                "reason": "late usage",
                "activeMs": 2500,
                "activeUs": 2_500_000,
                "billedMs": 3000,
                "roundedMs": {"1ms": 2500, "1s": 3000, "1m": 60000},
                "amount": "0.003600",
            }
        ],
    }
    put_record(cluster, namespace, "chat-11", spec, status)


def test_a_focus_file_passes_the_focus_validator_and_costs_what_the_bill_says(
    export_stack: Stack, namespace: str, repo: Path, tmp_path: Path
) -> None:
    cluster = export_stack.cluster
    late_record(cluster, namespace)
    other = cluster.namespace("focus-other")  # a second account, whatever ran before
    late_record(cluster, other)
    env = cluster.env()

    def payper(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "payper.cli", *args],
            capture_output=True,
            text=True,
            check=check,
            env=env,
            timeout=120,
        )

    # Every record in the cluster: this namespace's, and what the export tests left, of
    # windows that started a minute ago or more: Final by now (20 s windows, 5 s grace),
    # so the file and the bill, read one after the other, see the same records.
    until = iso(now_ms() - 60_000)
    out = tmp_path / "focus.csv"
    payper("export", "focus", "-A", "--from", "2026-01-01", "--to", until, "--out", str(out))
    verdict = validate_focus(out, repo)
    assert "Validation succeeded." in verdict, verdict
    rows = list(csv.DictReader(out.open()))
    bill = json.loads(
        payper("bill", "-A", "--from", "2026-01-01", "--to", until, "-o", "json").stdout
    )
    billed: dict[str, Decimal] = defaultdict(Decimal)
    for row in rows:
        billed[row["BillingCurrency"]] += Decimal(row["BilledCost"])
    assert billed == {c: Decimal(t["amount"]) for c, t in bill["totals"].items()}
    assert len({r["BillingAccountId"] for r in rows}) > 1
    # The correction is its own row, in the window it corrects.
    mine = [r for r in rows if r["BillingAccountId"] == namespace]
    assert [(r["ChargeClass"], r["ChargePeriodStart"], r["BilledCost"]) for r in mine] == [
        ("Correction", "2026-11-20T10:00:00Z", "0.003600"),
        ("", "2026-11-20T11:00:00Z", "0.014400"),
    ]
    # Bad input: a clear error, and no file half written.
    bad = payper("export", "focus", "--from", "yesterday", check=False)
    assert (bad.returncode, "--from/--to must be ISO" in bad.stderr) == (2, True)
    missing = tmp_path / "no-such-dir" / "focus.csv"
    failed = payper("export", "focus", "-A", "--out", str(missing), check=False)
    assert (failed.returncode, "cannot write" in failed.stderr) == (1, True)
    assert not missing.parent.exists()
    cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


async def test_a_sink_that_is_down_shows_as_owed_records_and_lag_then_catches_up(
    export_stack: Stack,
    receiver: CloudEventsReceiver,
    namespace: str,
    http: aiohttp.ClientSession,
) -> None:
    stack = export_stack
    stack.deploy(namespace, model("owed"))
    receiver.mode = "down"
    try:
        statuses = await traffic(http, stack, namespace, "owed", random.Random(14), 3)
        assert set(statuses) == {200}
        backlog = {"sink": SINK}

        def behind() -> bool:
            return (
                scraped_sum(stack.metrics_url, "payper_export_backlog_records", backlog) >= 1
                and scraped_sum(stack.metrics_url, "payper_export_lag_seconds", backlog) >= 1
            )

        await asyncio.to_thread(eventually, behind, 60, 0.3, "a backlog and a lag")
        shown = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "payper.cli", "export", "status", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
            env=stack.cluster.env(),
            timeout=120,
        )
        (sink,) = json.loads(shown.stdout)["sinks"]
        assert sink["sink"] == SINK and sink["owedRecords"] >= 1
        assert parse_iso(sink["oldestOwedWindowStart"]) <= now_ms()
    finally:
        receiver.mode = "up"
    await stack.settle()
    await wait_exported(stack, namespace, now_ms())


def idle_pod(stack: Stack, namespace: str, name: str, node: str) -> dict[str, Any]:
    """A tenant's own pod bound to ``node`` (no GPU limit, no stand-in): its usage, as an
    agent reports it, is billed to the namespace's records."""
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "server", "image": "payper/model-server:test"}],
            "tolerations": [{"operator": "Exists"}],
        },
    }
    stack.cluster.apply_items([body])
    pod: dict[str, Any] = stack.cluster.get_json("pod", name, "-n", namespace)
    return pod


def poison_reports(agent: str, pod: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """The three ways one agent token stopped every agent's billing (each, sequence 1 of
    its own agent id): an amount past the record's digits, a window in year 33658, more
    agent ids in one batch than a node runs (the last one is refused)."""
    rounded = report(f"{agent}-r", 1, pod, 1_000)
    rounded["series"][0]["roundedMs"]["1s"] = 10**24
    future = report(f"{agent}-t", 1, pod, 1_000) | {
        "intervalStartMs": 10**15,
        "intervalEndMs": 10**15 + 1,
    }
    ids = intake.MAX_AGENTS_PER_NODE + 1
    crowd = [report(f"{agent}-c{i}", 1, pod, 1_000) for i in range(ids)]
    return [
        (f"{agent}-r", rounded, "roundedMs"),
        (f"{agent}-t", future, "intervalStartMs"),
        *[(f"{agent}-c{i}", r, "agent ids") for i, r in enumerate(crowd)],
    ]


async def test_poison_reports_from_one_node_are_refused_alone_and_billing_goes_on(
    export_stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """Node X's token sends each report that used to stop billing for everyone; node Y's
    agent reports beside it. Y is acknowledged and its records become Final and Exported;
    each poison report is refused with its reason (answer, dead letter, metric), and X's
    next honest report applies."""
    stack = export_stack
    node_x, node_y = "gpu-node-1", "gpu-node-0"
    tenant_y = stack.cluster.namespace("honest")
    try:
        pod_x = idle_pod(stack, namespace, "worker", node_x)
        pod_y = idle_pod(stack, tenant_y, "worker", node_y)
        token_x, token_y = agent_token(stack, node_x), agent_token(stack, node_y)
        honest_x, honest_y = f"honest-x-{namespace[-6:]}", f"honest-y-{namespace[-6:]}"
        for token, agent, pod in ((token_x, honest_x, pod_x), (token_y, honest_y, pod_y)):
            body = {"reports": [report(agent, 1, pod, 100_000)]}
            await post_until_acked(http, stack, token, body, agent, 1)  # its pod is seen
        refused_metric = ("payper_usage_reports_refused_total", {"node": node_x})
        before = scraped_sum(stack.metrics_url, *refused_metric)
        rounded, future, *crowd = poison_reports(f"x-{namespace[-6:]}", pod_x)
        batches = [[rounded[1]], [future[1]], [r for _, r, _ in crowd]]
        answers = [await post_usage(http, stack, token_x, {"reports": b}) for b in batches]
        await post_until_acked(
            http, stack, token_y, {"reports": [report(honest_y, 2, pod_y, 300_000)]}, honest_y, 2
        )

        for status, answer in answers:
            assert status == 200, answer
            assert set(answer["acked"].values()) == {1}, f"every agent moved on: {answer}"
        (_, first), (_, second), (_, third) = answers
        crowd_refused = third["refused"]
        for (agent, _, why), [refused] in (
            (rounded, first["refused"]),
            (future, second["refused"]),
            (crowd[-1], crowd_refused[-1:]),
        ):
            assert (refused["agentId"], refused["sequence"]) == (agent, 1), refused
            assert why in refused["reason"], refused
        # The node's own agent may have reported in the same flush: one id fewer left.
        assert 1 <= len(crowd_refused) <= 2, crowd_refused
        refused_count = 2 + len(crowd_refused)
        assert scraped_sum(stack.metrics_url, *refused_metric) - before == refused_count
        letters = stack.cluster.get_json(
            "configmap", "payper-dead-letters", "-n", SYSTEM_NAMESPACE
        )["data"]
        filed = {
            entry["agentId"]: entry
            for entry in map(json.loads, letters.values())
            if entry.get("node") == node_x
        }
        for agent, _, why in (rounded, future, crowd[-1]):
            assert why in filed[agent]["reason"] and filed[agent]["content"], filed.get(agent)
            assert filed[agent]["sequence"] == 1

        # X's next honest report applies.
        await post_until_acked(
            http, stack, token_x, {"reports": [report(honest_x, 2, pod_x, 23_000)]}, honest_x, 2
        )
        # Every record of the two, the current window's too (its end is within 20 s).
        posted = now_ms() + 20_000
        done_y = await wait_exported(stack, tenant_y, posted)
        assert sum(int(r["status"]["activeUs"]) for r in done_y) == 400_000
        done_x = await wait_exported(stack, namespace, posted)
        crowd_kept = 1_000 * (len(crowd) - len(crowd_refused))
        assert sum(int(r["status"]["activeUs"]) for r in done_x) == 123_000 + crowd_kept
    finally:
        stack.cluster.kubectl("delete", "namespace", tenant_y, "--wait=false", check=False)


async def test_a_server_busy_across_a_window_boundary_is_billed_in_both_windows(
    export_stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    """One 30 s computation, never idle, across 20 s windows: each window's record bills
    its own time as it computed (within a unit), not all of it in the window where the
    load stops."""
    stack = export_stack
    stack.deploy(namespace, model("steady"))
    async with http.post(
        f"{stack.gateway_url}/{namespace}/steady/v1/infer", json={"ms": 30_000}
    ) as response:
        assert response.status == 200, await response.text()
    await stack.settle()
    # Every window the computation touched, the last one too (it ends within a window).
    done = await wait_exported(stack, namespace, now_ms() + 20_000)
    busy = [r for r in done if int(r["status"].get("activeMs", 0)) > 0]
    assert len(busy) >= 2, [r["status"] for r in done]
    for record in busy:
        status = record["status"]
        active, billed = int(status["activeMs"]), int(status["billedMs"])
        assert active - 1000 <= billed <= active + 2000, status  # 1 s plan: within a unit
    assert 29_000 <= sum(int(r["status"]["activeMs"]) for r in busy) <= 31_500
