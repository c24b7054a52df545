"""An InferenceDeployment's status, computed from what the operator observed.

Pure: the scaler calls ``compute`` every tick and writes the result only when it changed,
so an idle fleet costs no API writes. The result is the typed status model, serialised
once, at the client boundary. A condition keeps the ``lastTransitionTime`` of the status
last written as long as its own status does not flip (as ``meta.SetStatusCondition``
does). Conditions follow the Kubernetes conventions:

- ``Ready``: serving now (at least one ready replica); False says why not.
- ``ScaledToZero``: no replicas by design; the next request starts one.
- ``Degraded``: something needs the user: ``InvalidSpec``, ``PlanNotGranted``,
  ``Unschedulable``, ``ColdStartTimeout``, ``MaxReplicasReached`` (False with
  ``AsExpected`` otherwise).
- ``ApiKeysAccepted`` (deployments with ``spec.auth``, or all where the platform requires
  keys): every entry of the key Secret is an acceptable key, whose SHA-256 digest is in
  ``status.auth``. False names the problem (``ApiKeySecretNotFound``, ``NoApiKeys``,
  ``TooManyApiKeys``, ``ApiKeysRefused``, ``ApiKeysRequired``), with ``Degraded`` saying
  the same: refused keys are never accepted, the others still are.
- ``PlanGranted``: the plan that prices the deployment is one the platform grants its
  namespace. False (``NotGranted``, with ``Degraded``/``PlanNotGranted``): the deployment
  is not woken from zero, and its usage while running is priced at the namespace's
  default plan, never at zero.
"""

from __future__ import annotations

from payper.api.common import Condition
from payper.api.inference_deployment import (
    API_KEYS_ACCEPTED,
    DEGRADED,
    GPU_PRODUCT_LABEL,
    PLAN_GRANTED,
    READY,
    SCALED_TO_ZERO,
    AuthStatus,
    ColdStartPhases,
    ColdStartStatus,
    InferenceDeploymentStatus,
)
from payper.billing.config import PlanChoice
from payper.clock import iso, seconds
from payper.observed import PodView
from payper.operator import apikeys
from payper.operator.state import Tracked

LAST_REQUEST_RESOLUTION_MS = 5_000
"""lastRequestTime moves in steps of 5 s, so busy deployments do not write status every tick."""


def _degraded(
    tracked: Tracked,
    pods: list[PodView],
    now_ms: int,
    plan: PlanChoice | None,
    keys: tuple[bool, str, str] | None,
) -> tuple[str, str] | None:
    if tracked.invalid is not None:
        return "InvalidSpec", tracked.invalid
    if plan is not None and not plan.granted:
        return "PlanNotGranted", _not_granted(tracked, plan)
    if keys is not None and not keys[0]:
        return keys[1], keys[2]
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


def _not_granted(tracked: Tracked, plan: PlanChoice) -> str:
    return (
        f"spec.billing.plan {plan.requested!r} is not granted to namespace "
        f"{tracked.namespace} (allowed: {', '.join(plan.allowed)}): the deployment is not "
        f"woken from zero, and usage while it runs is priced at the namespace's default plan "
        f"{plan.name!r}; choose an allowed plan or ask the platform team for a grant."
    )


def _plan_granted(tracked: Tracked, plan: PlanChoice | None) -> tuple[bool, str, str] | None:
    if plan is None:
        return None  # an invalid spec names no plan; Degraded says why
    if not plan.granted:
        return False, "NotGranted", _not_granted(tracked, plan)
    chosen = "the namespace's default plan" if plan.requested is None else "plan"
    return True, "Granted", f"{chosen} {plan.name!r} prices this deployment's usage"


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


def api_keys(
    tracked: Tracked, keys: apikeys.KeyCheck | None, keys_required: bool
) -> tuple[AuthStatus | None, tuple[bool, str, str] | None]:
    """What status.auth publishes, and the ApiKeysAccepted condition (None: no keys asked).

    ``keys``: the check of the Secret ``spec.auth`` names (None: no such Secret seen).
    """
    spec = tracked.spec
    if spec is None:
        return None, None  # an invalid spec is not served at all; Degraded says why
    if spec.auth is None:
        return None, apikeys.required_but_unset() if keys_required else None
    check = keys if keys is not None else apikeys.missing()
    auth = AuthStatus(secret_name=spec.auth.secret_name, key_digests=list(check.digests))
    return auth, apikeys.describe(check, spec.auth.secret_name)


def compute(
    tracked: Tracked,
    pods: list[PodView],
    url: str,
    now_ms: int,
    plan: PlanChoice | None,
    keys: apikeys.KeyCheck | None = None,
    keys_required: bool = False,
) -> InferenceDeploymentStatus:
    """``plan``: how the deployment is priced (None while its spec is invalid); ``keys``:
    the check of its API key Secret; ``keys_required``: the platform requires keys."""
    live = [p for p in pods if not p.deleting]
    ready = sum(1 for p in live if p.ready)
    desired = tracked.replicas or 0
    auth, keys_condition = api_keys(tracked, keys, keys_required)
    degraded = _degraded(tracked, pods, now_ms, plan, keys_condition)

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
    granted = _plan_granted(tracked, plan)
    if granted is not None:
        conditions.append(_condition(tracked, PLAN_GRANTED, *granted, now_ms))
    if keys_condition is not None:
        conditions.append(_condition(tracked, API_KEYS_ACCEPTED, *keys_condition, now_ms))
    last_request = tracked.last_request_ms
    return InferenceDeploymentStatus(
        conditions=conditions,
        observed_generation=tracked.generation,
        replicas=len(live),
        ready_replicas=ready,
        desired_replicas=desired,
        url=url,
        auth=auth,
        last_request_time=(
            None
            if last_request is None
            else iso(last_request // LAST_REQUEST_RESOLUTION_MS * LAST_REQUEST_RESOLUTION_MS)
        ),
        last_cold_start_seconds=(
            None if tracked.last_cold_start_ms is None else seconds(tracked.last_cold_start_ms)
        ),
        last_cold_start=(
            None
            if tracked.last_cold_start is None
            else ColdStartStatus(
                pod=tracked.last_cold_start.pod,
                phases_ms=ColdStartPhases(**tracked.last_cold_start.phases),
            )
        ),
    )
