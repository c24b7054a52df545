"""An InferenceDeployment's status, computed from what the operator observed.

Pure: the scaler calls ``compute`` every tick and writes the result only when it changed,
so an idle fleet costs no API writes. The result is the typed status model, serialised
once, at the client boundary. A condition keeps the ``lastTransitionTime`` of the status
last written as long as its own status does not flip (as ``meta.SetStatusCondition``
does). Conditions follow the Kubernetes conventions:

- ``Ready``: serving now (at least one ready replica); False says why not.
- ``ScaledToZero``: no replicas by design; the next request starts one.
- ``Degraded``: something needs the user: ``InvalidSpec``, ``Unschedulable``,
  ``ColdStartTimeout``, ``MaxReplicasReached`` (False with ``AsExpected`` otherwise).
- ``PlanKnown``: ``spec.billing.plan`` exists in the operator's configuration. False
  (``UnknownPlan``) does not stop metering: usage is still recorded, priced at zero.
"""

from __future__ import annotations

from collections.abc import Collection

from payper.api.common import Condition
from payper.api.inference_deployment import (
    DEGRADED,
    GPU_PRODUCT_LABEL,
    PLAN_KNOWN,
    READY,
    SCALED_TO_ZERO,
    InferenceDeploymentStatus,
)
from payper.clock import iso, seconds
from payper.observed import PodView
from payper.operator.state import Tracked

LAST_REQUEST_RESOLUTION_MS = 5_000
"""lastRequestTime moves in steps of 5 s, so busy deployments do not write status every tick."""


def _degraded(tracked: Tracked, pods: list[PodView], now_ms: int) -> tuple[str, str] | None:
    if tracked.invalid is not None:
        return "InvalidSpec", tracked.invalid
    spec = tracked.spec
    live = [p for p in pods if not p.deleting]
    for pod in live:
        if pod.unschedulable:
            detail = f"spec.gpu asks for {spec.gpu.count} x {spec.gpu.resource}" if spec else ""
            if spec is not None and spec.gpu.product:
                detail += f" on nodes labelled {GPU_PRODUCT_LABEL}={spec.gpu.product}"
            return (
                "Unschedulable",
                f"pod {pod.name} cannot be scheduled: {pod.unschedulable} ({detail}). Free GPUs, "
                "add nodes, or change spec.gpu.",
            )
    if spec is not None:
        for pod in live:
            if not pod.ready and now_ms - pod.created_ms > tracked.cold_start_timeout_ms:
                return (
                    "ColdStartTimeout",
                    f"pod {pod.name} is not ready after coldStartTimeoutSeconds "
                    f"({spec.scaling.cold_start_timeout_seconds}s): check its image, readiness "
                    f"probe and logs (kubectl logs -n {tracked.namespace} {pod.name}).",
                )
    decision = tracked.last_decision
    if (
        decision is not None
        and decision.limited_by_max
        and spec is not None
        and decision.wanted > spec.scaling.max_replicas
    ):
        return (
            "MaxReplicasReached",
            f"demand needs {decision.wanted} replicas but maxReplicas is "
            f"{spec.scaling.max_replicas}: requests queue longer; raise "
            "spec.scaling.maxReplicas to serve them.",
        )
    return None


def _plan_known(tracked: Tracked, known_plans: Collection[str]) -> tuple[bool, str, str] | None:
    if tracked.spec is None:
        return None  # an invalid spec names no plan; Degraded says why
    plan = tracked.spec.billing.plan
    if plan in known_plans:
        return True, "Configured", f"plan {plan!r} prices this deployment's usage"
    return (
        False,
        "UnknownPlan",
        f"spec.billing.plan {plan!r} is not in the operator's configuration (configured: "
        f"{', '.join(sorted(known_plans))}): usage is still recorded, priced at zero; "
        "configure the plan or change spec.billing.plan.",
    )


def _condition(
    tracked: Tracked, type_: str, status: bool, reason: str, message: str, now_ms: int
) -> Condition:
    value = "True" if status else "False"
    before = tracked.written_status.condition(type_) if tracked.written_status else None
    return Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=(
            before.last_transition_time
            if before is not None and before.status == value
            else iso(now_ms)
        ),
        observed_generation=tracked.generation,
    )


def compute(
    tracked: Tracked,
    pods: list[PodView],
    url: str,
    now_ms: int,
    known_plans: Collection[str],
) -> InferenceDeploymentStatus:
    live = [p for p in pods if not p.deleting]
    ready = sum(1 for p in live if p.ready)
    desired = tracked.replicas or 0
    degraded = _degraded(tracked, pods, now_ms)

    if ready > 0:
        ready_condition = (True, "Serving", f"{ready} of {desired} replicas ready")
    elif degraded is not None:
        ready_condition = (False, degraded[0], degraded[1])
    elif desired == 0:
        ready_condition = (False, "ScaledToZero", "no replicas; the next request starts one")
    else:
        ready_condition = (False, "ColdStarting", f"{desired} replicas starting, none ready yet")

    if desired == 0 and not live:
        zero = (True, "Idle", "scaled to zero: no requests within idleTimeoutSeconds")
    elif desired == 0:
        zero = (False, "ScalingToZero", f"{len(live)} replicas stopping")
    else:
        zero = (False, "Active", f"{desired} replicas requested")

    conditions = [
        _condition(tracked, READY, *ready_condition, now_ms),
        _condition(tracked, SCALED_TO_ZERO, *zero, now_ms),
        _condition(
            tracked,
            DEGRADED,
            *((True, *degraded) if degraded else (False, "AsExpected", "")),
            now_ms,
        ),
    ]
    plan_known = _plan_known(tracked, known_plans)
    if plan_known is not None:
        conditions.append(_condition(tracked, PLAN_KNOWN, *plan_known, now_ms))
    last_request = tracked.last_request_ms
    return InferenceDeploymentStatus(
        conditions=conditions,
        observed_generation=tracked.generation,
        replicas=len(live),
        ready_replicas=ready,
        desired_replicas=desired,
        url=url,
        last_request_time=(
            None
            if last_request is None
            else iso(last_request // LAST_REQUEST_RESOLUTION_MS * LAST_REQUEST_RESOLUTION_MS)
        ),
        last_cold_start_seconds=(
            None if tracked.last_cold_start_ms is None else seconds(tracked.last_cold_start_ms)
        ),
    )
