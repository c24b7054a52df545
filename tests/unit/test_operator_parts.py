"""The operator's pure parts: builders, status, demand aggregation, config, callers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from payper.api.demand import MAX_REPORTED_PODS, DemandSnapshot, DeploymentDemand
from payper.api.inference_deployment import (
    POD_LABEL,
    InferenceDeploymentSpec,
    InferenceDeploymentStatus,
    ScalingSpec,
)
from payper.billing.config import PlanChoice
from payper.clock import iso
from payper.observed import PodView
from payper.operator import builders, status
from payper.operator.auth import Caller, Forbidden, Unauthenticated, bearer_token
from payper.operator.autoscaler import Decision, Policy, Reason
from payper.operator.config import ConfigError, OperatorConfig, load
from payper.operator.controller import Controller
from payper.operator.state import DemandStore, DemandTotals, Registry, Tracked

GRANTED = PlanChoice("default", ("default", "gold"), True, None)
SPEC = InferenceDeploymentSpec.model_validate(
    {
        "template": {
            "metadata": {"labels": {"team": "a"}},
            "spec": {
                "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                "containers": [
                    {"name": "sidecar", "image": "proxy:1"},
                    {
                        "name": "server",
                        "image": "model:1",
                        "ports": [{"containerPort": 8000}],
                        "resources": {"limits": {"memory": "8Gi"}},
                    },
                ],
            },
        },
        "gpu": {"count": 2, "product": "NVIDIA-H100-80GB-HBM3"},
    }
)


def test_deployment_requests_gpus_on_the_serving_container_and_tolerates_the_taint() -> None:
    manifest = builders.deployment("llm", "ns", "uid-1", SPEC, replicas=0)
    pod = manifest["spec"]["template"]["spec"]
    sidecar, server = pod["containers"]
    assert "resources" not in sidecar
    assert server["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "2"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert {"key": "dedicated", "operator": "Exists"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    labels = manifest["spec"]["template"]["metadata"]["labels"]
    assert labels == {"team": "a", "payper.dev/inference-deployment": "llm"}
    assert manifest["spec"]["selector"]["matchLabels"] == {"payper.dev/inference-deployment": "llm"}
    assert manifest["spec"]["replicas"] == 0
    owner = manifest["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == (
        "InferenceDeployment",
        "uid-1",
        True,
    )


def test_builders_are_deterministic() -> None:
    assert builders.deployment("a", "b", "c", SPEC, 3) == builders.deployment(
        "a", "b", "c", SPEC, 3
    )
    service = builders.service("llm", "ns", "uid-1", SPEC)
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": 8000, "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == {"payper.dev/inference-deployment": "llm"}


REPO = Path(__file__).resolve().parents[2]


def _tracked(replicas: int, **kw: Any) -> Tracked:
    tracked = Tracked(
        "ns", "llm", "uid", 3, spec=SPEC, policy=Policy.from_spec(SPEC.scaling), replicas=replicas
    )
    for key, value in kw.items():
        setattr(tracked, key, value)
    return tracked


def _pod(name: str, ready: bool, created_ms: int = 0, unschedulable: str | None = None) -> PodView:
    return PodView(name, name, created_ms, ready, unschedulable)


def _conditions(result: InferenceDeploymentStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in result.conditions}


@pytest.mark.parametrize(
    ("replicas", "pods", "extra", "expected"),
    [
        (
            0,
            [],
            {},
            {
                "Ready": ("False", "ScaledToZero"),
                "ScaledToZero": ("True", "Idle"),
                "Degraded": ("False", "AsExpected"),
                "PlanGranted": ("True", "Granted"),
            },
        ),
        (
            1,
            [_pod("a", ready=False, created_ms=200_000)],
            {},
            {"Ready": ("False", "ColdStarting"), "ScaledToZero": ("False", "Active")},
        ),
        (2, [_pod("a", True), _pod("b", False, 200_000)], {}, {"Ready": ("True", "Serving")}),
        (
            1,
            [_pod("a", False, 0, "0/3 nodes are available")],
            {},
            {"Ready": ("False", "Unschedulable"), "Degraded": ("True", "Unschedulable")},
        ),
        (1, [_pod("a", False, created_ms=0)], {}, {"Degraded": ("True", "ColdStartTimeout")}),
        (
            1,
            [],
            {"invalid": "spec.x: bad"},
            {"Degraded": ("True", "InvalidSpec"), "Ready": ("False", "InvalidSpec")},
        ),
        (
            1,
            [_pod("a", True)],
            {"last_decision": Decision(1, Reason.MAX_REPLICAS, 4)},
            {"Degraded": ("True", "MaxReplicasReached"), "Ready": ("True", "Serving")},
        ),
        (0, [_pod("a", True)], {}, {"ScaledToZero": ("False", "ScalingToZero")}),
    ],
)
def test_status_conditions(
    replicas: int, pods: list[PodView], extra: dict[str, Any], expected: dict[str, tuple[str, str]]
) -> None:
    now = 10_000 + 300_000  # the default cold start timeout is 300 s
    tracked = _tracked(replicas, **extra)
    result = status.compute(tracked, pods, "http://llm.ns.x/", now, GRANTED)
    conditions = _conditions(result)
    for type_, value in expected.items():
        assert conditions[type_] == value
    assert result.desired_replicas == replicas
    assert result.ready_replicas == sum(p.ready for p in pods)
    assert all(c.observed_generation == 3 for c in result.conditions)


def test_a_plan_not_granted_is_degraded_naming_the_allowed_plans() -> None:
    tracked = _tracked(0)
    not_granted = PlanChoice("default", ("default", "gold"), False, "platinum")
    result = status.compute(tracked, [], "u", 1_000, not_granted)
    plan = result.condition("PlanGranted")
    assert plan is not None
    assert (plan.status, plan.reason) == ("False", "NotGranted")
    assert "'platinum'" in plan.message and "default, gold" in plan.message
    assert "priced at the namespace's default plan 'default'" in plan.message
    assert _conditions(result)["Degraded"] == ("True", "PlanNotGranted")
    granted = status.compute(tracked, [], "u", 1_000, GRANTED).condition("PlanGranted")
    assert granted is not None and (granted.status, granted.reason) == ("True", "Granted")
    tracked.invalid, tracked.spec = "spec.billing.plan: bad", None
    conditions = _conditions(status.compute(tracked, [], "u", 2_000, None))
    assert "PlanGranted" not in conditions, "an invalid spec names no plan"
    assert conditions["Degraded"] == ("True", "InvalidSpec")


def test_condition_time_changes_only_when_the_status_flips() -> None:
    tracked = _tracked(0)
    first = status.compute(tracked, [], "u", 1_000_000, GRANTED)
    tracked.written_status = first  # what the controller does once the write succeeded
    later = status.compute(tracked, [], "u", 2_000_000, GRANTED)
    assert first == later
    tracked.replicas = 1
    flipped = status.compute(tracked, [_pod("a", True)], "u", 3_000_000, GRANTED)
    ready = flipped.condition("Ready")
    assert ready is not None
    assert ready.to_wire()["lastTransitionTime"] == iso(3_000_000)
    zero = flipped.condition("ScaledToZero")
    assert zero is not None and zero.status == "False"
    assert zero.to_wire()["lastTransitionTime"] == iso(3_000_000)
    degraded = flipped.condition("Degraded")
    assert degraded is not None and degraded.to_wire()["lastTransitionTime"] == iso(1_000_000)


def test_status_times_are_integer_based() -> None:
    tracked = _tracked(1, last_cold_start_ms=2345, last_request_ms=1_764_000_012_345)
    result = status.compute(tracked, [], "u", 1_764_000_020_000, GRANTED).to_wire()
    assert result["lastColdStartSeconds"] == "2.345"
    assert result["lastRequestTime"] == iso(1_764_000_010_000)


def test_demand_is_summed_over_fresh_gateways_and_pokes() -> None:
    store = DemandStore(expiry_ms=5_000)
    snapshot = DemandSnapshot(
        gateway="g1",
        deployments=[
            DeploymentDemand(
                namespace="ns",
                name="a",
                in_flight=2,
                queued=1,
                ms_since_last_request=100,
                in_flight_by_pod={"a-1": 1, "a-2": 1},
            )
        ],
    )
    store.record(snapshot, now_ms=10_000)
    store.record(
        DemandSnapshot(
            gateway="g2",
            deployments=[
                DeploymentDemand(
                    namespace="ns",
                    name="a",
                    in_flight=3,
                    ms_since_last_request=50,
                    in_flight_by_pod={"a-2": 2, "a-3": 1},
                )
            ],
        ),
        now_ms=11_000,
    )
    store.poke("g3", ("ns", "b"), now_ms=11_500)
    totals = store.aggregate(now_ms=12_000)
    assert (totals[("ns", "a")].in_flight, totals[("ns", "a")].queued) == (5, 1)
    assert totals[("ns", "a")].last_request_ms == 10_950
    assert totals[("ns", "a")].in_flight_by_pod == {"a-1": 1, "a-2": 3, "a-3": 1}
    assert totals[("ns", "b")].queued == 1
    for key in (("ns", "a"), ("ns", "b")):
        assert store.totals_for(key, now_ms=12_000) == totals[key], "a poke sees the same sum"
    assert store.totals_for(("ns", "absent"), now_ms=12_000) == DemandTotals()
    later = store.aggregate(now_ms=15_500)  # g1 expired (5.5 s old)
    assert later[("ns", "a")].in_flight == 3
    assert later[("ns", "a")].in_flight_by_pod == {"a-2": 2, "a-3": 1}
    store.record(DemandSnapshot(gateway="g3", deployments=[]), now_ms=15_600)
    assert ("ns", "b") not in store.aggregate(now_ms=15_700)


@pytest.mark.parametrize(
    "by_pod",
    [{"Not_A_Pod": 1}, {"idle": 0}, {f"p{i}": 1 for i in range(MAX_REPORTED_PODS + 1)}],
)
def test_per_pod_counts_in_a_snapshot_are_bounded(by_pod: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        DeploymentDemand(namespace="ns", name="a", in_flight_by_pod=by_pod)


def test_bad_configuration_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "autoscaler:\n  tickSeconds: 0\nidentity:\n  gatewayServiceAccounts: [nocolon]\nbogus: 1\n"
    )
    with pytest.raises(ConfigError) as error:
        load(path)
    message = str(error.value)
    assert "autoscaler.tickSeconds" in message
    assert "identity.gatewayServiceAccounts" in message
    assert "bogus" in message
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.yaml")
    assert load(None).autoscaler.tick_seconds == 1.0


def test_callers_and_bearer_tokens() -> None:
    caller = Caller("system:serviceaccount:payper-system:payper-gateway")
    assert caller.service_account == "payper-system:payper-gateway"
    caller.require({"payper-system:payper-gateway"})
    with pytest.raises(Forbidden):
        caller.require({"payper-system:payper-agent"})
    with pytest.raises(Forbidden):
        Caller("admin").require({"payper-system:payper-gateway"})
    assert bearer_token("Bearer abc ") == "abc"
    for bad in (None, "", "Basic abc", "Bearer  "):
        with pytest.raises(Unauthenticated):
            bearer_token(bad)


def test_a_misspelt_status_field_is_an_error_not_a_silent_prune(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="readyReplica"):
        InferenceDeploymentStatus.model_validate({"readyReplica": 1})
    # Status writers build the model, so mypy --strict (with the pydantic plugin, as
    # `make lint` runs it) catches the typo before anything runs.
    snippet = tmp_path / "misspelt.py"
    snippet.write_text(
        "from payper.api.inference_deployment import InferenceDeploymentStatus\n"
        "InferenceDeploymentStatus(ready_replica=1)\n"
    )
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), str(snippet)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert checked.returncode == 1, checked.stdout
    assert 'Unexpected keyword argument "ready_replica"' in checked.stdout


def _pod_object(uid: str, label: str | None, owner_uid: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"pod-{uid}",
        "namespace": "team-a",
        "uid": uid,
        "labels": {POD_LABEL: label} if label else {},
    }
    if owner_uid:
        meta["ownerReferences"] = [
            {"kind": "ReplicaSet", "name": "llm-1", "uid": owner_uid, "controller": True},
            {"kind": "Other", "name": "x", "uid": "not-the-controller"},
        ]
    return {"metadata": meta, "spec": {}}


def test_the_registry_knows_every_pod_and_a_bounded_number_of_gone_ones() -> None:
    registry = Registry(max_gone_pods=3)
    for n in range(5):
        pod = PodView.from_object(_pod_object(f"u{n}", None))
        registry.observe_pod(pod, None, deleted=False)
    assert set(registry.all_pods) == {f"u{n}" for n in range(5)}
    for n in range(5):
        registry.observe_pod(PodView.from_object(_pod_object(f"u{n}", None)), None, deleted=True)
    assert registry.all_pods == {}
    assert list(registry.gone_pods) == ["u2", "u3", "u4"], "the latest, at most the bound"


def test_a_relabelled_pod_leaves_its_former_deployment() -> None:
    registry = Registry()
    labelled = PodView.from_object(_pod_object("u1", "llm", owner_uid="rs-1"))
    assert labelled.owner is not None and labelled.owner.uid == "rs-1", "the controller ref"
    registry.observe_pod(labelled, ("team-a", "llm"), deleted=False)
    assert [p.uid for p in registry.pods_of(("team-a", "llm"))] == ["u1"]
    relabelled = PodView.from_object(_pod_object("u1", "cheap"))
    registry.observe_pod(relabelled, ("team-a", "cheap"), deleted=False)
    assert registry.pods_of(("team-a", "llm")) == []
    assert [p.uid for p in registry.pods_of(("team-a", "cheap"))] == ["u1"]
    assert relabelled.owner is None


def test_the_fence_admits_only_the_gateway_on_the_serving_port_and_listed_peers() -> None:
    spec = InferenceDeploymentSpec.model_validate(
        {
            "template": {
                "spec": {
                    "containers": [{"name": "s", "image": "i", "ports": [{"containerPort": 9000}]}]
                }
            }
        }
    )
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    policy = builders.network_policy(
        "llm",
        "team-a",
        "uid-1",
        spec,
        "payper-system",
        {"app.kubernetes.io/component": "gateway"},
        [prometheus],
    )
    gateway_rule, platform_rule = policy["spec"]["ingress"]
    assert gateway_rule["ports"] == [{"port": 9000, "protocol": "TCP"}]
    (peer,) = gateway_rule["from"]
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "gateway"}}
    assert platform_rule == {"from": [prometheus]}
    assert policy["spec"]["podSelector"] == {"matchLabels": {POD_LABEL: "llm"}}
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    alone = builders.network_policy("llm", "team-a", "uid-1", spec, "payper-system", {}, [])
    assert len(alone["spec"]["ingress"]) == 1, "no listed peers: the gateway alone"


def test_pods_drain_before_they_stop_so_scale_down_cuts_no_stream() -> None:
    spec = InferenceDeploymentSpec.model_validate(
        {
            "template": {
                "spec": {
                    "containers": [{"name": "s", "image": "i", "ports": [{"containerPort": 9000}]}]
                }
            },
            "scaling": {"streamDrainSeconds": 600},
        }
    )
    pod = builders.pod_template("llm", spec)["spec"]
    assert pod["terminationGracePeriodSeconds"] == builders.DRAIN_DELAY_S + 600
    (container,) = pod["containers"]
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": builders.DRAIN_DELAY_S}}
    own = InferenceDeploymentSpec.model_validate(
        {
            "template": {
                "spec": {
                    "terminationGracePeriodSeconds": 7,
                    "containers": [
                        {
                            "name": "s",
                            "image": "i",
                            "lifecycle": {"preStop": {"exec": {"command": ["drain"]}}},
                        }
                    ],
                }
            }
        }
    )
    kept = builders.pod_template("llm", own)["spec"]
    assert kept["terminationGracePeriodSeconds"] == 7, "the tenant's own choice stands"
    assert kept["containers"][0]["lifecycle"]["preStop"] == {"exec": {"command": ["drain"]}}


def test_the_initial_listing_of_every_pod_comes_in_chunks() -> None:
    """Unchunked, kopf lists every pod of the cluster in one response at start-up: 10,000
    pods peaked above the chart's memory limit (bench/operator_memory.py)."""
    from payper.operator.main import _settings

    chunk = _settings().watching.chunk_size
    assert chunk is not None and 0 < chunk <= 1000


class _RecordingKube:
    """The API as the controller's scale-down path uses it: records patches and applies."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    async def patch(self, path: str, body: Any, *args: Any, **kw: Any) -> None:
        self.calls.append(("patch", path, body))

    async def apply(self, path: str, body: Any, *args: Any, **kw: Any) -> None:
        self.calls.append(("apply", path, body))

    async def write_status(self, path: str, *args: Any, **kw: Any) -> None:
        pass


def _serving_pod(name: str, cost: int | None = None) -> dict[str, Any]:
    annotations = {} if cost is None else {"controller.kubernetes.io/pod-deletion-cost": str(cost)}
    return {
        "metadata": {
            "namespace": "ns",
            "name": name,
            "uid": f"uid-{name}",
            "labels": {"payper.dev/inference-deployment": "llm"},
            "annotations": annotations,
        },
        "status": {
            "phase": "Running",
            "podIP": "127.1.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


async def test_a_scale_down_first_marks_busy_pods_then_lowers_replicas() -> None:
    """The streaming pod gets its in-flight count as its deletion cost (the idle one's
    stale cost is cleared), and the replicas drop a tick later, once the ReplicaSet
    controller can have seen the costs; unchanged costs cost no patch and no wait."""
    kube = _RecordingKube()
    controller = Controller(kube, OperatorConfig())  # type: ignore[arg-type]
    spec = SPEC.model_copy(
        update={"scaling": ScalingSpec(min_replicas=1, max_replicas=2, target_concurrency=1)}
    )
    tracked = Tracked("ns", "llm", "uid", 1, spec=spec, policy=Policy.from_spec(spec.scaling))
    tracked.replicas, tracked.last_request_ms = 2, 1_000_000
    controller.registry.tracked[tracked.key] = tracked
    controller.observe_pod(_serving_pod("llm-idle", cost=4), deleted=False)
    controller.observe_pod(_serving_pod("llm-busy"), deleted=False)
    demand = DemandTotals(in_flight=1, in_flight_by_pod={"llm-busy": 1})

    await controller.evaluate(tracked, demand, 1_000_500)
    patches = sorted((path, body) for verb, path, body in kube.calls if verb == "patch")
    assert patches == [
        (
            "/api/v1/namespaces/ns/pods/llm-busy",
            {
                "metadata": {
                    "uid": "uid-llm-busy",
                    "annotations": {"controller.kubernetes.io/pod-deletion-cost": "1"},
                }
            },
        ),
        (
            "/api/v1/namespaces/ns/pods/llm-idle",
            {
                "metadata": {
                    "uid": "uid-llm-idle",
                    "annotations": {"controller.kubernetes.io/pod-deletion-cost": "0"},
                }
            },
        ),
    ]
    assert tracked.replicas == 2 and tracked.scale_down_deferred, "costs first, scale next tick"
    assert not [call for call in kube.calls if call[0] == "apply"]

    # The pod watch brings the costs back; the next tick scales down without a patch.
    controller.observe_pod(_serving_pod("llm-idle", cost=0), deleted=False)
    controller.observe_pod(_serving_pod("llm-busy", cost=1), deleted=False)
    kube.calls.clear()
    await controller.evaluate(tracked, demand, 1_001_500)
    assert [verb for verb, _, _ in kube.calls] == ["apply"]
    assert kube.calls[0][2]["spec"]["replicas"] == 1
    assert tracked.replicas == 1 and not tracked.scale_down_deferred
