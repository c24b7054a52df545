"""The ledger's pure core (payper.billing.flush), table by table, with no API server.

Which reports apply, how their usage groups into records, what each record gains, which
records become Final and how far each agent's progress may advance: every rule here is a
row, as the autoscaler's are.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payper.api.billing_record import BillingRecordSpec, BillingRecordStatus, RoundedMs, SplitUs
from payper.api.usage import SeriesUsage, UsageReport
from payper.billing import flush
from payper.billing.events import BillingEvents
from payper.billing.flush import BillingWindows, Observations
from payper.billing.pricing import product_key
from payper.billing.records import RecordChange, RecordKey, UsageDelta, apply
from payper.observed import UNMANAGED, Key, PodView
from payper_dev.testing.billing import record_spec

HOUR = 3_600_000
WINDOWS = BillingWindows(window_ms=HOUR, grace_ms=300_000)
T0 = 1_764_000_000_000 // HOUR * HOUR
"""The start of a window."""
H100 = "NVIDIA-H100-80GB-HBM3"
SPEC = BillingRecordSpec.model_validate(
    record_spec("team-a", "llm", "2025-11-24T16:00:00Z", "2025-11-24T17:00:00Z")
)


def key_of(agent: str, node: str = "gpu-node-0") -> str:
    """An agent's progress key: its node (verified) and its id (its own word)."""
    return f"{node}/{agent}"


def report(
    agent: str,
    sequence: int,
    start_ms: int = T0,
    deployment: str | None = "llm",
    active_us: int = 1_000,
    product: str = "NVIDIA H100 80GB HBM3",
) -> UsageReport:
    series = SeriesUsage(
        namespace="team-a",
        pod="llm-0",
        pod_uid="u0",
        container="server",
        gpu="GPU-0",
        gpu_product=product,
        inference_deployment=deployment,
        active_us=active_us,
        rounded_ms=RoundedMs(per_millisecond=1, per_second=1000, per_minute=60_000),
        bursts=1,
    )
    return UsageReport(
        agent_id=agent,
        sequence=sequence,
        node="gpu-node-0",
        interval_start_ms=start_ms,
        interval_end_ms=start_ms + 10_000,
        series=[series],
    )


def seen(
    events: BillingEvents | None = None,
    pods: dict[Key, dict[str, PodView]] | None = None,
    nodes: dict[str, str] | None = None,
    owners: dict[str, Key] | None = None,
    pod_nodes: dict[str, str | None] | None = None,
    waiting_since: dict[str, int] | None = None,
) -> Observations:
    """What the operator saw. ``report``'s pod u0 is known on gpu-node-0 (the reporting
    node), as is every pod in ``pods`` on its own node."""
    known: dict[str, str | None] = {"u0": "gpu-node-0"}
    known |= {pod.uid: pod.node for grouped in (pods or {}).values() for pod in grouped.values()}
    return Observations(
        events or BillingEvents(),
        pods or {},
        {},
        nodes or {},
        {},
        owners or {},
        known | (pod_nodes or {}),
        waiting_since or {},
    )


@dataclass
class SelectRow:
    name: str
    reports: list[tuple[str, int]]
    applied_through: dict[str, int]
    accepted: list[tuple[str, int]]
    duplicates: int = 0
    out_of_order: int = 0


SELECT_ROWS = [
    SelectRow("first reports", [("a", 1), ("a", 2)], {}, [("a", 1), ("a", 2)]),
    SelectRow("a resend is a duplicate", [("a", 3)], {"a": 3}, [], duplicates=1),
    SelectRow("the same report twice in a batch", [("a", 1), ("a", 1)], {}, [("a", 1)]),
    SelectRow("a gap waits", [("a", 3), ("a", 4)], {"a": 1}, [], out_of_order=2),
    SelectRow("in order up to the gap", [("a", 2), ("a", 4)], {"a": 1}, [("a", 2)], 0, 1),
    SelectRow(
        "agents are independent",
        [("a", 5), ("b", 1), ("b", 3)],
        {"a": 4},
        [("a", 5), ("b", 1)],
        out_of_order=1,
    ),
]


@pytest.mark.parametrize("row", SELECT_ROWS, ids=[r.name for r in SELECT_ROWS])
def test_select(row: SelectRow) -> None:
    selection = flush.select([report(a, s) for a, s in row.reports], row.applied_through)
    assert [(r.agent_id, r.sequence) for r in selection.accepted] == row.accepted
    assert (selection.duplicates, selection.out_of_order) == (row.duplicates, row.out_of_order)


@dataclass
class GroupRow:
    name: str
    report_start_ms: int
    now_ms: int
    record_window_ms: int
    """Start of the record the usage lands in."""
    original_window_ms: int | None = None
    claimed: str | None = "llm"
    """The deployment the agent's series names (the pod's label, which the tenant sets)."""
    owner: Key | None = None
    """The operator's attribution of the pod (owner chain); None: it never saw the pod."""
    billed_to: str = "llm"


GROUP_ROWS = [
    GroupRow("its own window", T0 + 600_000, T0 + 700_000, T0),
    GroupRow("late but within grace", T0 + 3_590_000, T0 + HOUR + 299_999, T0),
    GroupRow(
        "after grace: an adjustment in the current window",
        T0 + 3_590_000,
        T0 + HOUR + 300_000,
        T0 + HOUR,
        original_window_ms=T0,
    ),
    GroupRow(
        "the owner chain, not the label, names the deployment",
        T0,
        T0 + 1_000,
        T0,
        claimed="cheap",
        owner=("team-a", "llm"),
    ),
    GroupRow(
        "a pod of no deployment (unlabelled, relabelled): its namespace's records",
        T0,
        T0 + 1_000,
        T0,
        claimed="llm",
        owner=("team-a", UNMANAGED),
        billed_to=UNMANAGED,
    ),
    GroupRow(
        "a pod the operator never saw, unlabelled: still billed, to its namespace",
        T0,
        T0 + 1_000,
        T0,
        claimed=None,
        billed_to=UNMANAGED,
    ),
    GroupRow("a pod the operator never saw: the agent's word", T0, T0 + 1_000, T0),
]


@pytest.mark.parametrize("row", GROUP_ROWS, ids=[r.name for r in GROUP_ROWS])
def test_usage_groups_by_deployment_window_and_product(row: GroupRow) -> None:
    owners = {"u0": row.owner} if row.owner is not None else {}
    planned = flush.plan(
        [report("a", 1, row.report_start_ms, row.claimed)],
        {},
        seen(owners=owners),
        WINDOWS,
        row.now_ms,
    )
    key = RecordKey("team-a", row.billed_to, row.record_window_ms, H100)
    assert list(planned.changes) == [key]
    (delta,) = planned.changes[key].usage
    assert (delta.agent_id, delta.sequence, delta.active_us) == (key_of("a"), 1, 1_000)
    assert delta.original_window_ms == row.original_window_ms
    assert planned.touched[(key_of("a"), 1)] == {key}


def test_one_report_touching_two_products_touches_two_records() -> None:
    h100, a100 = report("a", 1), report("a", 1, product="NVIDIA A100")
    both = h100.model_copy(update={"series": [*h100.series, *a100.series]})
    planned = flush.plan([both], {}, seen(), WINDOWS, T0 + 1_000)
    assert {k.product for k in planned.touched[(key_of("a"), 1)]} == {H100, "NVIDIA-A100"}


def test_a_shared_mig_instance_is_a_record_of_its_profile_that_says_how_it_was_split() -> None:
    shared = report("a", 1, product="NVIDIA H100 80GB HBM3 MIG 1g.10gb", active_us=300_000)
    series = shared.series[0].model_copy(update={"split_us": SplitUs(equal=300_000)})
    shared = shared.model_copy(update={"series": [series]})
    planned = flush.plan([shared, report("a", 2)], {}, seen(), WINDOWS, T0 + 1_000)
    mig = RecordKey("team-a", "llm", T0, "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb")
    whole = RecordKey("team-a", "llm", T0, H100)
    assert set(planned.changes) == {mig, whole}
    status, _ = apply(BillingRecordStatus(), SPEC, planned.changes[mig], T0 + 1_000)
    assert (status.active_us, status.split_us) == (300_000, SplitUs(equal=300_000))
    status, _ = apply(BillingRecordStatus(), SPEC, planned.changes[whole], T0 + 1_000)
    assert status.split_us is None


def _pod(
    uid: str, scheduled_ms: int | None, gpus: int = 2, node: str | None = "gpu-node-0"
) -> PodView:
    return PodView(f"llm-{uid}", uid, 0, True, None, scheduled_ms, None, node, gpus)


@dataclass
class SpanRow:
    name: str
    pods: list[PodView]
    ended: list[tuple[PodView, int]]
    now_ms: int
    spans: dict[tuple[int, str], tuple[int, int]]
    """(record window start, pod uid) -> (start, end) of the span in that record."""
    nodes: dict[str, str] = field(default_factory=lambda: {"gpu-node-0": H100})


SPAN_ROWS = [
    SpanRow(
        "a running pod: scheduled to now",
        [_pod("u1", T0 + 1_000)],
        [],
        T0 + 61_000,
        {(T0, "u1"): (T0 + 1_000, T0 + 61_000)},
    ),
    SpanRow(
        "across a window boundary: one span per open window",
        [_pod("u1", T0 + 3_000_000)],
        [],
        T0 + HOUR + 60_000,
        {
            (T0, "u1"): (T0 + 3_000_000, T0 + HOUR),
            (T0 + HOUR, "u1"): (T0 + HOUR, T0 + HOUR + 60_000),
        },
    ),
    SpanRow(
        "a closed window gets nothing",
        [_pod("u1", T0 + 3_000_000)],
        [],
        T0 + HOUR + 300_000,
        {(T0 + HOUR, "u1"): (T0 + HOUR, T0 + HOUR + 300_000)},
    ),
    SpanRow(
        "an ended pod: scheduled to its end",
        [],
        [(_pod("u2", T0 + 10_000), T0 + 20_000)],
        T0 + 30_000,
        {(T0, "u2"): (T0 + 10_000, T0 + 20_000)},
    ),
    SpanRow("never scheduled: holds no GPU", [_pod("u3", None)], [], T0 + 5_000, {}),
    SpanRow("no GPUs: nothing provisioned", [_pod("u4", T0, gpus=0)], [], T0 + 5_000, {}),
]


@pytest.mark.parametrize("row", SPAN_ROWS, ids=[r.name for r in SPAN_ROWS])
def test_provisioned_spans(row: SpanRow) -> None:
    key = ("team-a", "llm")
    observations = seen(
        BillingEvents(ended_pods=list(row.ended)),
        {key: {p.uid: p for p in row.pods}},
        row.nodes,
        owners={pod.uid: key for pod, _ in row.ended},
    )
    planned = flush.plan([], {}, observations, WINDOWS, row.now_ms)
    spans = {
        (record.window_start_ms, uid): (span.start_ms, span.end_ms)
        for record, change in planned.changes.items()
        for uid, span in change.pods.items()
    }
    assert spans == row.spans
    assert all(record.product == H100 for record in planned.changes), "from the pod's node"


def test_the_deployment_product_wins_over_the_node_label() -> None:
    key = ("team-a", "llm")
    observations = Observations(
        BillingEvents(requests={key: 3}),
        {key: {"u1": _pod("u1", T0)}},
        {key: "NVIDIA-L4"},
        {"gpu-node-0": H100},
        {},
    )
    planned = flush.plan([], {}, observations, WINDOWS, T0 + 1_000)
    assert {(k.product, c.requests) for k, c in planned.changes.items()} == {("NVIDIA-L4", 3)}


def test_counts_join_the_record_the_usage_opened_this_window() -> None:
    key = ("team-a", "llm")
    events = BillingEvents(requests={key: 4}, cold_starts={key: 1})
    planned = flush.plan([report("a", 1, T0)], {}, seen(events), WINDOWS, T0 + 20_000)
    (record,) = planned.changes
    assert record.product == H100
    change = planned.changes[record]
    assert (change.requests, change.cold_starts, len(change.usage)) == (4, 1, 1)
    assert planned.held_requests == {} and planned.held_cold_starts == {}


@dataclass
class AckRow:
    name: str
    accepted: list[tuple[str, int]]
    failed_sequences: set[tuple[str, int]]
    progress: dict[str, int]


ACK_ROWS = [
    AckRow("all written", [("a", 1), ("a", 2), ("b", 7)], set(), {"a": 2, "b": 7}),
    AckRow("a failed record stops its report", [("a", 1), ("a", 2)], {("a", 2)}, {"a": 1}),
    AckRow("and every later one of that agent", [("a", 1), ("a", 2)], {("a", 1)}, {"a": 0}),
    AckRow("other agents go on", [("a", 1), ("b", 1)], {("a", 1)}, {"a": 0, "b": 1}),
]


@pytest.mark.parametrize("row", ACK_ROWS, ids=[r.name for r in ACK_ROWS])
def test_acknowledge_only_what_every_record_holds(row: AckRow) -> None:
    start = {a: min(s for b, s in row.accepted if b == a) - 1 for a, _ in row.accepted}
    planned = flush.plan([report(a, s) for a, s in row.accepted], start, seen(), WINDOWS, T0)
    assert [(r.agent_id, r.sequence) for r in planned.selection.accepted] == row.accepted
    # One record per report, so that a failed write is a failed report.
    record = {rid: RecordKey("team-a", f"d{i}", T0, H100) for i, rid in enumerate(row.accepted)}
    planned.touched = {(key_of(a), s): {record[(a, s)]} for a, s in row.accepted}
    failed = {record[rid] for rid in row.failed_sequences}
    progress = flush.acknowledge(planned, start, failed)
    assert {a: progress.get(key_of(a), progress.get(a, 0)) for a in row.progress} == row.progress


def test_a_shared_record_that_fails_holds_back_every_report_in_it() -> None:
    planned = flush.plan([report("a", 1), report("b", 1)], {}, seen(), WINDOWS, T0 + 1_000)
    (shared,) = planned.changes
    assert flush.acknowledge(planned, {}, {shared}) == {}
    assert flush.acknowledge(planned, {}, set()) == {key_of("a"): 1, key_of("b"): 1}


def test_final_records_expire_a_whole_retention_after_their_window_ends() -> None:
    day = 86_400_000
    ends = {"old": T0 - 3 * day, "edge": T0 - 2 * day, "young": T0 - 2 * day + 1}
    assert flush.expired(ends, 2 * day, T0) == ["old", "edge"]
    assert flush.expired(ends, 3 * day + 1, T0) == []


def test_records_close_after_their_window_and_grace() -> None:
    starts = {"old": T0 - HOUR, "grace": T0, "open": T0 + HOUR}
    assert flush.closing(starts, WINDOWS, T0 + HOUR + 299_999) == ["old"]
    assert flush.closing(starts, WINDOWS, T0 + HOUR + 300_000) == ["old", "grace"]


def test_usage_claimed_for_a_pod_on_another_node_is_refused_the_rest_applied() -> None:
    key = ("team-a", "llm")
    theirs = PodView("llm-1", "u-theirs", 0, True, None, T0, None, "gpu-node-1", 1)
    ours = PodView("llm-0", "u0", 0, True, None, T0, None, "gpu-node-0", 1)
    honest = report("a", 1)  # pod u0 on gpu-node-0, the reporting node
    forged = honest.series[0].model_copy(update={"pod": "llm-1", "pod_uid": "u-theirs"})
    mixed = honest.model_copy(update={"series": [honest.series[0], forged]})
    observations = seen(pods={key: {"llm-0": ours, "llm-1": theirs}})
    planned = flush.plan([mixed], {}, observations, WINDOWS, T0 + 1_000)
    assert [(s.pod_uid, why) for _, s, why in planned.refused] == [("u-theirs", flush.FOREIGN_POD)]
    usage = [d for change in planned.changes.values() for d in change.usage]
    assert sum(d.active_us for d in usage) == 1_000, "the honest series"
    (claimed,) = planned.refused_changes[flush.FOREIGN_POD]
    assert (claimed.namespace, claimed.deployment) == ("team-a", "llm"), "the claim, filed"
    assert [d.active_us for d in planned.refused_changes[flush.FOREIGN_POD][claimed].usage] == [
        1_000
    ]
    assert flush.acknowledge(planned, {}, set()) == {key_of("a"): 1}, "the report is still done"
    assert flush.acknowledge(planned, {}, {claimed}) == {}, "but only once the claim is filed"


WAIT = flush.UNSEEN_POD_WAIT_MS


def test_a_wait_outlives_flushes_without_a_report_of_its_agent() -> None:
    """An agent retrying with backoff skips flushes: its wait is not restarted meanwhile
    (or it could wait for ever), and is forgotten only long after."""
    now = T0 + 600_000
    began = {key_of("a"): now - 20_000}
    planned = flush.plan([], {}, seen(waiting_since=began), WINDOWS, now)
    assert planned.waiting_since == began
    later = now - 20_000 + flush.FORGET_WAIT_MS
    assert flush.plan([], {}, seen(waiting_since=began), WINDOWS, later).waiting_since == {}


@dataclass
class UnseenRow:
    name: str
    pod_nodes: dict[str, str | None]
    """What the operator knows of pod u-new (besides u0 on gpu-node-0)."""
    waiting_for_ms: int | None
    """How long agent a's reports have waited already (None: not waiting)."""
    accepted: list[tuple[str, int]]
    refused: list[tuple[str, str]]
    applied_us: int
    still_waiting: list[str]


UNSEEN_ROWS = [
    UnseenRow(
        "a pod the operator has not seen holds the report and its successors",
        {},
        None,
        [("b", 1)],
        [],
        1_000,
        ["a"],
    ),
    UnseenRow(
        "a pod seen on the reporting node in the meantime",
        {"u-new": "gpu-node-0"},
        5_000,
        [("a", 1), ("a", 2), ("b", 1)],
        [],
        4_000,
        [],
    ),
    UnseenRow(
        "a known pod not bound yet waits too", {"u-new": None}, 5_000, [("b", 1)], [], 1_000, ["a"]
    ),
    UnseenRow("one millisecond before the wait ends", {}, WAIT - 1, [("b", 1)], [], 1_000, ["a"]),
    UnseenRow(
        "past the wait: refused, the rest applied",
        {},
        WAIT,
        [("a", 1), ("a", 2), ("b", 1)],
        [("u-new", flush.UNSEEN_POD)],
        3_000,
        [],
    ),
    UnseenRow(
        "past the wait and seen on another node",
        {"u-new": "gpu-node-1"},
        None,
        [("a", 1), ("a", 2), ("b", 1)],
        [("u-new", flush.FOREIGN_POD)],
        3_000,
        [],
    ),
]


@pytest.mark.parametrize("row", UNSEEN_ROWS, ids=lambda row: row.name)
def test_usage_for_a_pod_the_operator_has_not_seen_waits_then_is_refused(row: UnseenRow) -> None:
    """Agent a's report 1 claims usage for pod u-new besides its own pod u0; its report 2
    claims only u0, and agent b's report 1 only its own pod u1. The operator's watch may lag a pod bound a
    moment ago, so a waits (b does not); an agent's word alone never bills a namespace."""
    first = report("a", 1)
    claim = first.series[0].model_copy(update={"pod": "new", "pod_uid": "u-new"})
    sent = [first.model_copy(update={"series": [first.series[0], claim]}), report("a", 2)]
    theirs = report("b", 1)  # agent b's own pod u1 on its own node
    theirs.series[0].pod_uid = "u1"
    sent.append(theirs.model_copy(update={"node": "gpu-node-1"}))
    now = T0 + 600_000
    since = {} if row.waiting_for_ms is None else {key_of("a"): now - row.waiting_for_ms}
    pod_nodes = {"u0": "gpu-node-0", "u1": "gpu-node-1"} | row.pod_nodes
    planned = flush.plan(sent, {}, seen(pod_nodes=pod_nodes, waiting_since=since), WINDOWS, now)
    nodes = {"a": "gpu-node-0", "b": "gpu-node-1"}
    assert [(r.agent_id, r.sequence) for r in planned.selection.accepted] == row.accepted
    assert planned.selection.waiting == 3 - len(row.accepted)
    assert [(s.pod_uid, why) for _, s, why in planned.refused] == row.refused
    usage = [d for change in planned.changes.values() for d in change.usage]
    assert sum(d.active_us for d in usage) == row.applied_us
    assert sorted(planned.waiting_since) == [key_of(a, nodes[a]) for a in row.still_waiting]
    if row.still_waiting:  # the wait is counted from when it began, not restarted
        assert planned.waiting_since[key_of("a")] == now - (row.waiting_for_ms or 0)
    progress = flush.acknowledge(planned, {}, set())
    assert progress == {key_of(a, nodes[a]): s for a, s in row.accepted}


def test_an_agent_cannot_spoil_another_nodes_agent_by_borrowing_its_id() -> None:
    """Node 1's agent sends report 1 under node 0's agent id: it applies as node 1's own,
    and node 0's real report 1 is still new, not a duplicate."""
    borrowed = report("a", 1).model_copy(update={"node": "gpu-node-1"})
    planned = flush.plan([borrowed], {}, seen(), WINDOWS, T0 + 1_000)
    progress = flush.acknowledge(planned, {}, set())
    assert progress == {key_of("a", "gpu-node-1"): 1}
    real = flush.plan([report("a", 1)], progress, seen(), WINDOWS, T0 + 2_000)
    assert [(r.node, r.sequence) for r in real.selection.accepted] == [("gpu-node-0", 1)]
    assert real.selection.duplicates == 0


def test_progress_from_before_node_keys_still_counts_after_an_upgrade() -> None:
    """Stored as {agent id: 7} by an older operator: report 7 is a duplicate, 8 is next,
    and the record's legacy entry is honoured too."""
    old = {"a": 7}
    planned = flush.plan([report("a", 7), report("a", 8)], old, seen(), WINDOWS, T0 + 1_000)
    assert [r.sequence for r in planned.selection.accepted] == [8]
    assert planned.selection.duplicates == 1
    assert flush.acknowledge(planned, old, set())[key_of("a")] == 8
    (change,) = planned.changes.values()
    status = BillingRecordStatus(last_applied_sequence={"a": 8})  # written by the old one
    again, newly = apply(status, SPEC, change, T0 + 2_000)
    assert newly == [], "report 8 is already in this record, under the bare id"
    assert again.active_us == 0, "and is not counted twice"


@pytest.mark.parametrize(
    ("previous", "now", "due"),
    [
        (100.0, 100.0, 110.0),  # just flushed: the next one interval after this one was due
        (100.0, 103.5, 110.0),  # a flush of 3.5 s does not push the next one back
        (100.0, 112.5, 112.5),  # a flush longer than the interval: the next one at once
    ],
)
def test_flushes_keep_a_fixed_cadence(previous: float, now: float, due: float) -> None:
    assert flush.next_due(previous, now, 10.0) == due


# Usage lands series by series where the operator bills its pod; the plan carries it as one
# delta per report and record (``records.apply`` applies a report's usage in a record all or
# nothing), so what a record gains must be what applying every series on its own would give.

NOW = T0 + HOUR + 100_000
"""Window T0 is within its grace; the window before it is Final."""
PRODUCTS = [
    "NVIDIA H100 80GB HBM3",
    "NVIDIA-H100-80GB-HBM3",  # the same product key, as a node label spells it
    "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
    "NVIDIA A100",
]
SEEN_PODS: dict[str, tuple[str | None, Key | None, bool]] = {
    "u0": ("gpu-node-0", ("team-a", "llm"), True),
    "u1": ("gpu-node-0", ("team-a", UNMANAGED), True),
    "u2": ("gpu-node-1", ("team-b", "chat"), True),
    "u3": ("gpu-node-1", ("team-a", "llm"), False),  # attributed, lately gone
    "u4": (None, None, False),  # never seen: only the agent's word
    "u5": (None, ("team-b", "chat"), True),  # seen, not bound to a node yet
}
"""Pod uid -> (the node the operator sees it on, the key it bills it under, whether it is
among the current pods)."""


def _observations(waited: bool = True) -> Observations:
    """The operator's view of SEEN_PODS; ``waited``: both agents' reports have waited
    for unseen pods as long as they may (so such series are refused, not held)."""
    pods: dict[Key, dict[str, PodView]] = {}
    for uid, (node, key, current) in SEEN_PODS.items():
        if current and key is not None:
            pods.setdefault(key, {})[uid] = _pod(uid, None, node=node)
    owners = {uid: key for uid, (_, key, _) in SEEN_PODS.items() if key is not None}
    nodes = {uid: node for uid, (node, key, _) in SEEN_PODS.items() if key is not None}
    since = {key_of(f"agent-{n}", f"gpu-node-{n}"): NOW - flush.UNSEEN_POD_WAIT_MS for n in (0, 1)}
    return seen(pods=pods, owners=owners, pod_nodes=nodes, waiting_since=since if waited else {})


_series = st.builds(
    lambda uid, container, product, claimed, active_us, rounded, bursts, split: SeriesUsage(
        namespace=claimed[0],
        pod=f"pod-{uid}",
        pod_uid=uid,
        container=container,
        gpu="GPU-0",
        gpu_product=product,
        inference_deployment=claimed[1],
        active_us=active_us,
        rounded_ms=RoundedMs(
            per_millisecond=rounded[0], per_second=rounded[1], per_minute=rounded[2]
        ),
        bursts=bursts,
        split_us=None if split is None else SplitUs(proportional=split[0], equal=split[1]),
    ),
    st.sampled_from(sorted(SEEN_PODS)),
    st.sampled_from(["server", "tokenizer", "sidecar"]),
    st.sampled_from(PRODUCTS),
    st.sampled_from([("team-a", "llm"), ("team-a", "cheap"), ("team-a", None), ("team-b", "chat")]),
    st.integers(0, 10**9),
    st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6)),
    st.integers(0, 50),
    st.none() | st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)),
)
_reports = st.lists(
    st.tuples(
        st.integers(0, 1),  # the agent (and node): gpu-node-0 or gpu-node-1
        st.sampled_from([T0 - HOUR + 5_000, T0 + 600_000, T0 + HOUR + 50_000]),  # late or not
        st.lists(_series, max_size=10),
    ),
    max_size=6,
)


def _sent(drawn: list[tuple[int, int, list[SeriesUsage]]]) -> list[UsageReport]:
    sequences = {0: 0, 1: 0}
    sent = []
    for agent, start_ms, series in drawn:
        sequences[agent] += 1
        sent.append(
            UsageReport(
                agent_id=f"agent-{agent}",
                sequence=sequences[agent],
                node=f"gpu-node-{agent}",
                interval_start_ms=start_ms,
                interval_end_ms=start_ms + 10_000,
                series=series,
            )
        )
    return sent


def _per_series(
    accepted: list[UsageReport],
) -> tuple[dict[RecordKey, RecordChange], list[str]]:
    """Each series as a delta of its own in the record the rules say, one by one; and the
    refused ones (pod uids, in order). Refused records are named as in a namespace named
    by the reason."""
    changes: dict[RecordKey, RecordChange] = {}
    refused: list[str] = []
    for report in accepted:
        observed = WINDOWS.start(report.interval_start_ms)
        late = WINDOWS.closed(observed, NOW)
        for series in report.series:
            node, key, _ = SEEN_PODS[series.pod_uid]
            namespace, deployment = key or (series.namespace, series.inference_deployment or "")
            window = WINDOWS.start(NOW) if late else observed
            record = RecordKey(namespace, deployment, window, product_key(series.gpu_product))
            if node != report.node:
                refused.append(series.pod_uid)
                reason = flush.FOREIGN_POD if node else flush.UNSEEN_POD
                record = RecordKey(reason, *dataclasses.astuple(record)[1:])
            changes.setdefault(record, RecordChange()).usage.append(
                UsageDelta(
                    agent_id=flush.progress_key(report),
                    legacy_agent_id=report.agent_id,
                    sequence=report.sequence,
                    active_us=series.active_us,
                    rounded_ms=series.rounded_ms,
                    bursts=series.bursts,
                    split_us=series.split_us,
                    original_window_ms=observed if late else None,
                )
            )
    return changes, refused


@settings(max_examples=150, deadline=None)
@given(drawn=_reports)
def test_each_record_gains_what_its_series_would_one_by_one(
    drawn: list[tuple[int, int, list[SeriesUsage]]],
) -> None:
    sent = _sent(drawn)
    planned = flush.plan(sent, {}, _observations(), WINDOWS, NOW)
    assert sorted(planned.selection.accepted, key=id) == sorted(sent, key=id)
    expected, refused = _per_series(planned.selection.accepted)
    got = dict(planned.changes) | {
        RecordKey(reason, *dataclasses.astuple(k)[1:]): c
        for reason, changes in planned.refused_changes.items()
        for k, c in changes.items()
    }
    assert set(got) == set(expected)
    for record, change in got.items():
        reports = [(d.agent_id, d.sequence) for d in change.usage]
        assert len(reports) == len(set(reports)), "one delta per report and record"
        assert sorted(reports) == sorted({(d.agent_id, d.sequence) for d in expected[record].usage})
        spec = SPEC.model_copy(update={"gpu_product": record.product})
        assert apply(BillingRecordStatus(), spec, change, NOW) == apply(
            BillingRecordStatus(), spec, expected[record], NOW
        )
    assert [series.pod_uid for _, series, _ in planned.refused] == refused
    refused_records = [item for c in planned.refused_changes.values() for item in c.items()]
    for report in sent:
        records = {
            k
            for k, c in [*planned.changes.items(), *refused_records]
            if any(
                (d.agent_id, d.sequence) == (flush.progress_key(report), report.sequence)
                for d in c.usage
            )
        }
        assert planned.touched.get((flush.progress_key(report), report.sequence), set()) == records


@settings(max_examples=100, deadline=None)
@given(drawn=_reports, order=st.randoms(use_true_random=False))
def test_the_order_of_a_reports_series_changes_nothing(
    drawn: list[tuple[int, int, list[SeriesUsage]]], order: random.Random
) -> None:
    """The plan follows runs of one pod's series (as agents send them) but depends on
    nothing but where each series lands."""
    sent = _sent(drawn)
    shuffled = [
        r.model_copy(update={"series": order.sample(r.series, len(r.series))}) for r in sent
    ]
    planned = flush.plan(sent, {}, _observations(), WINDOWS, NOW)
    again = flush.plan(shuffled, {}, _observations(), WINDOWS, NOW)
    assert again.changes == planned.changes
    assert again.refused_changes == planned.refused_changes
    assert again.touched == planned.touched
    assert sorted(s.model_dump_json() for _, s, _ in again.refused) == sorted(
        s.model_dump_json() for _, s, _ in planned.refused
    )


@settings(max_examples=100, deadline=None)
@given(drawn=_reports)
def test_an_agent_waits_from_its_first_report_that_names_an_unseen_pod(
    drawn: list[tuple[int, int, list[SeriesUsage]]],
) -> None:
    """Before the wait is over, each agent's reports apply up to the first one that claims
    a pod the operator has not seen on a node; that one and every later one wait, and
    the ones that apply are planned as if the others had never been sent."""
    sent = _sent(drawn)
    planned = flush.plan(sent, {}, _observations(waited=False), WINDOWS, NOW)
    unseen = {uid for uid, (node, _, _) in SEEN_PODS.items() if node is None}
    expected: list[UsageReport] = []
    held: set[str] = set()
    for r in sent:
        if r.agent_id in held or any(series.pod_uid in unseen for series in r.series):
            held.add(r.agent_id)
        else:
            expected.append(r)

    def by_agent(reports: list[UsageReport]) -> list[UsageReport]:
        return sorted(reports, key=lambda r: (r.agent_id, r.sequence))  # agents in no order

    assert by_agent(planned.selection.accepted) == by_agent(expected)
    assert planned.selection.waiting == len(sent) - len(expected)
    assert set(planned.waiting_since) == {f"gpu-node-{a[-1]}/{a}" for a in held}
    assert set(planned.waiting_since.values()) <= {NOW}, "the wait begins now"
    alone = flush.plan(expected, {}, _observations(), WINDOWS, NOW)
    assert (planned.changes, planned.refused_changes) == (alone.changes, alone.refused_changes)


def test_a_pods_containers_in_one_record_are_one_delta_of_their_sum() -> None:
    """Two containers of pod u0 around one of pod u1 (another record): u0's make one delta,
    their sum, in report order; a MIG instance's split is summed too."""
    sent = report("a", 1, active_us=1_000)
    server = sent.series[0].model_copy(update={"split_us": SplitUs(proportional=400)})
    other = server.model_copy(update={"pod_uid": "u1", "active_us": 5, "split_us": None})
    sidecar = server.model_copy(update={"container": "sidecar", "active_us": 20, "bursts": 2})
    sent = sent.model_copy(update={"series": [server, other, sidecar]})
    owners: dict[str, Key] = {"u0": ("team-a", "llm"), "u1": ("team-a", UNMANAGED)}
    observations = seen(owners=owners, pod_nodes={"u1": "gpu-node-0"})
    planned = flush.plan([sent], {}, observations, WINDOWS, T0 + 1_000)
    llm, unmanaged = planned.changes
    assert (llm.deployment, unmanaged.deployment) == ("llm", UNMANAGED), "in the order seen"
    (delta,) = planned.changes[llm].usage
    assert (delta.active_us, delta.bursts) == (1_020, 3)
    assert delta.rounded_ms == RoundedMs(per_millisecond=2, per_second=2000, per_minute=120_000)
    assert delta.split_us == SplitUs(proportional=800)
    assert [d.active_us for d in planned.changes[unmanaged].usage] == [5]


@settings(max_examples=150, deadline=None)
@given(series=st.lists(_series, max_size=12))
def test_a_reports_runs_are_its_series_in_order_summed_per_consecutive_pod(
    series: list[SeriesUsage],
) -> None:
    sent = UsageReport(
        agent_id="a", sequence=1, node="n", interval_start_ms=0, interval_end_ms=1, series=series
    )

    def claim(s: SeriesUsage) -> tuple[str, str, str, str | None]:
        return (s.pod_uid, s.gpu_product, s.namespace, s.inference_deployment)

    runs = sent.runs
    assert [s for run in runs for s in run.series] == series, "every series once, in order"
    for run, following in itertools.pairwise(runs):
        assert claim(run.series[0]) != claim(following.series[0]), "a run ends at a change"
    for run in runs:
        assert {claim(s) for s in run.series} == {
            (run.pod_uid, run.gpu_product, run.namespace, run.inference_deployment)
        }
        assert run.active_us == sum(s.active_us for s in run.series)
        assert run.bursts == sum(s.bursts for s in run.series)
        for granularity in ("1ms", "1s", "1m"):
            assert run.rounded_ms.at(granularity) == sum(
                s.rounded_ms.at(granularity) for s in run.series
            )
        splits = [s.split_us for s in run.series if s.split_us is not None]
        assert run.split_us == (sum(splits[1:], splits[0]) if splits else None)


def test_a_copy_of_a_report_with_other_series_sums_its_own() -> None:
    """Runs are summed once and kept; a copy with other series must not keep the old."""
    sent = report("a", 1, active_us=1_000)
    assert [run.active_us for run in sent.runs] == [1_000]
    other = sent.series[0].model_copy(update={"pod_uid": "u1", "active_us": 7})
    copied = sent.model_copy(update={"series": [*sent.series, other]})
    assert [run.active_us for run in copied.runs] == [1_000, 7]
    assert [run.active_us for run in sent.runs] == [1_000]
