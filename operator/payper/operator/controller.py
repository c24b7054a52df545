"""The operator's core: children, the autoscaler loop, status, cold starts.

kopf handlers (``payper.operator.handlers``) and the demand endpoints call in here; this
module decides and writes through ``payper.kube``. One loop ticks for every deployment
(a thousand deployments cost one tick, not a thousand timers); a gateway's poke
evaluates its deployment at once instead of waiting for the tick.

Restart safety: a deployment seen again after a restart keeps its current replicas,
treats the restart as its last request, and seeds the scale-down history with its
current size, so the restart itself never scales anything down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from payper.api.common import API_VERSION, field_errors
from payper.api.inference_deployment import PLURAL, InferenceDeploymentSpec
from payper.billing.config import PlanChoice
from payper.billing.events import BillingEvents
from payper.clock import now_ms
from payper.kube import ApiError, Kube, resource_path
from payper.observed import DELETION_COST_ANNOTATION, Key, PodView
from payper.operator import apikeys, builders, metrics, status
from payper.operator.autoscaler import (
    Decision,
    Observation,
    Policy,
    Reason,
    Windows,
    deletion_costs,
)
from payper.operator.coldstart import (
    FORWARD_REPORT_WINDOW_MS,
    ColdStart,
    FinishedColdStart,
    pull_ms,
)
from payper.operator.config import OperatorConfig
from payper.operator.state import DemandStore, DemandTotals, Registry, Tracked

logger = logging.getLogger(__name__)
FIELD_MANAGER = "payper-operator"


class InvalidSpec(Exception):  # noqa: N818 - a state of the object, reported as a condition
    pass


def _spec_error(error: ValidationError) -> str:
    return "spec." + field_errors(error, root="")[0]


class Controller:
    def __init__(
        self, kube: Kube, config: OperatorConfig, clock: Callable[[], int] = now_ms
    ) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock  # wall-clock ms, injected as the ledger's is
        self.registry = Registry()
        self.demand = DemandStore(int(config.autoscaler.demand_expiry_seconds * 1000))
        self.billing = BillingEvents()
        self.key_secrets_synced: Callable[[], bool] = lambda: True
        """Whether every API key Secret has been seen: until then, no status of a deployment
        with spec.auth is written (it would publish no digests and lock its clients out)."""
        self.windows = Windows(
            stable_ms=config.autoscaler.stable_window_seconds * 1000,
            panic_ms=config.autoscaler.panic_window_seconds * 1000,
        )

    # -- children ------------------------------------------------------------------
    async def reconcile(self, body: Mapping[str, Any], resumed: bool) -> None:
        """Create or update the Deployment and Service of one InferenceDeployment."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        tracked = self.registry.get(key)
        if tracked is None or tracked.uid != meta["uid"]:
            tracked = Tracked(
                meta["namespace"], meta["name"], meta["uid"], meta.get("generation", 0)
            )
            self.registry.tracked[key] = tracked
        async with tracked.lock:
            tracked.generation = meta.get("generation", 0)
            tracked.dirty = True
            try:
                spec = InferenceDeploymentSpec.model_validate(body.get("spec", {}))
                if spec.serving_port() is None:
                    raise InvalidSpec(
                        "spec.port is required when no container declares a containerPort"
                    )
            except ValidationError as error:
                tracked.spec, tracked.invalid = None, _spec_error(error)
                return
            except InvalidSpec as error:
                tracked.spec, tracked.invalid = None, str(error)
                return
            tracked.spec, tracked.invalid = spec, None
            tracked.policy = Policy.from_spec(spec.scaling)
            if tracked.replicas is None:
                await self._recover(tracked, resumed)
            await self._apply_children(tracked)

    def plan_of(self, tracked: Tracked) -> PlanChoice | None:
        """How the deployment is priced; None while its spec is invalid."""
        if tracked.spec is None:
            return None
        return self.config.billing.plan_for(
            tracked.namespace,
            self.registry.labels_of(tracked.namespace),
            tracked.spec.billing.plan,
        )

    def _may_wake(self, tracked: Tracked) -> bool:
        """A deployment whose plan is not granted stays at zero (it keeps running if it
        already is: a revoked grant does not cut a tenant off mid-request)."""
        plan = self.plan_of(tracked)
        return plan is None or plan.granted

    async def _recover(self, tracked: Tracked, resumed: bool) -> None:
        assert tracked.spec is not None
        existing = await self.kube.get_or_none(
            resource_path("apps/v1", "deployments", tracked.namespace, tracked.name)
        )
        if existing is None:
            tracked.replicas = tracked.spec.scaling.min_replicas if self._may_wake(tracked) else 0
            return
        tracked.replicas = int(existing.get("spec", {}).get("replicas", 0))
        if tracked.replicas > 0:
            at = self.clock()
            tracked.last_request_ms = at
            tracked.history.seed(at, tracked.replicas)
        logger.info(
            "%s/%s: recovered at %d replicas%s",
            *tracked.key,
            tracked.replicas,
            " after a restart" if resumed else "",
        )

    async def _apply_children(self, tracked: Tracked) -> None:
        assert tracked.spec is not None and tracked.replicas is not None
        ns, name, uid = tracked.namespace, tracked.name, tracked.uid
        try:
            fence = self.config.tenant_fence
            if fence.enabled:  # before the pods: none ever runs unfenced
                await self.kube.apply(
                    resource_path("networking.k8s.io/v1", "networkpolicies", ns, name),
                    builders.network_policy(
                        name,
                        ns,
                        uid,
                        tracked.spec,
                        fence.gateway_namespace,
                        fence.gateway_pod_labels,
                        fence.allow_from,
                    ),
                    FIELD_MANAGER,
                )
            service_path = resource_path("v1", "services", ns, name)
            if tracked.spec.service.enabled:
                await self.kube.apply(
                    service_path, builders.service(name, ns, uid, tracked.spec), FIELD_MANAGER
                )
            else:
                await self._delete_own_service(service_path, uid)
            await self._apply_deployment(tracked, tracked.replicas)
        except ApiError as error:
            if error.status in (400, 422):
                tracked.invalid = f"the API server rejected the workload: {error.message}"
                return
            raise

    async def _delete_own_service(self, path: str, uid: str) -> None:
        """Delete the Service this deployment's operator made, never a tenant's own Service
        of the same name (owner checked, and the delete preconditioned on its UID)."""
        existing = await self.kube.get_or_none(path)
        if existing is None:
            return
        meta = existing["metadata"]
        if not any(ref.get("uid") == uid for ref in meta.get("ownerReferences") or []):
            return
        try:
            await self.kube.delete(path, body={"preconditions": {"uid": meta["uid"]}})
        except ApiError as error:
            if not error.conflict:  # 409: replaced meanwhile, by someone else's Service
                raise

    async def _apply_deployment(self, tracked: Tracked, replicas: int) -> None:
        assert tracked.spec is not None
        manifest = builders.deployment(
            tracked.name, tracked.namespace, tracked.uid, tracked.spec, replicas
        )
        await self.kube.apply(
            resource_path("apps/v1", "deployments", tracked.namespace, tracked.name),
            manifest,
            FIELD_MANAGER,
        )

    def forget(self, key: Key) -> None:
        self.registry.tracked.pop(key, None)
        for gauge in (metrics.DESIRED_REPLICAS, metrics.IN_FLIGHT):
            with contextlib.suppress(KeyError):
                gauge.remove(*key)

    # -- namespaces --------------------------------------------------------------------
    def observe_namespace(self, obj: Mapping[str, Any], deleted: bool) -> None:
        """Namespace labels select plan grants: a relabelled namespace re-prices and
        re-evaluates its deployments. A namespace being deleted is one the ledger moves
        open records out of."""
        meta = obj["metadata"]
        ending = deleted or bool(meta.get("deletionTimestamp"))
        labels = None if ending else dict(meta.get("labels") or {})
        if self.registry.observe_namespace(meta["name"], labels):
            for tracked in self.registry:
                if tracked.namespace == meta["name"]:
                    tracked.dirty = True

    # -- API key Secrets ------------------------------------------------------------
    def observe_key_secret(self, obj: Mapping[str, Any], deleted: bool) -> None:
        """An API key Secret changed: check it (only digests are kept) and mark the
        deployments that name it, so the next tick publishes their digests."""
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        if deleted:
            self.registry.key_secrets.pop(key, None)
        else:
            self.registry.key_secrets[key] = apikeys.check_secret(obj)
        for tracked in self.registry:
            spec = tracked.spec
            if (
                tracked.namespace == key[0]
                and spec is not None
                and spec.auth is not None
                and spec.auth.secret_name == key[1]
            ):
                tracked.dirty = True

    def keys_of(self, tracked: Tracked) -> apikeys.KeyCheck | None:
        spec = tracked.spec
        if spec is None or spec.auth is None:
            return None
        return self.registry.key_secrets.get((tracked.namespace, spec.auth.secret_name))

    # -- pods ------------------------------------------------------------------------
    def observe_pod(self, obj: Mapping[str, Any], deleted: bool) -> None:
        """Every pod: billing attributes GPU time to any of them (by owner chain); those
        labelled for an InferenceDeployment also drive its scaling and status."""
        pod = PodView.from_object(obj)
        label_key = (pod.namespace, pod.deployment) if pod.deployment is not None else None
        former = self.registry.all_pods.get(pod.uid)
        self.registry.observe_pod(pod, label_key, deleted)
        if deleted and pod.scheduled_ms is not None and pod.gpus > 0:
            end = min(pod.deleting_since_ms or self.clock(), self.clock())
            self.billing.ended_pods.append((pod, end))
        if former is not None and former.deployment not in (None, pod.deployment):
            relabelled_from = self.registry.get((former.namespace, former.deployment))
            if relabelled_from is not None:
                relabelled_from.dirty = True
        if label_key is None:
            return
        key = label_key
        tracked = self.registry.get(key)
        if tracked is None:
            return
        tracked.dirty = True
        trace = tracked.cold_start
        if trace is not None and not deleted:
            marks = trace.observe(pod, self.clock())
            if marks is not None and marks.ready_ms is not None and pod.serving:
                tracked.last_cold_start = FinishedColdStart.of(trace, pod)
                tracked.cold_start = None
        if tracked.scale_from_zero_ms is None:
            return
        if any(p.ready and not p.deleting for p in self.registry.pods_of(key)):
            duration = self.clock() - tracked.scale_from_zero_ms
            tracked.scale_from_zero_ms = None
            tracked.last_cold_start_ms = duration
            metrics.COLD_START_DURATION.labels(*key).observe(duration / 1000)
            metrics.COLD_STARTS.labels(*key).inc()
            self.billing.cold_starts[key] = self.billing.cold_starts.get(key, 0) + 1
            logger.info("%s/%s: cold start took %d ms", *key, duration)

    # -- autoscaling -----------------------------------------------------------------
    async def wake(self, key: Key) -> Tracked | None:
        """A gateway holds a request for ``key``: evaluate it now. None if unknown."""
        tracked = self.registry.get(key)
        if tracked is None:
            return None
        at = self.clock()
        await self.evaluate(tracked, self.demand.totals_for(key, at), at)
        return tracked

    async def tick(self) -> None:
        started = time.perf_counter()
        at = self.clock()
        totals = self.demand.aggregate(at)
        idle = DemandTotals()
        for tracked in self.registry:
            try:
                await self._complete_cold_start(tracked)
                await self.evaluate(tracked, totals.get(tracked.key, idle), at)
            except ApiError as error:
                logger.warning("%s/%s: %s", *tracked.key, error)
        metrics.TICK_DURATION.observe(time.perf_counter() - started)

    async def _complete_cold_start(self, tracked: Tracked) -> None:
        """Once per finished cold start: its image pull from the kubelet's Pulled events
        (one list call), then its phases into the histogram (forward comes later, with
        the gateway's report)."""
        finished = tracked.last_cold_start
        if finished is None or finished.pull_checked:
            return
        pulled: int | None = None
        try:
            events = await self.kube.list(
                resource_path("v1", "events", tracked.namespace),
                {"fieldSelector": f"involvedObject.uid={finished.uid},reason=Pulled"},
            )
            pulls = [pull_ms(e.get("message") or "") for e in events.get("items", [])]
            known = [p for p in pulls if p is not None]
            pulled = sum(known) if known else None  # the kubelet pulls one image at a time
        except ApiError as error:
            logger.warning("%s/%s: no image pull time: %s", *tracked.key, error)
        finished.add_pull(pulled)
        for phase, ms in finished.phases.items():
            if ms is not None:
                metrics.COLD_START_PHASE.labels(*tracked.key, phase).observe(ms / 1000)
        tracked.dirty = True

    def observe_cold_start_total(self, key: Key, total_ms: int) -> None:
        """A gateway's cold-start total for ``key``'s last cold start: the forward phase."""
        tracked = self.registry.get(key)
        finished = tracked.last_cold_start if tracked is not None else None
        if tracked is None or finished is None or finished.forward_known:
            return
        if self.clock() - finished.ready_at_ms > FORWARD_REPORT_WINDOW_MS:
            return  # a cold start this operator did not follow (a restart during it)
        finished.add_forward(total_ms)
        ms = finished.phases["forward"]
        assert ms is not None
        metrics.COLD_START_PHASE.labels(*key, "forward").observe(ms / 1000)
        tracked.dirty = True

    async def evaluate(self, tracked: Tracked, demand: DemandTotals, at: int) -> None:
        if tracked.policy is None or tracked.replicas is None:
            await self._write_status(tracked, at)
            return
        if demand.last_request_ms is not None and demand.last_request_ms > (
            tracked.last_request_ms or 0
        ):
            tracked.last_request_ms = demand.last_request_ms
            tracked.dirty = True
        if demand.in_flight > 0:
            tracked.last_request_ms = at
        pods = self.registry.pods_of(tracked.key)
        busy = demand.in_flight > 0 or demand.queued > 0
        if not busy and not tracked.dirty and tracked.replicas == 0 and not pods:
            return  # the common case of a large fleet: idle at zero, nothing to do
        metrics.IN_FLIGHT.labels(*tracked.key).set(demand.in_flight)
        async with tracked.lock:
            policy = tracked.policy
            timeout_ms = tracked.cold_start_timeout_ms
            starting = sum(
                1
                for p in pods
                if not p.ready and not p.deleting and at - p.created_ms <= timeout_ms
            )
            observation = Observation(
                now_ms=at,
                current=tracked.replicas,
                starting=starting,
                in_flight=demand.in_flight,
                queued=demand.queued,
                last_request_ms=tracked.last_request_ms,
            )
            decision = tracked.history.decide(policy, self.windows, observation)
            if tracked.replicas == 0 and decision.desired > 0 and not self._may_wake(tracked):
                decision = Decision(0, Reason.PLAN_NOT_GRANTED, decision.wanted)
            tracked.last_decision = decision
            deferred = False
            if decision.desired != tracked.replicas and tracked.invalid is None:
                if decision.desired < tracked.replicas:
                    deferred = await self._spare_busy_pods(tracked, pods, demand)
                if not deferred:
                    await self._scale(tracked, decision, at)
            tracked.scale_down_deferred = deferred
            await self._write_status(tracked, at)

    async def _spare_busy_pods(
        self, tracked: Tracked, pods: list[PodView], demand: DemandTotals
    ) -> bool:
        """Before a scale-down: set each serving pod's deletion cost to its requests in
        flight, so the ReplicaSet controller deletes idle pods, not streams. Whether the
        scale-down waits a tick for the controller to see costs just set (once: the next
        tick goes ahead whatever changed meanwhile)."""
        serving = {p.name: p for p in pods if p.ready and not p.deleting}
        changes = deletion_costs(
            {name: pod.deletion_cost for name, pod in serving.items()}, demand.in_flight_by_pod
        )
        if not changes:
            return False
        await asyncio.gather(
            *(
                self._set_deletion_cost(tracked.namespace, serving[name], cost)
                for name, cost in changes.items()
            )
        )
        return not tracked.scale_down_deferred

    async def _set_deletion_cost(self, namespace: str, pod: PodView, cost: int) -> None:
        patch = {"metadata": {"uid": pod.uid, "annotations": {DELETION_COST_ANNOTATION: str(cost)}}}
        try:
            await self.kube.patch(resource_path("v1", "pods", namespace, pod.name), patch)
        except ApiError as error:  # gone or replaced: nothing to spare; else scale anyway
            if not (error.not_found or error.conflict):
                logger.warning("%s/%s: deletion cost not set: %s", namespace, pod.name, error)

    async def _scale(self, tracked: Tracked, decision: Decision, at: int) -> None:
        previous = tracked.replicas or 0
        await self._apply_deployment(tracked, decision.desired)
        tracked.replicas = decision.desired
        direction = "up" if decision.desired > previous else "down"
        metrics.SCALE_EVENTS.labels(*tracked.key, direction).inc()
        metrics.DESIRED_REPLICAS.labels(*tracked.key).set(decision.desired)
        if previous == 0 and decision.desired > 0:
            tracked.scale_from_zero_ms = at
            tracked.cold_start = ColdStart(held_ms=at)
        if decision.desired == 0:
            tracked.scale_from_zero_ms = None
            tracked.cold_start = None
        logger.info(
            "%s/%s: %d -> %d replicas (%s)",
            *tracked.key,
            previous,
            decision.desired,
            decision.reason,
        )

    async def _write_status(self, tracked: Tracked, at: int) -> None:
        if tracked.spec is not None and tracked.spec.auth and not self.key_secrets_synced():
            return  # still dirty: written once the key Secrets are known
        computed = status.compute(
            tracked,
            self.registry.pods_of(tracked.key),
            self.config.url(*tracked.key),
            at,
            self.plan_of(tracked),
            self.keys_of(tracked),
            self.config.api_keys.required,
        )
        if computed == tracked.written_status:
            tracked.dirty = False
            return
        try:
            await self.kube.write_status(
                resource_path(API_VERSION, PLURAL, tracked.namespace, tracked.name, "status"),
                computed,
                clear=() if computed.auth is not None else ("auth",),
            )
        except ApiError as error:
            if error.not_found:
                return
            raise
        tracked.written_status = computed
        tracked.dirty = False

    async def run(self) -> None:
        period = self.config.autoscaler.tick_seconds
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except Exception:
                logger.exception("autoscaler tick failed")
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))
