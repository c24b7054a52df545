"""Cold starts broken into phases, so that a slow one says where its time went.

Scale-to-zero is only as good as its cold starts, and a total ("it took 41 s") does not
say whether to fix the image (pull), the node pool (scheduling), or the model server
(readiness). Each cold start is cut at these marks:

    held -> created -> scheduled -> image ready -> started -> Ready -> first byte

- ``held``: the scale-up from zero was decided (a gateway's poke for a held request
  wakes the deployment at once);
- ``created``, ``scheduled``, ``started`` (every regular container running), ``ready``:
  the operator's clock when its pod watch first shows each (object timestamps have
  one-second resolution; the watch is milliseconds behind);
- ``image ready``: the kubelet's own measurement of the pull, from its ``Pulled`` event
  ("Successfully pulled image ... in 1.234s", or "already present on machine": 0),
  which splits scheduled -> started into *image* and *start* (sandbox, container);
  where the kubelet reports no pull, *image* is None and *start* is the whole span;
- ``first byte``: the gateway's cold-start total (the ``X-Payper-Cold-Start-Ms`` it
  sent) minus held -> Ready as the operator saw it: the time for the gateway to learn of
  the ready pod and forward to it. Every phase is a difference of two times taken on one
  clock; none mixes the gateway's clock with the operator's.

A phase that could not be measured (no ``Pulled`` event on a node that reports none,
such as kwok's, or no gateway report yet) is None, never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

from payper.observed import PodView

PHASES = ("create", "schedule", "image", "start", "ready", "forward")
"""held->created, created->scheduled, scheduled->image ready, image ready->started,
started->Ready, Ready->first byte forwarded."""

FORWARD_REPORT_WINDOW_MS = 60_000
"""A gateway's cold-start total counts for the last cold start only if that one became
ready this recently (reports are sent every second; an older one is not this one's)."""

MAX_TRACKED_PODS = 64
"""Pods followed per cold start (a scale-up from zero to more replicas than this follows
the first ones; the first to be ready is the one that ends the cold start)."""

_GO_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PULLED = re.compile(r" in ((?:[0-9]+(?:\.[0-9]+)?(?:ns|us|µs|ms|s|m|h))+)")


def go_duration_ms(text: str) -> int | None:
    """Milliseconds of a Go duration string ("1.5s", "2m3.25s", "532ms"), rounded; None
    if ``text`` is not one."""
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    total = sum((Decimal(n) * Decimal(str(_UNIT_MS[u])) for n, u in parts), Decimal(0))
    return int(total.to_integral_value(rounding=ROUND_HALF_UP))


def pull_ms(message: str) -> int | None:
    """How long the kubelet's ``Pulled`` event says the pull took (0: already present)."""
    if "already present on machine" in message:
        return 0
    match = _PULLED.search(message)
    return go_duration_ms(match.group(1)) if match else None


@dataclass
class PodMarks:
    created_ms: int
    scheduled_ms: int | None = None
    started_ms: int | None = None
    ready_ms: int | None = None
    pull_ms: int | None = None


@dataclass
class ColdStart:
    """One scale-up from zero, from the decision until its first pod is ready."""

    held_ms: int
    pods: dict[str, PodMarks] = field(default_factory=dict)

    def observe(self, pod: PodView, now_ms: int) -> PodMarks | None:
        """Note what ``pod`` shows for the first time; its marks (None: not followed)."""
        marks = self.pods.get(pod.uid)
        if marks is None:
            if len(self.pods) >= MAX_TRACKED_PODS or pod.deleting:
                return None
            # A pod created before the decision (a replica being deleted, say) is not
            # this cold start's.
            if pod.created_ms and pod.created_ms < self.held_ms - 1000:
                return None
            marks = self.pods[pod.uid] = PodMarks(created_ms=now_ms)
        if marks.scheduled_ms is None and pod.node:
            marks.scheduled_ms = now_ms
        if marks.started_ms is None and pod.started:
            marks.started_ms = now_ms
        if marks.ready_ms is None and pod.ready:
            marks.ready_ms = now_ms
        return marks

    def phases(self, uid: str) -> dict[str, int | None]:
        """The phases up to Ready of one pod (``forward`` comes from the gateway)."""
        marks = self.pods[uid]
        image = marks.pull_ms
        scheduled_to_started = _between(marks.scheduled_ms, marks.started_ms)
        start = None
        if image is not None and scheduled_to_started is not None:
            image = min(image, scheduled_to_started)  # the pull happens in that span
            start = scheduled_to_started - image
        return {
            "create": _between(self.held_ms, marks.created_ms),
            "schedule": _between(marks.created_ms, marks.scheduled_ms),
            "image": image,
            "start": start if image is not None else scheduled_to_started,
            "ready": _between(marks.started_ms, marks.ready_ms),
            "forward": None,
        }


@dataclass
class FinishedColdStart:
    """A cold start that reached a ready pod; its image and forward phases may still be
    filled in (the kubelet's Pulled event, the gateway's report), each once."""

    pod: str
    uid: str
    trace: ColdStart
    ready_at_ms: int
    held_to_ready_ms: int
    phases: dict[str, int | None]
    pull_checked: bool = False
    forward_known: bool = False

    @classmethod
    def of(cls, trace: ColdStart, pod: PodView) -> FinishedColdStart:
        marks = trace.pods[pod.uid]
        assert marks.ready_ms is not None
        return cls(
            pod.name,
            pod.uid,
            trace,
            marks.ready_ms,
            marks.ready_ms - trace.held_ms,
            trace.phases(pod.uid),
        )

    def add_pull(self, pulled_ms: int | None) -> None:
        """The kubelet's pull time (None: it reported none), splitting scheduled -> started."""
        self.trace.pods[self.uid].pull_ms = pulled_ms
        self.phases = {**self.trace.phases(self.uid), "forward": self.phases["forward"]}
        self.pull_checked = True

    def add_forward(self, gateway_total_ms: int) -> None:
        """The gateway's cold-start total: forward is what it adds to held -> Ready."""
        self.phases = {**self.phases, "forward": max(0, gateway_total_ms - self.held_to_ready_ms)}
        self.forward_known = True


def _between(start: int | None, end: int | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, end - start)
