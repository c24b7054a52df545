"""The Helm chart on a cluster: server-side validation, install/upgrade/uninstall, RBAC.

What ``helm template`` alone can check (lint, the values schema, rendering, the kube-score
policy) runs in the unit tier: tests/unit/test_chart_values.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from payper_dev.cluster import binaries
from payper_dev.testing.cluster import ClusterHandle, eventually

CHART = Path(__file__).resolve().parents[2] / "charts" / "payper"


def helm(
    cluster: ClusterHandle | None, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    command = [binaries.binary("helm"), *args]
    if cluster is not None:
        command += ["--kubeconfig", str(cluster.kubeconfig)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}: {result.stderr}")
    return result


@pytest.mark.parametrize("values", sorted(p.name for p in (CHART / "ci").glob("*-values.yaml")))
def test_every_ci_rendering_passes_strict_server_validation(
    crds_installed: ClusterHandle, namespace: str, values: str
) -> None:
    out = helm(
        None, "template", "t", str(CHART), "-n", namespace, "-f", str(CHART / "ci" / values)
    ).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(out) if doc}
    assert {
        "Deployment",
        "DaemonSet",
        "Service",
        "ClusterRole",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    } <= kinds
    result = crds_installed.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        namespace,
        "-f",
        "-",
        input=out,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "created (server dry run)" in result.stdout


def _pods(cluster: ClusterHandle, namespace: str, component: str) -> list[dict[str, Any]]:
    pods = cluster.get_json(
        "pods", "-n", namespace, "-l", f"app.kubernetes.io/component={component}"
    )
    return [p for p in pods["items"] if p["metadata"].get("deletionTimestamp") is None]


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
    )


def test_install_upgrade_and_uninstall_on_the_local_cluster(
    crds_installed: ClusterHandle, namespace: str
) -> None:
    cluster = crds_installed
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=privileged"
    )
    helm(cluster, "install", "pp", str(CHART), "-n", namespace, "--wait=false")

    def all_ready(gateways: int) -> bool:
        operator, gateway, agent = (
            _pods(cluster, namespace, c) for c in ("operator", "gateway", "agent")
        )
        return (
            len(operator) == 1
            and len(gateway) == gateways
            and len(agent) == 2
            and all(_ready(p) for p in operator + gateway + agent)
        )

    eventually(lambda: all_ready(2), 60, 0.5, "every workload Ready")
    agent_nodes = {p["spec"]["nodeName"] for p in _pods(cluster, namespace, "agent")}
    assert agent_nodes == {"gpu-node-0", "gpu-node-1"}, "the agent runs on GPU nodes only"

    def certificate() -> str:
        jsonpath = "jsonpath={.data.tls\\.crt}"
        name = "pp-payper-operator-tls"
        return str(cluster.kubectl("get", "secret", name, "-n", namespace, "-o", jsonpath).stdout)

    secret = certificate()

    helm(
        cluster,
        "upgrade",
        "pp",
        str(CHART),
        "-n",
        namespace,
        "--set",
        "gateway.replicas=3",
        "--set",
        "operator.billing.flushIntervalSeconds=5",
    )
    eventually(lambda: all_ready(3), 60, 0.5, "three gateways after the upgrade")
    config = cluster.kubectl(
        "get",
        "configmap",
        "pp-payper-operator",
        "-n",
        namespace,
        "-o",
        "jsonpath={.data.config\\.yaml}",
    ).stdout
    assert yaml.safe_load(config)["billing"]["flushIntervalSeconds"] == 5
    again = certificate()
    assert again == secret, "the generated certificate survives an upgrade"

    helm(cluster, "uninstall", "pp", "-n", namespace, "--wait")
    eventually(
        lambda: not any(_pods(cluster, namespace, c) for c in ("operator", "gateway", "agent")),
        60,
        0.5,
        "pods gone",
    )
    leftovers = cluster.kubectl(
        "get",
        "deploy,ds,svc,sa,configmap,secret",
        "-n",
        namespace,
        "-l",
        "app.kubernetes.io/instance=pp",
        "-o",
        "name",
    ).stdout
    assert leftovers.strip() == ""
    assert cluster.kubectl("get", "clusterrole", "pp-payper-operator", check=False).returncode != 0


EXPECTED = {
    # component: (allowed "verb resource" pairs, forbidden pairs)
    "operator": (
        [
            "create tokenreviews.authentication.k8s.io",
            "patch deployments.apps",
            "watch pods",
            "update billingrecords.payper.dev/status",
            "create billingrecords.payper.dev",
            "get nodes",
            "update leases.coordination.k8s.io",
        ],
        [
            "delete billingrecords.payper.dev",
            "list secrets",
            "delete deployments.apps",
            "update billingrecords.payper.dev",
            "create pods",
        ],
    ),
    "gateway": (
        ["watch inferencedeployments.payper.dev", "list pods", "watch secrets"],
        [
            "patch deployments.apps",
            "create tokenreviews.authentication.k8s.io",
            "update billingrecords.payper.dev/status",
            "get nodes",
            "create pods",
        ],
    ),
    "agent": (
        ["list pods", "watch pods"],
        [
            "list secrets",
            "create billingrecords.payper.dev",
            "patch deployments.apps",
            "update leases.coordination.k8s.io",
        ],
    ),
}


def _permissions(cluster: ClusterHandle, namespace: str, account: str) -> set[str]:
    out = cluster.kubectl(
        "auth",
        "can-i",
        "--list",
        "-n",
        namespace,
        f"--as=system:serviceaccount:{namespace}:{account}",
    ).stdout
    permissions = set()
    for line in out.splitlines()[1:]:
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) < 4 or not parts[0]:
            continue
        resource, verbs = parts[0], parts[3].strip("[]").split()
        assert "*" not in verbs or resource.startswith(("selfsubject", "/")), line
        assert resource != "*.*", line
        permissions |= {f"{verb} {resource}" for verb in verbs}
    return permissions


@pytest.mark.parametrize("component", sorted(EXPECTED))
def test_each_service_account_can_do_only_what_its_component_needs(
    crds_installed: ClusterHandle, namespace: str, component: str
) -> None:
    cluster = crds_installed
    out = helm(None, "template", "pp", str(CHART), "-n", namespace).stdout
    rbac = [
        d
        for d in yaml.safe_load_all(out)
        if d
        and d["kind"]
        in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    ]
    for doc in rbac:  # unique cluster-scoped names per test namespace
        if doc["kind"].startswith("Cluster"):
            doc["metadata"]["name"] = f"{namespace}-{doc['metadata']['name']}"
            if doc["kind"] == "ClusterRoleBinding":
                doc["roleRef"]["name"] = f"{namespace}-{doc['roleRef']['name']}"
    cluster.apply_items(rbac, "-n", namespace)
    try:
        permissions = _permissions(cluster, namespace, f"pp-payper-{component}")
        allowed, forbidden = EXPECTED[component]
        for permission in allowed:
            assert permission in permissions, (component, permission, sorted(permissions))
        for permission in forbidden:
            assert permission not in permissions, (component, permission)
    finally:
        for doc in rbac:
            if doc["kind"].startswith("Cluster"):
                cluster.kubectl("delete", doc["kind"].lower(), doc["metadata"]["name"], check=False)
