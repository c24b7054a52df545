"""The ledger's decisions for one flush, as pure functions of what it knows.

``plan`` takes the reports that arrived, the per-agent progress, the operator's
observations (counts, pods, deployments' GPU products, nodes' products) and the time,
and says which reports apply, how their usage groups into records (deployment x window
x GPU product), what each record gains (usage, counts, pod spans), which counts must
wait for a GPU product, and what the next flush starts from. ``acknowledge`` says how far
each agent's progress may advance once the writer knows which records it failed to
write; ``closing`` says which open records become Final. The ledger (``ledger.py``)
only gathers the inputs (reads nodes, drains events), carries out the plan and writes.
So every rule is a row in a unit-test table, as the autoscaler's are.

Attribution is the operator's, not the agent's: a series lands in the record of the
InferenceDeployment its pod belongs to by owner chain (ReplicaSet -> Deployment ->
InferenceDeployment), or, for a pod of none (unlabelled, relabelled, a bare pod), in its
namespace's records of their own (``UNMANAGED``), priced at the namespace's plan. A
label the tenant controls decides nothing. Series are bound to their node: usage an agent
claims for a pod the operator sees on another node is refused (counted, filed as a dead
letter), never applied; the report's other series are. Usage claimed for a pod the
operator has not seen on a node (its watch may lag a pod bound a moment ago) waits: the
agent's report, and its later ones, up to ``UNSEEN_POD_WAIT_MS`` from when the wait began;
then such series are refused the same way, and the rest applied. An agent's word alone
never bills a namespace.
Windows: usage counts in the window its report was observed in; once that window has
ended and its grace passed, usage for it goes into the current window as an adjustment.
Provisioned time is per pod and window (scheduled -> gone), so re-planning is harmless.
Counts whose GPU product is not known yet (no pod of the deployment on a node) wait, up
to a window and its grace, rather than opening a record for an unknown product.

A flush of 10,000 agents plans 320,000 series and 80,000 pods on the operator's one event
loop (bench/flush_plan.py), so the plan makes as few objects as it can without changing
what is written: one usage delta per report and record, the sum of its series there
(``records.apply`` applies a report's usage in a record all or nothing, so the record gains
exactly what one delta per series gave it), and each record's key made once per call.
Memos (product keys, record keys) live for one ``plan`` call only.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from payper.api.usage import SeriesRun, SeriesUsage, UsageReport, summed
from payper.billing.events import BillingEvents
from payper.billing.pricing import UNKNOWN_PRODUCT, product_key
from payper.billing.records import PodSpan, RecordChange, RecordKey, UsageDelta, window_start
from payper.observed import UNMANAGED, Key, PodView

K = TypeVar("K")
ReportId = tuple[str, int]
"""(progress key, sequence)."""
MAX_PROGRESS_KEY = 256
"""Records keep the last applied sequence per progress key, in keys of at most this size."""
UNSEEN_POD_WAIT_MS = 30_000
"""How long an agent's reports wait for the operator to see, on the reporting node, a pod
they claim usage for. Counted from the first flush that held them (the operator's clock,
never the agent's); an operator restart starts it again, so a wait is at most twice this."""

FOREIGN_POD = "pod-on-another-node"
"""Why a series is refused: the operator sees its pod on another node than the reporter."""
UNSEEN_POD = "pod-not-seen-on-the-node"
"""Why a series is refused: the operator did not see its pod on a node within the wait
(gone while the operator was away, still unbound, or invented)."""
REFUSAL_REASONS = (FOREIGN_POD, UNSEEN_POD)
FORGET_WAIT_MS = 10 * UNSEEN_POD_WAIT_MS
"""A wait is remembered across flushes that bring no report of its agent (an agent
retrying with backoff skips flushes), until this long after it began."""


def progress_key(report: UsageReport) -> str:
    """Progress is kept per (node, agent id): the node is what the operator verified (the
    reporter's token is bound to a pod on it), the agent id only what the agent says. So an
    agent cannot advance, or spoil, another node's agent's sequence by borrowing its id."""
    key = f"{report.node}/{report.agent_id}"
    if len(key) > MAX_PROGRESS_KEY:
        node = hashlib.sha256(report.node.encode()).hexdigest()[:32]
        key = f"{node}/{report.agent_id}"
    return key


def applied(progress: Mapping[str, int], report: UsageReport) -> int:
    """The last sequence of this report's agent applied everywhere. Progress written
    before keys named the node is keyed by the bare agent id: it counts until the agent's
    next report is applied under its new key (an upgrade loses and repeats nothing)."""
    key = progress_key(report)
    return progress[key] if key in progress else progress.get(report.agent_id, 0)


@dataclass(frozen=True)
class BillingWindows:
    window_ms: int
    grace_ms: int

    def start(self, ms: int) -> int:
        return window_start(ms, self.window_ms)

    def closed(self, start_ms: int, now_ms: int) -> bool:
        """The window starting at ``start_ms`` is over, grace included: Final."""
        return start_ms + self.window_ms + self.grace_ms <= now_ms


@dataclass(frozen=True)
class Observations:
    """What the operator saw, as the ledger found it at the start of the flush."""

    events: BillingEvents
    """Counts and ended pods since the last flush (already drained)."""
    pods: Mapping[Key, Mapping[str, PodView]]
    """The pods that matter to this flush (those holding GPUs, those reported), by the key
    their owner chain bills them under, then by UID."""
    deployment_products: Mapping[Key, str]
    """The GPU product each deployment's spec names (only those that name one)."""
    node_products: Mapping[str, str]
    """The GPU product label of each node a pod runs on."""
    unplaced_since: Mapping[Key, int]
    """Deployments whose counts wait for a GPU product, since when (ms)."""
    owners: Mapping[str, Key] = field(default_factory=dict)
    """The key each known pod (current, ended or lately gone) is billed under, by UID:
    (namespace, InferenceDeployment) through its owner chain, else (namespace, UNMANAGED)."""
    pod_nodes: Mapping[str, str | None] = field(default_factory=dict)
    """The node each known pod (current, ended or lately gone) is bound to, by UID (None:
    not bound yet). A pod absent here is one the operator has not seen."""
    waiting_since: Mapping[str, int] = field(default_factory=dict)
    """Agents (by progress key) whose reports wait for an unseen pod, since when (ms)."""

    def key_of(self, pod: PodView) -> Key:
        return self.owners.get(pod.uid, (pod.namespace, UNMANAGED))


@dataclass
class Selection:
    accepted: list[UsageReport]
    duplicates: int = 0
    out_of_order: int = 0
    waiting: int = 0
    """Reports held back for a pod the operator has not seen yet (not in ``accepted``)."""


@dataclass
class FlushPlan:
    selection: Selection
    changes: dict[RecordKey, RecordChange]
    touched: dict[ReportId, set[RecordKey]]
    """The records each accepted report's usage lands in."""
    refused: list[tuple[UsageReport, SeriesUsage, str]] = field(default_factory=list)
    """Series not applied, with why (one of ``REFUSAL_REASONS``)."""
    refused_changes: dict[str, dict[RecordKey, RecordChange]] = field(default_factory=dict)
    """Their usage, by reason, then by the record it claimed: for the dead-letter store. A
    report is acknowledged only once these are filed (they are in ``touched`` too)."""
    held_requests: dict[Key, int] = field(default_factory=dict)
    held_cold_starts: dict[Key, int] = field(default_factory=dict)
    """Counts that wait for a GPU product: the next flush counts them again."""
    unplaced_since: dict[Key, int] = field(default_factory=dict)
    waiting_since: dict[str, int] = field(default_factory=dict)
    """The agents whose reports still wait for an unseen pod, since when (also those with
    no report in this flush, until ``FORGET_WAIT_MS``)."""


def select(reports: Sequence[UsageReport], applied_through: Mapping[str, int]) -> Selection:
    """Per agent, the reports next in sequence; resends are duplicates, and a report
    after a gap waits (with every later one) until the missing one arrives."""
    by_agent: dict[str, dict[int, UsageReport]] = defaultdict(dict)
    for report in reports:
        by_agent[progress_key(report)].setdefault(report.sequence, report)
    selection = Selection(accepted=[])
    for numbered in by_agent.values():
        expected = applied(applied_through, next(iter(numbered.values()))) + 1
        for sequence in sorted(numbered):
            if sequence < expected:
                selection.duplicates += 1
            elif sequence == expected:
                selection.accepted.append(numbered[sequence])
                expected += 1
            else:
                selection.out_of_order += sum(1 for n in numbered if n >= sequence)
                break
    return selection


def product_of(pod: PodView | None, key: Key, seen: Observations) -> str:
    """The product the deployment asks for, else the one its pod's node carries."""
    named = seen.deployment_products.get(key)
    if named is not None:
        return named
    if pod is None or pod.node is None:
        return UNKNOWN_PRODUCT
    return seen.node_products.get(pod.node, UNKNOWN_PRODUCT)


def _series_key(run: SeriesRun, seen: Observations) -> Key:
    """Where a pod's series are billed: the operator's own attribution of the pod (owner
    chain). For a pod the operator never saw, where its refused claim is filed: the
    namespace and deployment the agent read from the API."""
    known = seen.owners.get(run.pod_uid)
    if known is not None:
        return known
    return (run.namespace, run.inference_deployment or UNMANAGED)


def _usage(
    plan: FlushPlan,
    seen: Observations,
    windows: BillingWindows,
    now_ms: int,
    records: _Records,
) -> None:
    current = windows.start(now_ms)
    refused_records = {
        reason: _Records(plan.refused_changes.setdefault(reason, {})) for reason in REFUSAL_REASONS
    }
    products: dict[str, str] = {}  # GPU product name -> its key, for this plan call
    held: set[str] = set()
    kept: list[UsageReport] = []
    plan.waiting_since = {
        agent: since
        for agent, since in seen.waiting_since.items()
        if now_ms - since < FORGET_WAIT_MS
    }
    for report in plan.selection.accepted:
        agent = progress_key(report)
        if agent in held:  # behind a held report of its agent: sequence order holds
            plan.selection.waiting += 1
            continue
        routed = _by_record(report, seen, products)
        if routed.unseen:
            since = seen.waiting_since.get(agent, now_ms)
            if now_ms - since < UNSEEN_POD_WAIT_MS:
                held.add(agent)
                plan.waiting_since[agent] = since
                plan.selection.waiting += 1
                continue
        plan.waiting_since.pop(agent, None)
        kept.append(report)
        plan.refused.extend(routed.refused)
        if not routed.groups:
            continue
        observed = windows.start(report.interval_start_ms)
        late = windows.closed(observed, now_ms)
        window, original = (current, observed) if late else (observed, None)
        touched = plan.touched[(agent, report.sequence)]
        for ((namespace, deployment), product, reason), members in routed.groups.items():
            where = refused_records[reason] if reason else records
            key, change = where.get(namespace, deployment, window, product)
            change.usage.append(_delta(agent, report, members, original))
            touched.add(key)
    plan.selection.accepted = kept
    plan.refused_changes = {r: c for r, c in plan.refused_changes.items() if c}


@dataclass
class _Routed:
    """A report's series by where they land: (namespace, deployment), GPU product key,
    and the reason they are refused ("" for applied)."""

    groups: dict[tuple[Key, str, str], list[SeriesRun]] = field(default_factory=dict)
    refused: list[tuple[UsageReport, SeriesUsage, str]] = field(default_factory=list)
    unseen: bool = False
    """Some series name a pod the operator has not seen on a node (refused, if the
    report does not wait)."""


def _by_record(report: UsageReport, seen: Observations, products: dict[str, str]) -> _Routed:
    routed = _Routed()
    nodes = seen.pod_nodes
    for run in report.runs:  # a pod's series, summed when the report arrived
        product = products.get(run.gpu_product)
        if product is None:
            product = products[run.gpu_product] = product_key(run.gpu_product)
        # An agent reports only its own node's pods: usage it claims for a pod the
        # operator sees on another node, or nowhere, is not applied (the report's other
        # series are) but filed as a dead letter. A pod never moves.
        node = nodes.get(run.pod_uid)
        if node == report.node:
            reason = ""
        else:
            reason = UNSEEN_POD if node is None else FOREIGN_POD
            routed.unseen = routed.unseen or node is None
            routed.refused.extend((report, series, reason) for series in run.series)
        routed.groups.setdefault((_series_key(run, seen), product, reason), []).append(run)
    return routed


def _delta(
    agent: str, report: UsageReport, runs: list[SeriesRun], original_window_ms: int | None
) -> UsageDelta:
    """One report's usage in one record: its series there, summed (``records.apply``
    applies a report's usage in a record all or nothing, so one delta is the same as one
    per series)."""
    active_us, bursts, rounded, split = summed(runs)
    return UsageDelta(
        agent_id=agent,
        legacy_agent_id=report.agent_id,
        sequence=report.sequence,
        active_us=active_us,
        rounded_ms=rounded,
        bursts=bursts,
        split_us=split,
        original_window_ms=original_window_ms,
    )


class _Records:
    """One plan call's records in ``changes``, by their fields: each record's key is made,
    and hashed into ``changes``, once, not once for every report and pod that lands in it
    (a flush of 10,000 agents touches a few thousand records 160,000 times). Lives only
    as long as the call."""

    def __init__(self, changes: dict[RecordKey, RecordChange]) -> None:
        self.changes = changes
        self.found: dict[tuple[str, str, int, str], tuple[RecordKey, RecordChange]] = {}

    def get(
        self, namespace: str, deployment: str, window_start_ms: int, product: str
    ) -> tuple[RecordKey, RecordChange]:
        fields = (namespace, deployment, window_start_ms, product)
        found = self.found.get(fields)
        if found is None:
            key = RecordKey(*fields)
            found = self.found[fields] = (key, self.changes.setdefault(key, RecordChange()))
        return found


def _counts(plan: FlushPlan, seen: Observations, windows: BillingWindows, now_ms: int) -> None:
    current = windows.start(now_ms)
    products: dict[Key, str] = {}
    for key in plan.changes:
        if key.window_start_ms == current:
            products.setdefault((key.namespace, key.deployment), key.product)
    plan.unplaced_since = dict(seen.unplaced_since)
    for kind, counts, held in (
        ("requests", seen.events.requests, plan.held_requests),
        ("cold_starts", seen.events.cold_starts, plan.held_cold_starts),
    ):
        for deployment, count in counts.items():
            product = products.get(deployment)
            if product is None:
                product = _count_product(plan, seen, deployment, windows, now_ms)
                if product is None:
                    held[deployment] = held.get(deployment, 0) + count
                    continue
                products[deployment] = product
            change = plan.changes[RecordKey(*deployment, current, product)]
            if kind == "requests":
                change.requests += count
            else:
                change.cold_starts += count


def _count_product(
    plan: FlushPlan, seen: Observations, key: Key, windows: BillingWindows, now_ms: int
) -> str | None:
    """The product a deployment's counts go under; None: they wait (no pod on a node)."""
    pods = seen.pods.get(key, {}).values()
    product = product_of(next((p for p in pods if p.node is not None), None), key, seen)
    if product != UNKNOWN_PRODUCT:
        plan.unplaced_since.pop(key, None)
        return product
    since = plan.unplaced_since.setdefault(key, now_ms)
    if now_ms - since < windows.window_ms + windows.grace_ms:
        return None
    plan.unplaced_since.pop(key, None)  # no pod ever landed: file them as they are
    return product


def _pod_spans(
    plan: FlushPlan,
    seen: Observations,
    windows: BillingWindows,
    now_ms: int,
    records: _Records,
) -> None:
    """Each pod's provisioned time (scheduled -> ended, or now) in each open window."""
    oldest_open = windows.start(now_ms - windows.window_ms - windows.grace_ms)
    for key, pod, end in _holding_gpus(seen, now_ms):
        scheduled = pod.scheduled_ms
        if scheduled is None or end <= scheduled:
            continue
        product = product_of(pod, key, seen)
        start = max(windows.start(scheduled), oldest_open)
        while start < end:
            stop = start + windows.window_ms
            if not windows.closed(start, now_ms) and scheduled < stop:
                _, change = records.get(key[0], key[1], start, product)
                change.pods[pod.uid] = PodSpan(
                    pod.uid, pod.name, pod.gpus, max(scheduled, start), min(end, stop), pod.node
                )
            start = stop


def _holding_gpus(seen: Observations, now_ms: int) -> Iterator[tuple[Key, PodView, int]]:
    """The pods that held GPUs since the last flush, with when they stopped: the ended
    ones, then the current ones (until now)."""
    for pod, end in seen.events.ended_pods:
        yield seen.key_of(pod), pod, end
    for key, pods in seen.pods.items():
        for pod in pods.values():
            if pod.scheduled_ms is not None and pod.gpus > 0:
                yield key, pod, now_ms


def plan(
    reports: Sequence[UsageReport],
    applied_through: Mapping[str, int],
    seen: Observations,
    windows: BillingWindows,
    now_ms: int,
) -> FlushPlan:
    """Everything one flush will write, and what the next flush starts from."""
    result = FlushPlan(
        selection=select(reports, applied_through),
        changes=defaultdict(RecordChange),
        touched=defaultdict(set),
    )
    records = _Records(result.changes)
    _usage(result, seen, windows, now_ms, records)
    _counts(result, seen, windows, now_ms)
    _pod_spans(result, seen, windows, now_ms, records)
    return result


def acknowledge(
    flush: FlushPlan, applied_through: Mapping[str, int], failed: set[RecordKey]
) -> dict[str, int]:
    """Per agent, the last sequence applied everywhere: in order, and only through
    reports none of whose records failed to be written in this flush."""
    progress = dict(applied_through)
    for report in flush.selection.accepted:
        key = progress_key(report)
        if applied(progress, report) != report.sequence - 1:
            continue  # an earlier report of this agent failed in this flush
        if flush.touched.get((key, report.sequence), set()) & failed:
            continue
        progress[key] = report.sequence
    return progress


def next_due(previous_s: float, now_s: float, interval_s: float) -> float:
    """When the next flush starts: one interval after the previous one was due, or now
    if that time has passed (a flush that took longer than the interval)."""
    return max(previous_s + interval_s, now_s)


def expired(window_ends: Mapping[K, int], retention_ms: int, now_ms: int) -> list[K]:
    """The Final records (by whatever key the caller holds them) kept as long as they
    must be: their window ended at least ``retention_ms`` ago."""
    return [key for key, end in window_ends.items() if end + retention_ms <= now_ms]


def closing(window_starts: Mapping[K, int], windows: BillingWindows, now_ms: int) -> list[K]:
    """The open records (by whatever key the caller holds them) whose window, grace
    included, is over: they become Final in this flush."""
    return [key for key, start in window_starts.items() if windows.closed(start, now_ms)]
