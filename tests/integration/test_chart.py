"""The Helm chart on a cluster: server-side validation, install/upgrade/uninstall, RBAC.

What ``helm template`` alone can check (lint, the values schema, rendering, the kube-score
policy) runs in the unit tier: tests/unit/test_chart_values.py.
"""

from __future__ import annotations

import json
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
    # Every object names its namespace: the release's, or the agent's own, which a dry
    # run cannot create before the objects in it.
    agents = f"{namespace}-agent"
    crds_installed.kubectl("create", "namespace", agents)
    try:
        result = crds_installed.kubectl(
            "apply", "--dry-run=server", "--validate=strict", "-f", "-", input=out, check=False
        )
    finally:
        crds_installed.kubectl("delete", "namespace", agents, "--wait=false", check=False)
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
    # The operator and the gateway run restricted; the agent in the privileged namespace
    # of its own that the chart creates.
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    agents = f"{namespace}-agent"
    # The records policy applies to this namespace only: the shared test cluster's other
    # tests run their operator as the admin user.
    selector = json.dumps({"matchLabels": {"kubernetes.io/metadata.name": namespace}})
    helm(
        cluster,
        "install",
        "pp",
        str(CHART),
        "-n",
        namespace,
        "--wait=false",
        "--set-json",
        f"recordsPolicy.namespaceSelector={selector}",
    )
    assert cluster.kubectl("get", "validatingadmissionpolicy", "pp-payper-records").returncode == 0

    def all_ready(gateways: int) -> bool:
        operator, gateway = (_pods(cluster, namespace, c) for c in ("operator", "gateway"))
        agent = _pods(cluster, agents, "agent")
        return (
            len(operator) == 1
            and len(gateway) == gateways
            and len(agent) == 2
            and all(_ready(p) for p in operator + gateway + agent)
        )

    eventually(lambda: all_ready(2), 60, 0.5, "every workload Ready")
    # A tenant with the built-in edit role runs InferenceDeployments and reads its bills,
    # and may write neither a record nor a status (aggregated ClusterRoles).
    cluster.kubectl(
        "create",
        "rolebinding",
        "tenant-edit",
        "--clusterrole=edit",
        "--user=tenant",
        "-n",
        namespace,
    )

    def tenant_may(verb: str, resource: str, *extra: str) -> bool:
        answer = cluster.kubectl(
            "auth", "can-i", verb, resource, *extra, "--as=tenant", "-n", namespace, check=False
        )
        return answer.stdout.strip() == "yes"

    eventually(
        lambda: tenant_may("create", "inferencedeployments.payper.dev"),
        30,
        0.5,
        "edit to aggregate the tenant roles",
    )
    assert tenant_may("list", "billingrecords.payper.dev")
    assert not tenant_may("create", "billingrecords.payper.dev")
    assert not tenant_may("patch", "inferencedeployments.payper.dev", "--subresource=status")
    agent_nodes = {p["spec"]["nodeName"] for p in _pods(cluster, agents, "agent")}
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
        "--set-json",
        f"recordsPolicy.namespaceSelector={selector}",
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
        lambda: (
            not any(_pods(cluster, namespace, c) for c in ("operator", "gateway"))
            and cluster.kubectl("get", "namespace", agents, check=False).returncode != 0
        ),
        90,
        0.5,
        "pods and the agent's namespace gone",
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
    for role in ("pp-payper-operator", "pp-payper-tenant-view", "pp-payper-tenant-edit"):
        assert cluster.kubectl("get", "clusterrole", role, check=False).returncode != 0
    for kind in ("validatingadmissionpolicy", "validatingadmissionpolicybinding"):
        assert cluster.kubectl("get", kind, "pp-payper-records", check=False).returncode != 0


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
            "list secrets",  # API key Secrets: it publishes their digests for the gateway
            "watch secrets",
        ],
        [
            "delete billingrecords.payper.dev",
            "update secrets",
            "patch secrets",
            "delete secrets",
            "delete deployments.apps",
            "update billingrecords.payper.dev",
            "create pods",
        ],
    ),
    "gateway": (
        ["watch inferencedeployments.payper.dev", "list pods"],
        [
            "get secrets",
            "list secrets",
            "watch secrets",
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
    # Every account in the test's namespace (the agent's own namespace is the chart's
    # default; here it only matters what each account may do).
    out = helm(
        None, "template", "pp", str(CHART), "-n", namespace,
        "--set", f"agent.namespace.name={namespace}", "--set", "agent.namespace.create=false",
    ).stdout  # fmt: skip
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


def _as_account(cluster: ClusterHandle, namespace: str, account: str, directory: Path) -> list[str]:
    """kubectl arguments that act as ``account`` with its own token (a kubeconfig of its
    own: the admin's client certificate would otherwise authenticate first)."""
    token = cluster.kubectl("create", "token", account, "-n", namespace).stdout.strip()
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"] = [{"name": account, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = account
    path = directory / f"{account}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return [f"--kubeconfig={path}"]


def test_only_the_operator_writes_records_whatever_rbac_a_tenant_has(
    crds_installed: ClusterHandle, namespace: str, tmp_path: Path
) -> None:
    """A tenant admin with the common `payper.dev/*` Role tries to forge next hour's record
    at price 0, edit a record, delete one, and patch its deployment's status."""
    cluster = crds_installed
    selector = json.dumps({"matchLabels": {"kubernetes.io/metadata.name": namespace}})
    out = helm(
        None,
        "template",
        "pp",
        str(CHART),
        "-n",
        namespace,
        "--set-json",
        f"recordsPolicy.namespaceSelector={selector}",
        "-s",
        "templates/records-admission-policy.yaml",
        "-s",
        "templates/records-admission-policy-binding.yaml",
    ).stdout
    policy = [d for d in yaml.safe_load_all(out) if d]
    for doc in policy:  # cluster-scoped: a name of this test's own
        doc["metadata"]["name"] = f"{namespace}-records"
        if doc["kind"] == "ValidatingAdmissionPolicyBinding":
            doc["spec"]["policyName"] = f"{namespace}-records"
    everything = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "payper-everything"},
        "rules": [{"apiGroups": ["payper.dev"], "resources": ["*"], "verbs": ["*"]}],
    }
    accounts = ["tenant-admin", "pp-payper-operator"]
    bindings = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "payper-everything"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "payper-everything",
            },
            "subjects": [
                *({"kind": "ServiceAccount", "name": a, "namespace": namespace} for a in accounts),
                {
                    "kind": "Group",
                    "name": "payper:break-glass",
                    "apiGroup": "rbac.authorization.k8s.io",
                },
            ],
        }
    ]
    cluster.apply_items(
        [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": a}} for a in accounts]
        + [everything, *bindings],
        "-n",
        namespace,
    )
    record = {
        "apiVersion": "payper.dev/v1alpha1",
        "kind": "BillingRecord",
        "metadata": {"name": "llm-next-hour", "namespace": namespace},
        "spec": {
            "inferenceDeployment": "llm",
            "account": namespace,
            "window": {"start": "2026-11-26T11:00:00Z", "end": "2026-11-26T12:00:00Z"},
            "plan": "default",
            "granularity": "1s",
            "currency": "USD",
            "pricePerGpuSecond": "0",
            "reservedPricePerGpuHour": "0",
            "gpuProduct": "NVIDIA-H100-80GB-HBM3",
        },
    }
    infd = {
        "apiVersion": "payper.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "llm", "namespace": namespace},
        "spec": {
            "template": {
                "spec": {
                    "containers": [{"name": "s", "image": "x", "ports": [{"containerPort": 80}]}]
                }
            }
        },
    }
    cluster.apply_items([infd])
    tenant = _as_account(cluster, namespace, "tenant-admin", tmp_path)
    operator = _as_account(cluster, namespace, "pp-payper-operator", tmp_path)
    status = json.dumps({"status": {"readyReplicas": 9}})
    patch_status = [
        "patch",
        "infd",
        "llm",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        status,
    ]
    cluster.apply_items(policy)
    try:

        def refused(*args: str, input: str | None = None) -> str:
            result = cluster.kubectl(*args, input=input, check=False)
            assert result.returncode != 0, (args, result.stdout)
            return str(result.stderr)

        def policy_enforced() -> bool:
            # A dry run: were the policy not in force yet, nothing is created.
            result = cluster.kubectl(
                *tenant,
                "create",
                "--dry-run=server",
                "-f",
                "-",
                input=json.dumps(record),
                check=False,
            )
            assert "AlreadyExists" not in result.stderr
            return result.returncode != 0 and "only payper-operator" in result.stderr

        eventually(policy_enforced, 30, 0.5, "the policy to be enforced")
        message = refused(*tenant, "create", "-f", "-", input=json.dumps(record))
        assert f"system:serviceaccount:{namespace}:tenant-admin may not create" in message
        message = refused(*tenant, *patch_status)
        assert "may not update inferencedeployments/status" in message
        # The operator's own ServiceAccount may, as may the break-glass group.
        cluster.kubectl(*operator, "create", "-f", "-", input=json.dumps(record))
        cluster.kubectl(*operator, *patch_status)
        for verb in (
            ["label", "brec", "llm-next-hour", "-n", namespace, "forged=yes"],
            ["delete", "brec", "llm-next-hour", "-n", namespace],
        ):
            assert "only payper-operator" in refused(*tenant, *verb)
        cluster.kubectl(
            "label",
            "brec",
            "llm-next-hour",
            "-n",
            namespace,
            "audited=yes",
            "--as=auditor",
            "--as-group=payper:break-glass",
        )
        # Deleting the namespace is not blocked: the namespace controller removes the records.
        cluster.kubectl(
            "delete", "namespace", namespace, "--wait=true", "--timeout=120s", timeout=150
        )
        gone = cluster.kubectl("get", "namespace", namespace, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr
    finally:
        for doc in policy:
            cluster.kubectl("delete", doc["kind"].lower(), doc["metadata"]["name"], check=False)
