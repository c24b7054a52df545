"""Usage reports: what a node's agent tells the operator about active GPU time.

Each agent instance has an id and numbers its reports 1, 2, 3, ...; a report carries,
per series (container x GPU), the deltas observed in its interval. The operator applies
each (agent id, sequence) at most once, so reports may be resent freely. Reports are
cut on wall-clock boundaries of the report interval, so one report never straddles two
billing windows. Times are integer microseconds (active) or milliseconds (rounded).

Each report also says, per GPU, where all of that GPU's time in the interval went
(``gpus``): attributed to pods, unattributed (processes in no pod), unmetered (the driver
could not say) or idle, adding up to the wall-clock time the agent accounted on it. That
is what the per-GPU reconciliation (``payper reconcile``) is built from.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Protocol, Self

from pydantic import Field, ValidationError, field_validator, model_validator

from payper.api.billing_record import RoundedMs, SplitUs
from payper.api.common import ApiModel, DnsLabel, ShortString, field_errors

MAX_SERIES = 4096
MAX_BATCH = 200
MAX_GPUS = 64
Micros = Annotated[int, Field(ge=0, le=10**15)]
MAX_TIME_MS = 253_370_764_800_000
"""9999-01-01T00:00:00Z: a report's times end before the last year a record's window can
name begins, so its window (at most a day) and grace still end in a year a timestamp
holds. Past it, ``window_label`` and the record's ``window.end`` could not be written."""
TimeMs = Annotated[int, Field(ge=0, le=MAX_TIME_MS)]
MAX_ROUNDED_MS = 10**12
"""About 31 years of one container's GPU time in one report: far beyond any real burst,
and small enough that a record's sums stay within the amounts' 18 integer digits."""


class SeriesUsage(ApiModel):
    """One container on one GPU during one report interval."""

    namespace: DnsLabel
    pod: Annotated[str, Field(min_length=1, max_length=253)]
    pod_uid: ShortString
    container: DnsLabel
    gpu: ShortString
    """GPU UUID (or MIG instance UUID)."""
    gpu_product: ShortString
    inference_deployment: DnsLabel | None = None
    """The pod's payper.dev/inference-deployment label as the agent saw it. The ledger bills
    by the operator's own owner chain of the pod instead; this counts only for a pod the
    operator never saw, and None there means the namespace's own records."""
    active_us: Micros = 0
    rounded_ms: RoundedMs = Field(default_factory=RoundedMs)
    """Billed time per granularity g in this interval: a unit of g for each multiple of g
    the container's burst completed in it, plus the remainder of each burst that ended in
    it, rounded up to one unit (per burst ``ceil(active / g) * g``, billed as it
    computes)."""
    bursts: Annotated[int, Field(ge=0)] = 0
    split_us: SplitUs | None = None
    """Of ``activeUs``, what came from a MIG instance this container shared with other
    processes, by how the instance's time was divided; None: none was shared."""

    @field_validator("rounded_ms")
    @classmethod
    def _storable_rounded(cls, rounded: RoundedMs) -> RoundedMs:
        if max(rounded.to_wire().values()) > MAX_ROUNDED_MS:
            raise ValueError(f"each granularity's rounded time must be at most {MAX_ROUNDED_MS} ms")
        return rounded


class SeriesRun:
    """Consecutive series of one report that name the same pod, GPU product and
    deployment (an agent sends a pod's series one after another), with their usage summed.
    The ledger routes usage to records a run at a time: all of a run lands in one place."""

    __slots__ = (
        "active_us",
        "bursts",
        "gpu_product",
        "inference_deployment",
        "namespace",
        "pod_uid",
        "rounded_ms",
        "series",
        "split_us",
    )

    def __init__(self, series: list[SeriesUsage]) -> None:
        first = series[0]
        self.pod_uid = first.pod_uid
        self.gpu_product = first.gpu_product
        self.namespace = first.namespace
        self.inference_deployment = first.inference_deployment
        self.series = series
        self.active_us, self.bursts, self.rounded_ms, self.split_us = summed(series)


class _Usage(Protocol):
    active_us: int
    bursts: int
    rounded_ms: RoundedMs
    split_us: SplitUs | None


def summed(parts: Sequence[_Usage]) -> tuple[int, int, RoundedMs, SplitUs | None]:
    """Active µs, bursts, rounded ms and MIG split of series (or runs) added up; one part
    is returned as it is (no new objects)."""
    if len(parts) == 1:
        (only,) = parts
        return only.active_us, only.bursts, only.rounded_ms, only.split_us
    active_us = bursts = per_millisecond = per_second = per_minute = 0
    split: SplitUs | None = None
    for part in parts:
        active_us += part.active_us
        bursts += part.bursts
        rounded = part.rounded_ms
        per_millisecond += rounded.per_millisecond
        per_second += rounded.per_second
        per_minute += rounded.per_minute
        if part.split_us is not None:
            split = part.split_us if split is None else split + part.split_us
    # Validated, though sums of valid counts are valid: pydantic's validating constructor
    # is about twice as fast as model_construct for three ints (1.6 against 3.1 µs).
    total = RoundedMs(per_millisecond=per_millisecond, per_second=per_second, per_minute=per_minute)
    return active_us, bursts, total, split


class GpuTime(ApiModel):
    """Where one GPU's wall-clock time went: each microsecond in exactly one place.

    ``wall_us`` is the time the agent accounted on this GPU: from where the previous
    report's accounting on it ended to where this one's ends (the driver's newest sample),
    so consecutive reports tile the GPU's timeline without gap or overlap; about the report
    interval, and longer after an agent outage (the outage is then unmetered).
    ``attributed_us`` is the sum of this report's series on this GPU (its MIG instances
    included); ``unattributed_us`` processes in no pod; ``unmetered_us`` time no sample
    could account for (a gap longer than a few polls, MIG without GPM); ``idle_us`` the
    rest. ``excess_us`` is normally 0: time attributed beyond the wall clock, when the
    driver's per-process percentages of one period summed to more than 100 % (integer
    rounding, or MIG instances each counting their own time); ``idle_us`` is then 0.
    """

    gpu: ShortString
    """GPU UUID (a MIG GPU's instances are summed on it)."""
    gpu_product: ShortString
    wall_us: Micros
    attributed_us: Micros = 0
    unattributed_us: Micros = 0
    unmetered_us: Micros = 0
    idle_us: Micros = 0
    excess_us: Micros = 0

    @model_validator(mode="after")
    def _adds_up(self) -> GpuTime:
        if not adds_up(self):
            raise ValueError(
                "attributedUs + unattributedUs + unmeteredUs + idleUs must equal "
                "wallUs + excessUs, with idleUs or excessUs zero"
            )
        return self


def adds_up(time: GpuTime) -> bool:
    """attributed + unattributed + unmetered + idle = wall (+ excess, when idle is 0)."""
    used = time.attributed_us + time.unattributed_us + time.unmetered_us + time.idle_us
    return used == time.wall_us + time.excess_us and min(time.idle_us, time.excess_us) == 0


class UsageReport(ApiModel):
    agent_id: Annotated[str, Field(min_length=1, max_length=64)]
    sequence: Annotated[int, Field(ge=1)]
    node: Annotated[str, Field(min_length=1, max_length=253)]
    interval_start_ms: TimeMs
    interval_end_ms: TimeMs
    series: Annotated[list[SeriesUsage], Field(max_length=MAX_SERIES)] = Field(default_factory=list)
    unattributed_us: Micros = 0
    """GPU time of processes that belong to no pod: reported, never billed."""
    unmetered_gpus: Annotated[list[ShortString], Field(max_length=64)] = Field(default_factory=list)
    """GPUs the agent could not meter in this interval (e.g. MIG without GPM)."""
    lost_us: Micros = 0
    """Set on a *gap marker*: the agent dropped this sequence's report (past retention,
    or refused as malformed) and sends this, without series, in its place, so the ledger
    moves on and the loss is audited at its known size instead of a silent gap."""
    lost_reason: ShortString | None = None
    simulated: bool = False
    """Measured by the simulated backend, not a GPU driver: refused unless the operator's
    ``billing.acceptSimulatedReports`` allows it (it never does by default)."""
    unmetered_us: Micros = 0
    """GPU time (summed over GPUs) no sample accounted for: gaps longer than a few polls
    (the agent down, driver errors) are not billed, they are reported here."""
    gpus: Annotated[list[GpuTime], Field(max_length=MAX_GPUS)] = Field(default_factory=list)
    """Per GPU, where its time in this report went (absent from earlier agents and
    from gap markers). Its ``unmeteredUs`` also counts unmetered GPUs' whole time, which
    the node-wide ``unmeteredUs`` above (gaps only) does not."""

    @model_validator(mode="after")
    def _interval(self) -> UsageReport:
        if self.interval_end_ms < self.interval_start_ms:
            raise ValueError("intervalEndMs must not be before intervalStartMs")
        return self

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("runs", None)  # a copy sums its own series
        return copied

    @functools.cached_property
    def runs(self) -> list[SeriesRun]:
        """The series in runs (``SeriesRun``), summed once per report: the ledger asks
        when the report arrives, so a flush of thousands of reports does not redo it
        (``bench/flush_plan.py``). Not part of the wire form; series are not changed
        after validation."""
        groups: list[list[SeriesUsage]] = []
        claim: tuple[str, str, str, str | None] | None = None
        for series in self.series:
            this = (
                series.pod_uid,
                series.gpu_product,
                series.namespace,
                series.inference_deployment,
            )
            if this != claim:
                claim = this
                groups.append([])
            groups[-1].append(series)
        return [SeriesRun(group) for group in groups]


class UsageBatch(ApiModel):
    """Reports of one agent, oldest first; the operator applies them in sequence order."""

    reports: Annotated[list[UsageReport], Field(min_length=1, max_length=MAX_BATCH)]


class ReportIdentity(ApiModel):
    """What names a report, read alone from one that is not valid as a whole, so that it
    is refused by name (its agent moves past it) instead of failing its whole batch."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    agent_id: Annotated[str, Field(min_length=1, max_length=64)]
    sequence: Annotated[int, Field(ge=1, le=2**63 - 1)]


MAX_REFUSED_CONTENT = 4096
"""Bytes of a refused report's JSON kept in the dead-letter store (with its size and
digest): enough to see what was wrong, bounded however large the report was."""


class RefusedReport(ApiModel):
    """A report the operator refuses: not valid, or its application raised. Its agent and
    sequence when they could be read (else None: it can only be answered, not moved past),
    why, the GPU time it claimed (best effort, for the audit) and its content, truncated."""

    agent_id: str | None
    sequence: int | None
    reason: Annotated[str, Field(max_length=1024)]
    claimed_us: Micros = 0
    content: str = ""
    size: int = 0
    digest: str = ""

    def answer(self) -> dict[str, Any]:
        """The entry in the operator's answer: ``{agentId, sequence, reason}``."""
        return {"agentId": self.agent_id, "sequence": self.sequence, "reason": self.reason}


def _claimed_us(raw: Any) -> int:
    """The GPU time a report that is not valid claims: its series' ``activeUs`` that are
    integers in range, summed and capped (what the audit shows; never billed)."""
    series = raw.get("series") if isinstance(raw, dict) else None
    total = 0
    for item in series if isinstance(series, list) else []:
        value = item.get("activeUs") if isinstance(item, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**15:
            total += value
    return min(total, 10**15)


def refusal(raw: Any, reason: str) -> RefusedReport:
    """A ``RefusedReport`` for ``raw`` (the report as it came, or as validated)."""
    text = json.dumps(raw, sort_keys=True, default=str)
    try:
        identity: ReportIdentity | None = ReportIdentity.model_validate(raw)
    except ValidationError:
        identity = None
    return RefusedReport(
        agent_id=identity.agent_id if identity else None,
        sequence=identity.sequence if identity else None,
        reason=reason[:1024],
        claimed_us=_claimed_us(raw),
        content=text[:MAX_REFUSED_CONTENT],
        size=len(text),
        digest=hashlib.sha256(text.encode()).hexdigest(),
    )


class NewerAgentError(ValueError):
    """A report has fields this operator does not know, and nothing else wrong: from an
    agent newer than the operator (an upgrade under way). Its batch is answered 400, which
    the agent holds for a while instead of setting it aside: the operator upgraded next
    takes it whole."""


def validate_each(raw_reports: Sequence[Any]) -> tuple[list[UsageReport], list[RefusedReport]]:
    """Each report of a batch validated on its own: the valid ones, and the refused ones
    with the fields that make them invalid (one bad report never fails its batch). Raises
    ``NewerAgentError`` for a report whose only fault is fields this operator does not
    know."""
    valid: list[UsageReport] = []
    refused: list[RefusedReport] = []
    for index, raw in enumerate(raw_reports):
        try:
            valid.append(UsageReport.model_validate(raw))
        except ValidationError as error:
            if all(item["type"] == "extra_forbidden" for item in error.errors()):
                unknown = ", ".join(field_errors(error)[:5])
                raise NewerAgentError(
                    f"reports[{index}] has fields this operator does not know ({unknown}): "
                    "upgrade the operator before the agents"
                ) from error
            problems = "; ".join(field_errors(error, root="(report)")[:5])
            refused.append(refusal(raw, f"invalid report (reports[{index}]): {problems}"))
    return valid, refused


class RawUsageBatch(ApiModel):
    """A batch as it comes: a bounded list of objects, each validated on its own
    (``validate_each``)."""

    reports: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_BATCH)]


def parse_batch(body: bytes) -> tuple[list[UsageReport], list[RefusedReport]]:
    """A batch's valid reports and its refused ones. The whole batch is validated at once
    (pydantic's fast path, every batch of an honest agent); only when that fails is each
    report validated on its own. Raises ``ValidationError`` only for what is no batch at
    all (not JSON, no list of 1 to ``MAX_BATCH`` objects), and ``NewerAgentError``."""
    try:
        return UsageBatch.model_validate_json(body).reports, []
    except ValidationError:
        pass
    return validate_each(RawUsageBatch.model_validate_json(body).reports)
