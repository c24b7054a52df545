"""The CRDs on a real API server: installation, examples, validation and immutability."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from payper.api.common import API_VERSION
from payper.api.inference_deployment import PLURAL, InferenceDeploymentStatus
from payper.kube import ApiError, resource_path
from payper_dev.testing.cluster import ClusterHandle

VALID: dict[str, Any] = {
    "apiVersion": "payper.dev/v1alpha1",
    "kind": "InferenceDeployment",
    "metadata": {"name": "probe"},
    "spec": {
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "server",
                        "image": "example/model:1",
                        "ports": [{"containerPort": 8000}],
                    }
                ]
            }
        },
        "scaling": {"minReplicas": 0, "maxReplicas": 2},
    },
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """VALID with ``value`` set at the dotted ``path`` (``None`` deletes the key)."""
    doc = copy.deepcopy(VALID)
    *parents, leaf = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


CONTAINERS = "spec.template.spec.containers"
INVALID = [
    (
        "min-above-max",
        _with("spec.scaling", {"minReplicas": 3, "maxReplicas": 2}),
        "spec.scaling.minReplicas",
    ),
    ("zero-gpus", _with("spec.gpu", {"count": 0}), "spec.gpu.count"),
    ("negative-gpus", _with("spec.gpu", {"count": -2}), "spec.gpu.count"),
    ("too-many-gpus", _with("spec.gpu", {"count": 65}), "spec.gpu.count"),
    ("zero-max-replicas", _with("spec.scaling", {"maxReplicas": 0}), "spec.scaling.maxReplicas"),
    (
        "negative-min-replicas",
        _with("spec.scaling", {"minReplicas": -1}),
        "spec.scaling.minReplicas",
    ),
    (
        "zero-target-concurrency",
        _with("spec.scaling", {"targetConcurrency": 0}),
        "spec.scaling.targetConcurrency",
    ),
    ("bad-plan-name", _with("spec.billing", {"plan": "Gold_Plan"}), "spec.billing.plan"),
    ("missing-containers", _with("spec.template.spec", {}), CONTAINERS),
    ("empty-containers", _with(CONTAINERS, []), CONTAINERS),
    (
        "container-without-image",
        _with(CONTAINERS, [{"name": "server", "ports": [{"containerPort": 80}]}]),
        f"{CONTAINERS}[0].image",
    ),
    (
        "negative-idle-timeout",
        _with("spec.scaling", {"idleTimeoutSeconds": -5}),
        "spec.scaling.idleTimeoutSeconds",
    ),
    (
        "duration-as-string",
        _with("spec.scaling", {"idleTimeoutSeconds": "5m"}),
        "spec.scaling.idleTimeoutSeconds",
    ),
    (
        "zero-cold-start-timeout",
        _with("spec.scaling", {"coldStartTimeoutSeconds": 0}),
        "spec.scaling.coldStartTimeoutSeconds",
    ),
    (
        "huge-scale-down-delay",
        _with("spec.scaling", {"scaleDownDelaySeconds": 10**7}),
        "spec.scaling.scaleDownDelaySeconds",
    ),
    ("port-out-of-range", _with("spec.port", 70000), "spec.port"),
    ("no-port-anywhere", _with(CONTAINERS, [{"name": "server", "image": "x:1"}]), "spec.port"),
    ("bad-gpu-resource", _with("spec.gpu", {"resource": "nvidia gpu"}), "spec.gpu.resource"),
    ("auth-without-secret", _with("spec.auth", {}), "spec.auth.secretName"),
    (
        "unknown-scaling-field",
        _with("spec.scaling", {"maxReplicas": 2, "replicas": 3}),
        "spec.scaling.replicas",
    ),
    ("unknown-spec-field", _with("spec.image", "example/model:1"), "spec.image"),
    ("name-starts-with-digit", _with("metadata.name", "9lives"), "metadata.name"),
]


def test_crds_established_and_examples_apply(
    crds_installed: ClusterHandle, repo: Path, namespace: str
) -> None:
    crds = crds_installed.get_json("crd")["items"]
    ours = {c["metadata"]["name"]: c for c in crds if c["spec"]["group"] == "payper.dev"}
    assert set(ours) == {"inferencedeployments.payper.dev", "billingrecords.payper.dev"}
    for crd in ours.values():
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert conditions["NamesAccepted"] == "True"
    result = crds_installed.kubectl("apply", "-n", namespace, "-f", str(repo / "examples"))
    examples = [
        doc
        for path in sorted((repo / "examples").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "InferenceDeployment"
    ]
    assert len(examples) >= 4
    names = crds_installed.kubectl("get", "infd", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(names) == sorted(
        f"inferencedeployment.payper.dev/{d['metadata']['name']}" for d in examples
    ), result.stdout
    # The short name, the category and the printer columns all work.
    table = crds_installed.kubectl("get", "payper", "-n", namespace).stdout
    for column in ("READY", "DESIRED", "URL", "AGE"):
        assert column in table


@pytest.mark.parametrize(("case", "manifest", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_inference_deployment_is_rejected_naming_the_field(
    crds_installed: ClusterHandle, namespace: str, case: str, manifest: dict[str, Any], field: str
) -> None:
    result = crds_installed.kubectl(
        "apply",
        "--validate=strict",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(manifest),
        check=False,
    )
    assert result.returncode != 0, f"{case} was accepted"
    assert field in result.stderr, result.stderr
    listed = crds_installed.kubectl("get", "infd", "-n", namespace, "-o", "name").stdout
    assert listed.strip() == ""


def test_valid_probe_is_accepted_and_defaulted(
    crds_installed: ClusterHandle, namespace: str
) -> None:
    crds_installed.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(VALID))
    stored = crds_installed.get_json("infd", "probe", "-n", namespace)
    assert stored["spec"]["gpu"] == {"count": 1, "resource": "nvidia.com/gpu"}
    # No plan named: the namespace's default plan applies (the operator decides, not a default).
    assert stored["spec"]["billing"] == {}
    assert stored["spec"]["scaling"]["idleTimeoutSeconds"] == 300


RECORD = {
    "apiVersion": "payper.dev/v1alpha1",
    "kind": "BillingRecord",
    "metadata": {"name": "probe-202611261000"},
    "spec": {
        "inferenceDeployment": "probe",
        "account": "team-a",
        "window": {"start": "2026-11-26T10:00:00Z", "end": "2026-11-26T11:00:00Z"},
        "plan": "default",
        "granularity": "1s",
        "currency": "USD",
        "pricePerGpuSecond": "0.00125",
        "reservedPricePerGpuHour": "4.50",
        "gpuProduct": "NVIDIA-H100-80GB-HBM3",
    },
}


def _patch_status(cluster: ClusterHandle, namespace: str, status: dict[str, Any]) -> Any:
    return cluster.kubectl(
        "patch",
        "brec",
        RECORD["metadata"]["name"],
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
        check=False,
    )


def test_final_billing_record_cannot_be_modified(
    crds_installed: ClusterHandle, namespace: str
) -> None:
    crds_installed.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(RECORD))
    assert (
        _patch_status(crds_installed, namespace, {"state": "Open", "activeMs": 1500}).returncode
        == 0
    )
    assert _patch_status(crds_installed, namespace, {"activeMs": 2500}).returncode == 0
    assert _patch_status(crds_installed, namespace, {"state": "Final"}).returncode == 0
    before = crds_installed.get_json("brec", "-n", namespace)["items"][0]["status"]

    for change in ({"activeMs": 9999}, {"state": "Open"}, {"amount": "1.00"}):
        result = _patch_status(crds_installed, namespace, change)
        assert result.returncode != 0, change
        assert "a Final BillingRecord cannot be modified" in result.stderr
    spec_change = crds_installed.kubectl(
        "patch",
        "brec",
        RECORD["metadata"]["name"],
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"pricePerGpuSecond": "0.0001"}}),
        check=False,
    )
    assert spec_change.returncode != 0
    assert "spec is immutable" in spec_change.stderr
    after = crds_installed.get_json("brec", "-n", namespace)["items"][0]["status"]
    assert after == before
    assert after["activeMs"] == 2500


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pricePerGpuSecond", "0.1.2"),
        ("pricePerGpuSecond", "-1"),
        ("granularity", "1h"),
        ("currency", "usd"),
    ],
)
def test_billing_record_spec_validation(
    crds_installed: ClusterHandle, namespace: str, field: str, value: str
) -> None:
    record = copy.deepcopy(RECORD)
    record["spec"][field] = value
    result = crds_installed.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(record), check=False
    )
    assert result.returncode != 0
    assert f"spec.{field}" in result.stderr


class _MisspeltStatus(InferenceDeploymentStatus):
    """A status model with a field the CRD does not have (what a typo would produce)."""

    ready_replica: int = 1


async def test_status_writes_are_strict_so_an_unknown_field_is_an_error(
    crds_installed: ClusterHandle, namespace: str
) -> None:
    crds_installed.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(VALID))
    path = resource_path(API_VERSION, PLURAL, namespace, "probe", "status")
    async with crds_installed.kube() as kube:
        await kube.write_status(path, InferenceDeploymentStatus(replicas=2))
        with pytest.raises(ApiError) as refused:
            await kube.write_status(path, _MisspeltStatus(replicas=3))
        assert refused.value.status in (400, 422)
        assert "readyReplica" in json.dumps(refused.value.body)
        written = await kube.get(resource_path(API_VERSION, PLURAL, namespace, "probe"))
    assert written["status"]["replicas"] == 2, "nothing of the refused write was applied"
