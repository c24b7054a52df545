"""Tenants never choose their price: plans are granted to namespaces by the platform.

Written as a tenant would try it: name a free plan, a discounted plan granted to other
namespaces, or a plan that does not exist. None of them wakes the deployment; and a
deployment whose grant is revoked while it runs keeps serving, paying its namespace's
default plan from then on. Nothing is priced at zero unless a configured plan says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from payper.clock import parse_iso
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import (
    Stack,
    StackOptions,
    inference_deployment,
    running,
    spec_replicas,
)

PARTNER = {"billing.example.com/tier": "partner"}
PLANS = {
    "default": {
        "pricePerGpuSecond": {"default": "0.0011", "NVIDIA-H100-80GB-HBM3": "0.0012"},
        "reservedPricePerGpuHour": {"default": "2.50"},
    },
    "discount": {
        "pricePerGpuSecond": {"default": "0.0006"},
        "reservedPricePerGpuHour": {"default": "1.00"},
    },
    "free": {"pricePerGpuSecond": {"default": "0"}, "reservedPricePerGpuHour": {"default": "0"}},
}
BILLING = {
    "windowSeconds": 20,
    "graceSeconds": 5,
    "flushIntervalSeconds": 1,
    "plans": PLANS,
    "defaultPlan": "default",
    "grants": [
        {"namespaceSelector": PARTNER, "plans": ["default", "discount"], "defaultPlan": "discount"}
    ],
}


@pytest.fixture(scope="module")
def stack(
    crds_installed: ClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    options = StackOptions(agents=True, operator_extra={"billing": BILLING})
    with running(crds_installed, tmp_path_factory.mktemp("plans"), options) as started:
        yield started


def condition(cluster: ClusterHandle, namespace: str, name: str, type_: str) -> Any:
    got = cluster.get_json("infd", name, "-n", namespace)
    return next(
        (c for c in got.get("status", {}).get("conditions", []) if c["type"] == type_), None
    )


@pytest.mark.parametrize(
    "plan",
    ["free", "discount", "platinum"],
    ids=["a-free-plan", "a-discount-granted-elsewhere", "a-plan-that-does-not-exist"],
)
async def test_a_plan_not_granted_to_the_namespace_never_wakes_the_deployment(
    stack: Stack, namespace: str, http: aiohttp.ClientSession, plan: str
) -> None:
    cluster = stack.cluster
    manifest = inference_deployment("cheap", cold_start_timeout_s=3)
    manifest["spec"]["billing"] = {"plan": plan}
    stack.deploy(namespace, manifest)

    granted = eventually(
        lambda: condition(cluster, namespace, "cheap", "PlanGranted"), 30, 0.2, "PlanGranted"
    )
    assert (granted["status"], granted["reason"]) == ("False", "NotGranted")
    assert f"'{plan}'" in granted["message"] and "allowed: default" in granted["message"]
    degraded = condition(cluster, namespace, "cheap", "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PlanNotGranted")

    async with http.post(f"{stack.gateway_url}/{namespace}/cheap/v1/infer", json={"ms": 50}) as r:
        assert r.status == 504, await r.text()  # held for coldStartTimeoutSeconds, never woken
    assert spec_replicas(cluster, namespace, "cheap") == 0
    assert cluster.get_json("brec", "-n", namespace)["items"] == []


async def test_a_revoked_grant_keeps_serving_and_pays_the_namespace_default(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    labels = [f"{k}={v}" for k, v in PARTNER.items()]
    cluster.kubectl("label", "namespace", namespace, *labels)
    manifest = inference_deployment("partner", min_replicas=1, idle_timeout_s=120)
    manifest["spec"]["billing"] = {"plan": "discount"}
    stack.deploy(namespace, manifest)
    eventually(lambda: stack.gateway_endpoints(namespace).get("partner") == 1, 30, 0.2, "ready")
    granted = condition(cluster, namespace, "partner", "PlanGranted")
    assert (granted["status"], granted["reason"]) == ("True", "Granted")

    # The platform revokes the grant: the namespace is no longer a partner.
    cluster.kubectl("label", "namespace", namespace, *(f"{k}-" for k in PARTNER))
    revoked_at = int(time.time() * 1000)
    eventually(
        lambda: condition(cluster, namespace, "partner", "PlanGranted")["reason"] == "NotGranted",
        30,
        0.2,
        "the grant to be seen revoked",
    )

    def record_after_revocation() -> dict[str, Any] | None:
        # Records are priced when they open; the first window opened after the
        # revocation is the first priced at the namespace's default plan.
        return next(
            (
                r
                for r in cluster.get_json("brec", "-n", namespace)["items"]
                if parse_iso(r["spec"]["window"]["start"]) > revoked_at
            ),
            None,
        )

    record = eventually(record_after_revocation, 60, 0.5, "a window opened after revocation")
    assert (record["spec"]["plan"], record["spec"]["pricePerGpuSecond"]) == ("default", "0.0012")
    assert spec_replicas(cluster, namespace, "partner") == 1, "it keeps serving"
    for _ in range(4):
        async with http.post(
            f"{stack.gateway_url}/{namespace}/partner/v1/infer", json={"ms": 700}
        ) as response:
            assert response.status == 200
    await stack.settle()
    later = [
        r
        for r in cluster.get_json("brec", "-n", namespace)["items"]
        if parse_iso(r["spec"]["window"]["start"]) >= parse_iso(record["spec"]["window"]["start"])
    ]
    billed = [r for r in later if int(r["status"].get("activeUs", 0)) > 0]
    assert billed, "the traffic after the revocation was billed"
    for item in billed:
        assert item["spec"]["plan"] == "default"
        expected = Decimal("0.0012") * int(item["status"]["billedMs"]) / 1000
        assert Decimal(item["status"]["amount"]) == expected.quantize(Decimal("0.000001"))
        assert Decimal(item["status"]["amount"]) > 0
