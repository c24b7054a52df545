"""The gateway's pure parts: routing, endpoint choice, holding, API keys."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest
from prometheus_client import REGISTRY

from payper.gateway import demand
from payper.gateway import main as gateway_main
from payper.gateway import workers as gateway_workers
from payper.gateway.demand import DemandReporter
from payper.gateway.routing import Route, route
from payper.gateway.targets import Target, TargetGone, Targets
from payper.observed import PodView

DOMAIN = "payper.example.com"


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("llm.team-a.payper.example.com", "/v1/chat?x=1", Route("team-a", "llm", "/v1/chat?x=1")),
        ("LLM.Team-A.payper.example.com:8080", "/", Route("team-a", "llm", "/")),
        ("llm.team-a.payper.example.com.", "/", Route("team-a", "llm", "/")),
        ("gw.local", "/team-a/llm/v1/chat?x=1", Route("team-a", "llm", "/v1/chat?x=1")),
        ("gw.local", "/team-a/llm", Route("team-a", "llm", "/")),
        ("gw.local", "/team-a/llm/", Route("team-a", "llm", "/")),
        ("gw.local", "/team-a/llm?x=1", Route("team-a", "llm", "/?x=1")),
        (None, "/team-a/llm/a/b", Route("team-a", "llm", "/a/b")),
        ("a.b.c.payper.example.com", "/", None),
        ("team-a.payper.example.com", "/", None),
        ("gw.local", "/healthz", None),
        ("gw.local", "/Team_A/llm/x", None),
        ("gw.local", "/", None),
        ("gw.local", "*", None),
    ],
)
def test_route(host: str | None, path: str, expected: Route | None) -> None:
    assert route(host, path, DOMAIN) == expected


def _deployment(name: str = "llm", auth: str | None = None, port: int = 8000) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "template": {
            "spec": {
                "containers": [{"name": "s", "image": "i", "ports": [{"containerPort": port}]}]
            }
        },
        "scaling": {"coldStartTimeoutSeconds": 7},
    }
    if auth:
        spec["auth"] = {"secretName": auth}
    return {"metadata": {"namespace": "ns", "name": name}, "spec": spec}


def _pod(name: str, ip: str, ready: bool, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": "ns", "name": name, "uid": f"uid-{name}"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_endpoints_follow_pod_readiness_and_the_serving_port() -> None:
    targets = Targets()
    targets.upsert_pod("llm", _pod("p1", "127.1.0.1", ready=True))
    targets.upsert_deployment(_deployment(port=9000))
    target = targets.get(("ns", "llm"))
    assert target is not None
    assert target.cold_start_timeout_s == 7
    assert {e.address for e in target.endpoints.values()} == {"127.1.0.1:9000"}
    targets.upsert_pod("llm", _pod("p2", "127.1.0.2", ready=False))
    assert set(target.endpoints) == {"p1"}
    targets.upsert_pod("llm", _pod("p2", "127.1.0.2", ready=True))
    targets.upsert_pod("llm", _pod("p1", "127.1.0.1", ready=True, deleting=True))
    assert set(target.endpoints) == {"p2"}
    targets.remove_pod("llm", _pod("p2", "127.1.0.2", ready=True))
    assert target.endpoints == {}


def test_pick_prefers_fewest_in_flight_and_skips_quarantined() -> None:
    targets = Targets()
    targets.upsert_deployment(_deployment())
    for index in range(3):
        targets.upsert_pod("llm", _pod(f"p{index}", f"127.1.0.{index}", ready=True))
    target = targets.get(("ns", "llm"))
    assert target is not None
    target.endpoints["p0"].in_flight = 3
    target.endpoints["p1"].in_flight = 1
    target.endpoints["p2"].in_flight = 2
    picked = target.pick()
    assert picked is not None
    assert picked.pod == "p1"
    target.endpoints["p1"].quarantine()
    picked = target.pick()
    assert picked is not None
    assert picked.pod == "p2"


async def test_waiting_for_an_endpoint_times_out_wakes_up_or_sees_deletion() -> None:
    targets = Targets()
    targets.upsert_deployment(_deployment())
    target = targets.get(("ns", "llm"))
    assert target is not None
    with pytest.raises(TimeoutError):
        await target.wait_for_endpoint(0.2)

    waiter = asyncio.create_task(target.wait_for_endpoint(5))
    await asyncio.sleep(0.05)
    targets.upsert_pod("llm", _pod("p1", "127.1.0.1", ready=True))
    endpoint = await asyncio.wait_for(waiter, 1)
    assert endpoint.pod == "p1"

    targets.remove_pod("llm", _pod("p1", "127.1.0.1", ready=True))
    waiter = asyncio.create_task(target.wait_for_endpoint(5))
    await asyncio.sleep(0.05)
    targets.remove_deployment(("ns", "llm"))
    with pytest.raises(TargetGone):
        await asyncio.wait_for(waiter, 1)


KEY_1 = "k1-" + "a" * 40
KEY_2 = "k2-" + "b" * 40


def _published(deployment: dict[str, Any], secret: str, *keys: str) -> dict[str, Any]:
    """The deployment with status.auth as the operator publishes it."""
    digests = [hashlib.sha256(key.encode()).hexdigest() for key in keys]
    return {**deployment, "status": {"auth": {"secretName": secret, "keyDigests": digests}}}


def test_api_keys_are_the_published_digests_and_fail_closed() -> None:
    targets = Targets()
    targets.upsert_deployment(_deployment("open"))
    targets.upsert_deployment(_deployment("private", auth="keys"))
    open_target, private = targets.get(("ns", "open")), targets.get(("ns", "private"))
    assert isinstance(open_target, Target)
    assert isinstance(private, Target)
    assert targets.authorized(open_target, None)
    assert not targets.authorized(private, f"Bearer {KEY_1}"), "nothing published: no key"
    targets.upsert_deployment(_published(_deployment("private", auth="keys"), "keys", KEY_1, KEY_2))
    assert targets.authorized(private, f"Bearer {KEY_1}")
    assert targets.authorized(private, f"bearer {KEY_2} ")
    assert not targets.authorized(private, "Bearer k3")
    assert not targets.authorized(private, f"Basic {KEY_1}")
    assert not targets.authorized(private, None)
    assert not targets.authorized(private, "Bearer ")
    assert not targets.authorized(private, f"Bearer {KEY_1}\xe9")
    # Rotation: the next status replaces the digests.
    targets.upsert_deployment(_published(_deployment("private", auth="keys"), "keys", KEY_2))
    assert not targets.authorized(private, f"Bearer {KEY_1}")
    assert targets.authorized(private, f"Bearer {KEY_2}")
    # The spec now names another Secret: the old Secret's digests no longer count.
    targets.upsert_deployment(_published(_deployment("private", auth="other"), "keys", KEY_2))
    assert not targets.authorized(private, f"Bearer {KEY_2}")
    # auth removed from the spec: open again, whatever the status still says.
    targets.upsert_deployment(_published(_deployment("private"), "keys", KEY_2))
    assert targets.authorized(private, None)


@pytest.mark.parametrize(
    "auth",
    [
        {"secretName": "keys", "keyDigests": ["not-hex"]},
        {"secretName": "keys", "keyDigests": ["A" * 64]},
        {"secretName": "keys", "keyDigests": "0" * 64},
        {"secretName": "keys", "keyDigests": ["0" * 64] * 65},
        {"keyDigests": ["0" * 64]},
        {"secretName": "keys", "keyDigests": ["0" * 64], "extra": 1},
        "keys",
        None,
    ],
)
def test_a_malformed_published_status_accepts_nothing(auth: Any) -> None:
    targets = Targets()
    deployment = {**_deployment("private", auth="keys"), "status": {"auth": auth}}
    targets.upsert_deployment(deployment)
    target = targets.get(("ns", "private"))
    assert target is not None
    assert target.key_digests == ()
    assert not targets.authorized(target, "Bearer " + "0" * 64)


def test_require_auth_closes_open_deployments_and_unknown_ones() -> None:
    targets = Targets(require_auth=True)
    targets.upsert_deployment(_deployment("open"))
    targets.upsert_deployment(_published(_deployment("private", auth="keys"), "keys", KEY_1))
    open_target, private = targets.get(("ns", "open")), targets.get(("ns", "private"))
    assert open_target is not None
    assert private is not None
    assert open_target.auth_required
    assert not targets.authorized(open_target, None)
    assert not targets.authorized(open_target, f"Bearer {KEY_1}")
    assert targets.authorized(private, f"Bearer {KEY_1}")
    assert not targets.authorized(None, f"Bearer {KEY_1}")
    assert not targets.authorized(None, None)


def test_an_invalid_spec_removes_the_route() -> None:
    targets = Targets()
    targets.upsert_deployment(_deployment())
    broken = _deployment()
    broken["spec"]["scaling"]["coldStartTimeoutSeconds"] = 0
    targets.upsert_deployment(broken)
    assert targets.get(("ns", "llm")) is None


def test_a_routed_deployment_has_series_from_zero_until_it_is_removed() -> None:
    labels = {"namespace": "ns", "inference_deployment": "metered"}
    answered = {**labels, "code": "200"}
    targets = Targets()
    targets.upsert_deployment(_deployment("metered"))
    assert REGISTRY.get_sample_value("payper_gateway_requests_in_flight", labels) == 0
    targets.get(("ns", "metered")).meters.answered(200)  # type: ignore[union-attr]
    assert REGISTRY.get_sample_value("payper_gateway_requests_total", answered) == 1
    targets.remove_deployment(("ns", "metered"))
    assert REGISTRY.get_sample_value("payper_gateway_requests_in_flight", labels) is None
    assert REGISTRY.get_sample_value("payper_gateway_requests_total", answered) is None


def test_the_gateway_and_the_operator_agree_on_which_pods_serve() -> None:
    """One PodView: what the operator counts as ready is what the gateway sends to."""
    running = _pod("p1", "127.1.0.1", ready=True)
    pending = {**running, "status": {**running["status"], "phase": "Pending"}}
    deleting = _pod("p1", "127.1.0.1", ready=True, deleting=True)
    no_ip = {**running, "status": {**running["status"], "podIP": ""}}
    cases = (
        (running, True, True),
        (pending, False, False),
        (deleting, True, False),  # still Ready while it terminates: no new requests
        (no_ip, True, False),
    )
    for pod, ready, serving in cases:
        view = PodView.from_object(pod)
        assert (view.ready, view.serving) == (ready, serving), pod
        targets = Targets()
        targets.upsert_deployment(_deployment(port=9000))
        targets.upsert_pod("llm", pod)
        target = targets.get(("ns", "llm"))
        assert target is not None
        assert bool(target.endpoints) is serving, pod


class _TokenStub:
    def header(self) -> dict[str, str]:
        return {}


def test_snapshots_carry_the_busy_pods_bounded_and_only_when_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    targets = Targets()
    targets.upsert_deployment(_deployment())
    for index in range(4):
        targets.upsert_pod("llm", _pod(f"p{index}", f"127.1.0.{index}", ready=True))
    target = targets.get(("ns", "llm"))
    assert target is not None
    target.endpoints["p1"].in_flight = 2
    target.endpoints["p2"].in_flight = 5
    target.endpoints["p3"].in_flight = 1
    target.in_flight = 8
    reporter = DemandReporter("http://op", _TokenStub(), "g1", targets)  # type: ignore[arg-type]
    (entry,) = reporter.snapshot().deployments
    assert entry.in_flight_by_pod == {"p1": 2, "p2": 5, "p3": 1}, "idle pods are left out"
    monkeypatch.setattr(demand, "MAX_REPORTED_PODS", 2)
    assert demand.in_flight_by_pod(target) == {"p2": 5, "p1": 2}, "the busiest"
    # A pod being deleted is no endpoint: its last requests count for the deployment only.
    targets.upsert_pod("llm", _pod("p2", "127.1.0.2", ready=True, deleting=True))
    (entry,) = reporter.snapshot().deployments
    assert (entry.in_flight, entry.in_flight_by_pod) == (8, {"p1": 2, "p3": 1})
    assert reporter.snapshot(per_pod=False).deployments[0].in_flight_by_pod == {}


async def test_an_operator_that_refuses_per_pod_counts_gets_snapshots_without_them() -> None:
    """Mid-upgrade, an operator from before per-pod counts answers 400 to them: the
    snapshot is sent again without, and they stay out for a while."""
    targets = Targets()
    targets.upsert_deployment(_deployment())
    targets.upsert_pod("llm", _pod("p1", "127.1.0.1", ready=True))
    target = targets.get(("ns", "llm"))
    assert target is not None
    target.endpoints["p1"].in_flight = target.in_flight = 1
    sent: list[dict[str, Any]] = []

    async def old_operator(path: str, body: str) -> int:
        wire = json.loads(body)
        sent.append(wire)
        return 400 if "inFlightByPod" in wire["deployments"][0] else 200

    reporter = DemandReporter("http://op", _TokenStub(), "g1", targets)  # type: ignore[arg-type]
    reporter._post = old_operator  # type: ignore[method-assign]
    assert await reporter.report() == 200
    assert await reporter.report() == 200
    assert [("inFlightByPod" in s["deployments"][0]) for s in sent] == [True, False, False]
    assert sent[1]["deployments"][0] == {"namespace": "ns", "name": "llm", "inFlight": 1}


@pytest.mark.parametrize(
    ("total", "workers", "each"),
    [(4096, 1, 4096), (4096, 2, 2048), (5, 2, 2), (1, 4, 1), (0, 3, 0), (100, 3, 33)],
)
def test_each_worker_holds_its_share_of_a_gateway_bound(
    total: int, workers: int, each: int
) -> None:
    """The pod's bound divided among its workers: never more in all than the bound
    (but at least one each: a bound of 1 over 4 workers cannot be split), 0 stays 0."""
    assert gateway_workers.share(total, workers) == each
    assert each * workers <= max(total, workers)


@pytest.mark.parametrize("bad", ["0", "-1", "two", ""])
def test_a_gateway_without_a_positive_number_of_workers_does_not_start(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        gateway_main.parse_args(["--operator-url", "https://operator:8443", "--workers", bad])
    assert stopped.value.code == 2
    assert "--workers" in capsys.readouterr().err


def test_workers_report_demand_under_ids_of_their_own() -> None:
    """The operator sums demand per gateway id: two workers under one id would overwrite
    each other's snapshots."""
    ids = {gateway_workers.worker_gateway_id("gateway-abc", i) for i in range(4)}
    assert len(ids) == 4 and all(i.startswith("gateway-abc-") for i in ids)
