"""The autoscaler's decision: how many replicas a deployment should have right now.

``decide`` is a pure function of the scaling policy, one observation (replicas,
readiness, demand from the gateways) and the recent history, so every rule is a row in a
unit-test table. Each deployment's history (its windows) lives in one ``History`` that
only ``History.decide`` extends and trims, so the controller keeps no window state:

- desired = ceil(concurrency / targetConcurrency), clamped to [minReplicas, maxReplicas];
- a burst scales up at once: the short *panic* window's average counts as soon as it
  exceeds the long *stable* window's;
- a lull scales down slowly: a lower recommendation only takes effect once it has held
  for ``scaleDownDelaySeconds`` (the highest recommendation of that window wins);
- a held request scales a deployment at zero to one immediately (the gateway's poke);
- scale to zero only after ``idleTimeoutSeconds`` without requests and nothing in flight;
- never remove replicas while one is still cold-starting (the ReplicaSet controller
  would delete the starting pod first, wasting its cold start), unless its start is
  overdue (past ``coldStartTimeoutSeconds``).

Which replicas go is the ReplicaSet controller's choice; ``deletion_costs`` steers it:
before a scale-down every serving pod carries its requests in flight (summed over the
gateways) as its pod-deletion-cost, so idle pods are deleted first and streams keep
their pods.

Times are integer milliseconds.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from payper.api.inference_deployment import ScalingSpec


class Reason(StrEnum):
    SCALE_FROM_ZERO = "ScaleFromZero"
    DEMAND = "Demand"
    SCALE_DOWN_DELAY = "ScaleDownDelay"
    IDLE_TIMEOUT = "IdleTimeout"
    WAITING_FOR_IDLE_TIMEOUT = "WaitingForIdleTimeout"
    COLD_START_IN_PROGRESS = "ColdStartInProgress"
    MIN_REPLICAS = "MinReplicas"
    MAX_REPLICAS = "MaxReplicas"
    IDLE = "Idle"
    PLAN_NOT_GRANTED = "PlanNotGranted"
    """Set by the controller: a deployment whose plan is not granted is not woken."""


@dataclass(frozen=True)
class Windows:
    """Operator-wide averaging windows (Knative's defaults: 60 s stable, 6 s panic)."""

    stable_ms: int = 60_000
    panic_ms: int = 6_000


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target_concurrency: int
    idle_timeout_ms: int
    scale_down_delay_ms: int

    @classmethod
    def from_spec(cls, scaling: ScalingSpec) -> Policy:
        return cls(
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            target_concurrency=scaling.target_concurrency,
            idle_timeout_ms=scaling.idle_timeout_seconds * 1000,
            scale_down_delay_ms=scaling.scale_down_delay_seconds * 1000,
        )


@dataclass(frozen=True)
class Sample:
    """Concurrency (in flight + queued, summed over gateways) at one tick."""

    at_ms: int
    concurrency: int


@dataclass(frozen=True)
class Recommendation:
    """Replicas the demand asked for at one tick (kept for the scale-down delay)."""

    at_ms: int
    replicas: int


@dataclass(frozen=True)
class Observation:
    now_ms: int
    current: int
    """Replicas the Deployment asks for now (its ``spec.replicas``)."""
    starting: int
    """Replicas still cold-starting within their cold-start timeout."""
    in_flight: int
    queued: int
    last_request_ms: int | None
    """When the last request arrived; None if none was ever seen."""


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: Reason
    wanted: int
    """What demand alone asks for, before the [min, max] bounds."""

    @property
    def limited_by_max(self) -> bool:
        return self.reason == Reason.MAX_REPLICAS


def _average(samples: Sequence[Sample], since_ms: int, fallback: int) -> float:
    window = [s.concurrency for s in samples if s.at_ms > since_ms]
    return sum(window) / len(window) if window else float(fallback)


def recommend(policy: Policy, windows: Windows, obs: Observation, samples: Sequence[Sample]) -> int:
    """Replicas the demand asks for (unbounded), from the faster of the two windows."""
    now_concurrency = obs.in_flight + obs.queued
    stable = _average(samples, obs.now_ms - windows.stable_ms, now_concurrency)
    panic = _average(samples, obs.now_ms - windows.panic_ms, now_concurrency)
    wanted = math.ceil(max(stable, panic) / policy.target_concurrency)
    if obs.queued > 0:
        wanted = max(wanted, 1)
    return wanted


def decide(
    policy: Policy,
    windows: Windows,
    obs: Observation,
    samples: Sequence[Sample],
    recent: Sequence[Recommendation],
) -> Decision:
    """The replicas to run now.

    ``samples``: concurrency history (the current tick included). ``recent``: earlier
    recommendations, used for the scale-down delay.
    """
    wanted = recommend(policy, windows, obs, samples)
    idle = obs.in_flight == 0 and obs.queued == 0
    idle_for = None if obs.last_request_ms is None else obs.now_ms - obs.last_request_ms

    if obs.current == 0 and obs.queued > 0:
        return _bounded(policy, max(wanted, 1), wanted, Reason.SCALE_FROM_ZERO)

    if idle and (idle_for is None or idle_for >= policy.idle_timeout_ms):
        target, reason = 0, Reason.IDLE_TIMEOUT if obs.current > 0 else Reason.IDLE
    else:
        held = [r.replicas for r in recent if r.at_ms > obs.now_ms - policy.scale_down_delay_ms]
        target = max([wanted, *held])
        reason = Reason.SCALE_DOWN_DELAY if target > wanted else Reason.DEMAND
        if target == 0 and obs.current > 0:
            target, reason = 1, Reason.WAITING_FOR_IDLE_TIMEOUT

    decision = _bounded(policy, target, wanted, reason)
    if decision.desired < obs.current and obs.starting > 0:
        return Decision(obs.current, Reason.COLD_START_IN_PROGRESS, wanted)
    return decision


def _bounded(policy: Policy, target: int, wanted: int, reason: Reason) -> Decision:
    if target > policy.max_replicas:
        return Decision(policy.max_replicas, Reason.MAX_REPLICAS, wanted)
    if target < policy.min_replicas:
        return Decision(policy.min_replicas, Reason.MIN_REPLICAS, wanted)
    return Decision(target, reason, wanted)


HISTORY = 4096
"""At most this many samples and recommendations per deployment (a tick a second: more
than an hour), whatever the windows: memory per deployment stays bounded."""


@dataclass
class History:
    """One deployment's scaler windows: concurrency over the stable window and
    recommendations over the scale-down delay."""

    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=HISTORY))
    recommendations: deque[Recommendation] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def seed(self, at_ms: int, replicas: int) -> None:
        """After a restart: the running size counts as a recent recommendation, so the
        scale-down delay starts over instead of shrinking a warm deployment at once."""
        self.recommendations.append(Recommendation(at_ms, replicas))

    def decide(self, policy: Policy, windows: Windows, obs: Observation) -> Decision:
        """Record this tick's concurrency, forget what left the windows, decide, and
        remember the recommendation."""
        self.samples.append(Sample(obs.now_ms, obs.in_flight + obs.queued))
        while self.samples and self.samples[0].at_ms <= obs.now_ms - windows.stable_ms:
            self.samples.popleft()
        delay = policy.scale_down_delay_ms
        while self.recommendations and self.recommendations[0].at_ms <= obs.now_ms - delay:
            self.recommendations.popleft()
        decision = decide(policy, windows, obs, self.samples, self.recommendations)
        self.recommendations.append(Recommendation(obs.now_ms, decision.wanted))
        return decision


MAX_DELETION_COST = 1_000_000
"""In-flight counts above this all mark a pod as busy as can be (the annotation is an
int32; past this, more precision spares no stream)."""
MAX_COST_PATCHES = 100
"""Pods whose deletion cost one scale-down sets, at most (a deployment has up to 1000)."""


def deletion_costs(current: Mapping[str, int], in_flight: Mapping[str, int]) -> dict[str, int]:
    """The pod-deletion-costs to set before a scale-down: pod name -> cost, only where it
    changes, at most ``MAX_COST_PATCHES``.

    ``current``: each serving pod's cost now; ``in_flight``: requests in flight per pod,
    summed over the gateways. A pod's cost is its requests in flight, so the ReplicaSet
    controller deletes the idlest pods first. Past the bound, the busiest pods are marked
    first (they hold the streams), then idle pods' stale costs are cleared.
    """
    changes = [
        (cost, pod)
        for pod, now in current.items()
        if (cost := min(in_flight.get(pod, 0), MAX_DELETION_COST)) != now
    ]
    changes.sort(key=lambda change: (-change[0], change[1]))
    return {pod: cost for cost, pod in changes[:MAX_COST_PATCHES]}
