"""The chart checked by ``helm template`` alone: values, schema, rendering and policy.

None of this needs a cluster, so it runs in the unit tier. The heart of it: helm must
refuse exactly the operator settings the operator would refuse at start-up, naming the
key, because ``values.schema.json`` is generated from the operator's models
(``make chart-schema``). Values helm accepts render a config file the operator loads.

Policy check: kube-score on the default rendering must report nothing CRITICAL, and only
these WARNINGs, each accepted on purpose (docs/security.md):

- no egress NetworkPolicy: the components talk to the API server and to pods whose
  addresses differ per cluster; ingress is restricted;
- the operator's Recreate strategy and single replica: exactly one active operator
  (its Lease handles the rest);
and, by annotation on the agent DaemonSet, its root user (hostPID and /proc access).
``container-image-pull-policy`` is ignored: images are pinned to version tags.

helm and kube-score come from ``make binaries`` (``make test-unit`` builds them first);
where they are missing these tests fail saying so, never skip quietly.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml
from pydantic import Field, ValidationError

from payper.api.common import DECIMAL_PATTERN
from payper.billing.config import WINDOW_LENGTHS
from payper.operator.config import AutoscalerConfig, OperatorConfig, load
from payper_dev import chart_schema
from payper_dev.cluster import binaries

CHART = Path(__file__).resolve().parents[2] / "charts" / "payper"
ACCEPTED_WARNINGS = (
    "The pod does not have a matching egress NetworkPolicy",
    "Deployment update strategy",
    "Deployment few replicas",
)
GOLD_PLAN = {"pricePerGpuSecond": {"default": "0.1"}, "reservedPricePerGpuHour": {"default": "1"}}


def tool(name: str) -> str:
    try:
        return binaries.binary(name)
    except binaries.BuildError as error:
        raise AssertionError(f"needs {name}: run `make binaries` first ({error})") from error


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [tool("helm"), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}: {result.stderr}")
    return result


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "t", str(CHART), "-n", "payper-system", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def values_file(tmp_path: Path, operator: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"operator": operator}))
    return str(path)


def merged(defaults: Any, overrides: Any) -> Any:
    """``overrides`` over ``defaults``, maps merged key by key, as Helm merges values."""
    if not (isinstance(defaults, dict) and isinstance(overrides, dict)):
        return overrides
    out = dict(defaults)
    for key, value in overrides.items():
        out[key] = merged(defaults[key], value) if key in defaults else value
    return out


def operator_settings(operator: dict[str, Any]) -> dict[str, Any]:
    """What the operator would be given for ``operator`` values, were helm not to check."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]
    return {
        section: merged(defaults[section], operator.get(section, {}))
        for section in chart_schema.FROM_THE_MODEL
    }


def operator_config_file(tmp_path: Path, *args: str) -> Path:
    """The operator's config file as the chart renders it with ``args``."""
    (config_map,) = render("-s", "templates/operator-configmap.yaml", *args)
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    return path


# -- the schema generator ---------------------------------------------------------------


def test_checked_in_schema_matches_the_models() -> None:
    assert chart_schema.drift(CHART) == ""


def test_operator_part_speaks_the_wire_names_and_the_models_constraints() -> None:
    sections = chart_schema.operator_sections()
    billing = sections["billing"]["properties"]
    assert "windowSeconds" in billing and "window_seconds" not in billing
    assert "ledgerConfigMap" not in billing, "the chart's template sets it"
    assert billing["windowSeconds"]["enum"] == list(WINDOW_LENGTHS)
    plan = billing["plans"]["additionalProperties"]
    price = plan["properties"]["pricePerGpuSecond"]
    assert price["additionalProperties"]["pattern"] == DECIMAL_PATTERN
    assert price["required"] == ["default"]
    assert "patternProperties" not in billing["plans"], "plan names are closed"
    assert "tickSeconds" in sections["autoscaler"]["properties"]


def test_drift_is_reported_when_a_model_constraint_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class StricterAutoscaler(AutoscalerConfig):
        tick_seconds: Annotated[float, Field(ge=0.5, le=10)] = 1.0

    class ChangedConfig(OperatorConfig):
        autoscaler: StricterAutoscaler = Field(default_factory=StricterAutoscaler)

    monkeypatch.setattr(chart_schema, "OperatorConfig", ChangedConfig)
    problems = chart_schema.drift(CHART)
    assert '+              "minimum": 0.5,' in problems
    assert '-              "minimum": 0.1,' in problems


def test_a_base_that_hand_writes_a_generated_section_is_an_error(tmp_path: Path) -> None:
    base = json.loads((CHART / chart_schema.BASE_FILE).read_text())
    base["properties"]["operator"]["properties"]["billing"] = {"type": "object"}
    (tmp_path / chart_schema.BASE_FILE).write_text(json.dumps(base))
    with pytest.raises(chart_schema.SchemaMergeError, match=r"operator\.billing"):
        chart_schema.render(tmp_path)


# -- helm refuses what the operator refuses, and only that -------------------------------


@pytest.mark.parametrize("values", sorted(p.name for p in (CHART / "ci").glob("*-values.yaml")))
def test_ci_values_render_a_config_the_operator_loads(tmp_path: Path, values: str) -> None:
    given = yaml.safe_load((CHART / "ci" / values).read_text()) or {}
    config = load(operator_config_file(tmp_path, "-f", str(CHART / "ci" / values)))
    billing = given.get("operator", {}).get("billing", {})
    assert config.billing.window_seconds == billing.get("windowSeconds", 3600)
    assert sorted(config.billing.plans) == sorted(billing.get("plans", {"default": None}))


REFUSED = {
    "window-15s": ({"billing": {"windowSeconds": 15}}, "'/operator/billing/windowSeconds'"),
    "window-70s": ({"billing": {"windowSeconds": 70}}, "'/operator/billing/windowSeconds'"),
    "window-two-days": (
        {"billing": {"windowSeconds": 172800}},
        "'/operator/billing/windowSeconds'",
    ),
    "price-13-decimals": (
        {"billing": {"plans": {"default": {"pricePerGpuSecond": {"default": "0.0000000000001"}}}}},
        "'/operator/billing/plans/default/pricePerGpuSecond/default'",
    ),
    "price-19-digits": (
        {"billing": {"plans": {"default": {"reservedPricePerGpuHour": {"default": "1" * 19}}}}},
        "'/operator/billing/plans/default/reservedPricePerGpuHour/default'",
    ),
    "price-as-a-number": (
        {"billing": {"plans": {"default": {"pricePerGpuSecond": {"default": 0.5}}}}},
        "'/operator/billing/plans/default/pricePerGpuSecond/default'",
    ),
    "price-table-without-default": (
        {"billing": {"plans": {"gold": {**GOLD_PLAN, "pricePerGpuSecond": {"H100": "1"}}}}},
        "'/operator/billing/plans/gold/pricePerGpuSecond': missing property 'default'",
    ),
    "plan-without-reserved-price": (
        {"billing": {"plans": {"gold": {"pricePerGpuSecond": {"default": "1"}}}}},
        "missing property 'reservedPricePerGpuHour'",
    ),
    "plan-name-not-a-dns-label": (
        {"billing": {"plans": {"Gold_Plan": GOLD_PLAN}}},
        "'Gold_Plan' does not match pattern",
    ),
    "currency-lowercase": (
        {"billing": {"plans": {"gold": {**GOLD_PLAN, "currency": "usd"}}}},
        "'/operator/billing/plans/gold/currency'",
    ),
    "granularity-1h": (
        {"billing": {"plans": {"gold": {**GOLD_PLAN, "granularity": "1h"}}}},
        "'/operator/billing/plans/gold/granularity'",
    ),
    "unknown-billing-key": (
        {"billing": {"windowSecond": 3600}},
        "'/operator/billing': additional properties 'windowSecond' not allowed",
    ),
    "unknown-autoscaler-key": (
        {"autoscaler": {"tick": 1}},
        "'/operator/autoscaler': additional properties 'tick' not allowed",
    ),
    "unknown-plan-key": (
        {"billing": {"plans": {"gold": {**GOLD_PLAN, "discount": "0.1"}}}},
        "additional properties 'discount' not allowed",
    ),
    "tick-too-short": ({"autoscaler": {"tickSeconds": 0.05}}, "'/operator/autoscaler/tickSeconds'"),
    "panic-window-fraction": (
        {"autoscaler": {"panicWindowSeconds": 2.5}},
        "'/operator/autoscaler/panicWindowSeconds'",
    ),
    "flush-too-long": (
        {"billing": {"flushIntervalSeconds": 301}},
        "'/operator/billing/flushIntervalSeconds'",
    ),
    "no-retention-at-all": (
        {"billing": {"recordRetentionDays": 0}},
        "'/operator/billing/recordRetentionDays'",
    ),
    # Plan references, which JSON Schema cannot check: the templates fail instead.
    "default-plan-not-configured": (
        {"billing": {"defaultPlan": "gold"}},
        'operator.billing.defaultPlan: "gold" is not a configured plan (configured: default)',
    ),
    "grant-of-a-plan-not-configured": (
        {"billing": {"grants": [{"namespaces": ["a"], "plans": ["gold"], "defaultPlan": "gold"}]}},
        'operator.billing.grants.0.plans: "gold" is not a configured plan',
    ),
    "grant-default-not-among-its-plans": (
        {
            "billing": {
                "plans": {"gold": GOLD_PLAN},
                "grants": [{"namespaces": ["a"], "plans": ["default"], "defaultPlan": "gold"}],
            }
        },
        'operator.billing.grants.0.defaultPlan: "gold" is not among its plans',
    ),
    "grant-naming-no-namespace": (
        {"billing": {"grants": [{"plans": ["default"], "defaultPlan": "default"}]}},
        "operator.billing.grants.0: a grant names namespaces, a namespaceSelector, or both",
    ),
}


@pytest.mark.parametrize(("operator", "names_the_key"), REFUSED.values(), ids=REFUSED.keys())
def test_helm_refuses_what_the_operator_refuses_naming_the_key(
    tmp_path: Path, operator: dict[str, Any], names_the_key: str
) -> None:
    with pytest.raises(ValidationError) as refusal:
        OperatorConfig.model_validate(operator_settings(operator))
    (problem,) = refusal.value.errors()  # refused for this key, not for another reason
    key = [str(part) for part in problem["loc"] if part != "[key]"][-1]
    result = helm("template", "t", str(CHART), "-f", values_file(tmp_path, operator), check=False)
    assert result.returncode != 0
    assert names_the_key in result.stderr, result.stderr
    assert key in result.stderr, (key, result.stderr)


ACCEPTED = {
    "shortest-window": ({"billing": {"windowSeconds": 10}}, "billing.window_seconds", 10),
    "a-day-long-window": ({"billing": {"windowSeconds": 86400}}, "billing.window_seconds", 86400),
    "window-that-divides-a-day": (
        {"billing": {"windowSeconds": 1350}},
        "billing.window_seconds",
        1350,
    ),
    "price-12-decimals": (
        {"billing": {"plans": {"default": {"pricePerGpuSecond": {"default": "0.000000000001"}}}}},
        "billing.plans.default.price_per_gpu_second.default",
        "0.000000000001",
    ),
    "price-18-digits": (
        {"billing": {"plans": {"gold": {**GOLD_PLAN, "pricePerGpuSecond": {"default": "9" * 18}}}}},
        "billing.plans.gold.price_per_gpu_second.default",
        "9" * 18,
    ),
    "shortest-tick": ({"autoscaler": {"tickSeconds": 0.1}}, "autoscaler.tick_seconds", 0.1),
    "records-kept-three-days": (
        {"billing": {"recordRetentionDays": 3}},
        "billing.record_retention_days",
        3,
    ),
    "records-kept-for-ever": ({}, "billing.record_retention_days", None),
    "exported-records-kept-three-days": (
        {
            "billing": {
                "export": {"sinks": [{"name": "m", "type": "cloudevents", "url": "http://m/"}]}
            }
        },
        "billing.retention_days",
        3,
    ),
    "a-grant-by-label": (
        {
            "billing": {
                "plans": {"gold": GOLD_PLAN},
                "grants": [
                    {
                        "namespaceSelector": {"example.com/tier": "gold"},
                        "plans": ["default", "gold"],
                        "defaultPlan": "gold",
                    }
                ],
            }
        },
        "billing.grants.0.default_plan",
        "gold",
    ),
}


@pytest.mark.parametrize(
    ("operator", "attribute", "wanted"), ACCEPTED.values(), ids=ACCEPTED.keys()
)
def test_values_helm_accepts_render_a_config_the_operator_loads(
    tmp_path: Path, operator: dict[str, Any], attribute: str, wanted: object
) -> None:
    config: Any = load(operator_config_file(tmp_path, "-f", values_file(tmp_path, operator)))
    for part in attribute.split("."):
        if isinstance(config, dict):
            config = config[part]
        elif isinstance(config, list):
            config = config[int(part)]
        else:
            config = getattr(config, part)
    assert config == wanted


def test_the_operator_may_delete_records_only_when_a_retention_is_set(tmp_path: Path) -> None:
    """Least privilege: deleting BillingRecords is granted with a retention only."""

    def record_verbs(*values: str) -> list[str]:
        rendered = helm(
            "template", "t", str(CHART), "--show-only=templates/operator-clusterrole.yaml", *values
        ).stdout
        (role,) = [d for d in yaml.safe_load_all(rendered) if d]
        (rule,) = [r for r in role["rules"] if r["resources"] == ["billingrecords"]]
        return list(rule["verbs"])

    assert "delete" not in record_verbs()
    assert "delete" in record_verbs("--set", "operator.billing.recordRetentionDays=3")
    # Sinks imply a retention of 3 days for Exported records.
    sinks = tmp_path / "sinks.yaml"
    sinks.write_text(
        yaml.safe_dump(
            {
                "operator": {
                    "billing": {
                        "export": {
                            "sinks": [{"name": "meter", "type": "cloudevents", "url": "http://m/"}]
                        }
                    }
                }
            }
        )
    )
    assert "delete" in record_verbs("-f", str(sinks))


def test_keys_the_chart_sets_itself_are_refused() -> None:
    result = helm(
        "template", "t", str(CHART), "--set", "operator.billing.ledgerConfigMap=x", check=False
    )
    assert result.returncode != 0
    assert "additional properties 'ledgerConfigMap' not allowed" in result.stderr, result.stderr


@pytest.mark.parametrize("section", ["autoscaler", "billing"])
def test_a_null_section_is_refused_naming_it(section: str) -> None:
    # A null passes Helm's schema check (it means "drop the key"); the template refuses it.
    result = helm("template", "t", str(CHART), "--set", f"operator.{section}=null", check=False)
    assert result.returncode != 0
    assert f"operator.{section}: must be a map of settings, not null" in result.stderr


# -- the rest of the chart: lint, schema, rendering, policy ------------------------------


def test_helm_lint() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_values_schema_rejects_unknown_and_mistyped_values() -> None:
    for args, message in (
        (["--set", "bogus=1"], "additional properties 'bogus' not allowed"),
        (["--set", "gateway.replicas=two"], "/gateway/replicas"),
        (["--set", "agent.nvmlApi=v3"], "/agent/nvmlApi"),
        (
            ["--set", "operator.billing.plans.default.pricePerGpuSecond.default=cheap"],
            "pricePerGpuSecond",
        ),
        (["--set", "operator.billing.plans.default.granularity=1h"], "granularity"),
    ):
        result = helm("template", "t", str(CHART), *args, check=False)
        assert result.returncode != 0
        assert message in result.stderr, result.stderr


def test_kube_score_finds_nothing_but_the_accepted_exceptions(tmp_path: Path) -> None:
    rendered = tmp_path / "default.yaml"
    rendered.write_text(helm("template", "t", str(CHART), "-n", "payper-system").stdout)
    result = subprocess.run(
        [
            tool("kube-score"),
            "score",
            str(rendered),
            "--ignore-test",
            "container-image-pull-policy",
            "--output-format",
            "ci",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("[CRITICAL]")], result.stdout
    warnings = [line for line in lines if line.startswith("[WARNING]")]
    assert all(any(w in line for w in ACCEPTED_WARNINGS) for line in warnings), warnings
    assert result.returncode == 0


def test_monitors_render_only_where_the_prometheus_operator_api_exists() -> None:
    without = {d["kind"] for d in render()}
    assert not {"ServiceMonitor", "PodMonitor"} & without
    docs = render(
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
        "--api-versions",
        "monitoring.coreos.com/v1/PodMonitor",
        "--set",
        "monitoring.serviceMonitor.labels.release=kube-prometheus",
    )
    monitors = [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")]
    assert sorted(d["kind"] for d in monitors) == ["PodMonitor", "ServiceMonitor", "ServiceMonitor"]
    service_monitors = [d for d in monitors if d["kind"] == "ServiceMonitor"]
    assert all(d["metadata"]["labels"]["release"] == "kube-prometheus" for d in service_monitors)


def test_dashboards_ship_with_the_sidecar_label() -> None:
    (config_map,) = [
        d
        for d in render("--set", "dashboards.label=my_label")
        if d["metadata"]["name"].endswith("dashboards")
    ]
    assert config_map["metadata"]["labels"]["my_label"] == "1"
    board = json.loads(config_map["data"]["payper-billing.json"])
    assert board["uid"] == "payper-billing"
    assert [v["name"] for v in board["templating"]["list"]] == [
        "datasource",
        "namespace",
        "deployment",
    ]


def test_restricted_security_context_except_the_agent() -> None:
    docs = {d["metadata"]["name"]: d for d in render() if d["kind"] in ("Deployment", "DaemonSet")}
    for name in ("t-payper-operator", "t-payper-gateway"):
        pod = docs[name]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
    operator = docs["t-payper-operator"]["spec"]
    assert operator["replicas"] == 1
    assert operator["strategy"]["type"] == "Recreate"
    agent = docs["t-payper-agent"]["spec"]["template"]["spec"]
    assert agent["hostPID"] is True
    assert agent["priorityClassName"] == "system-node-critical"
    assert agent["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (container,) = agent["containers"]
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"} in container["env"]
    assert "resources" in container
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/var/lib/kubelet/pod-resources"]["readOnly"] is True
    volumes = {v["name"]: v for v in agent["volumes"]}
    # A node without the kubelet's pod-resources directory still runs the agent.
    assert volumes["pod-resources"]["hostPath"]["type"] == "DirectoryOrCreate"
    token = next(v for v in agent["volumes"] if v["name"] == "operator-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "payper-operator"


def _agent_container(*args: str) -> tuple[dict[str, Any], dict[str, Any]]:
    agent = next(d for d in render(*args) if d["kind"] == "DaemonSet")
    pod = agent["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_the_agent_meters_nvml_unless_development_values_say_simulated() -> None:
    pod, container = _agent_container()
    assert not any(a.startswith(("--backend", "--sim-")) for a in container["args"])
    assert "simulated-gpus" not in json.dumps(pod["volumes"])
    pod, container = _agent_container(
        "--set", "agent.simulatedBackend.enabled=true",
        "--set", "agent.simulatedBackend.product=A: B",
        "--set", "agent.simulatedBackend.hostPath=/srv/sim",
    )  # fmt: skip
    args = container["args"]
    assert "--backend=simulated" in args
    assert "--sim-cgroups=proc" in args  # the real containers' cgroups, from hostPID /proc
    assert "--sim-product=A: B" in args  # quoted: a colon does not break the YAML
    volume = next(v for v in pod["volumes"] if v["name"] == "simulated-gpus")
    assert volume["hostPath"] == {"path": "/srv/sim", "type": "Directory"}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "simulated-gpus")
    assert mount["readOnly"] is True
    refused = helm(
        "template", "t", str(CHART), "--set", "agent.simulatedBackend.hostPath=relative",
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "simulatedBackend/hostPath" in refused.stderr


def test_the_agent_has_a_namespace_of_its_own_so_the_release_can_be_restricted() -> None:
    docs = render()
    agent_kinds = {
        d["kind"]: d["metadata"].get("namespace")
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "agent"
    }
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    assert namespace["metadata"]["name"] == "payper-system-agent"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for kind in ("DaemonSet", "ServiceAccount", "NetworkPolicy", "ConfigMap"):
        assert agent_kinds[kind] == "payper-system-agent", kind
    binding = next(
        d for d in docs if d["kind"] == "ClusterRoleBinding" and "agent" in d["metadata"]["name"]
    )
    assert binding["subjects"][0]["namespace"] == "payper-system-agent"
    config = yaml.safe_load(
        next(
            d
            for d in docs
            if d["metadata"]["name"] == "t-payper-operator" and d["kind"] == "ConfigMap"
        )["data"]["config.yaml"]
    )
    assert config["identity"]["agentServiceAccounts"] == ["payper-system-agent:t-payper-agent"]
    # The operator's API admits agents from their namespace only.
    policy = next(
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "t-payper-operator"
    )
    assert policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "payper-system-agent"}
    }
    # The agent mounts the CA from its namespace's ConfigMap: the same CA as the Secret's.
    secret = next(d for d in docs if d["kind"] == "Secret")
    ca = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "t-payper-operator-ca"
    )
    assert (
        base64.b64decode(secret["data"]["ca.crt"]).decode().strip() == ca["data"]["ca.crt"].strip()
    )
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    volume = next(
        v for v in daemonset["spec"]["template"]["spec"]["volumes"] if v["name"] == "operator-ca"
    )
    assert volume["configMap"]["name"] == "t-payper-operator-ca"


def test_an_agent_namespace_named_by_the_platform() -> None:
    docs = render(
        "--set", "agent.namespace.name=gpu-agents", "--set", "agent.namespace.create=false"
    )
    assert not [d for d in docs if d["kind"] == "Namespace"]
    assert (
        next(d for d in docs if d["kind"] == "DaemonSet")["metadata"]["namespace"] == "gpu-agents"
    )
    refused = helm(
        "template", "t", str(CHART), "--set", "agent.namespace.name=Bad_Name", check=False
    )
    assert refused.returncode != 0 and "agent/namespace/name" in refused.stderr


def test_an_existing_tls_secret_needs_its_ca_for_the_agents() -> None:
    refused = helm(
        "template", "t", str(CHART), "--set", "operator.tls.existingSecret=mine", check=False
    )
    assert refused.returncode != 0
    assert "operator.tls.caCertificate" in refused.stderr
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    docs = render(
        "--set", "operator.tls.existingSecret=mine", "--set", f"operator.tls.caCertificate={pem}"
    )
    assert not [d for d in docs if d["kind"] == "Secret"]
    ca = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "t-payper-operator-ca"
    )
    assert ca["data"]["ca.crt"].strip() == pem


def test_the_export_alerts_are_valid_rules_that_fire_when_they_should(tmp_path: Path) -> None:
    """promtool checks the chart's PrometheusRule and runs it on series: a backlog past
    its bound for 15 minutes, a sink failing everything, a sink refusing some records'
    usage, a record held from export."""
    rendered = helm(
        "template", "t", str(CHART), "--api-versions", "monitoring.coreos.com/v1/PrometheusRule",
        "--show-only=templates/operator-prometheusrule.yaml",
    ).stdout  # fmt: skip
    (rule,) = [d for d in yaml.safe_load_all(rendered) if d]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    check = subprocess.run(
        ["promtool", "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}

    def expected(name: str, labels: dict[str, str], value: str = "") -> dict[str, Any]:
        annotations = {
            key: text.replace("{{ $labels.sink }}", labels.get("sink", ""))
            .replace("{{ $labels.namespace }}", labels.get("namespace", ""))
            .replace("{{ $value }}", value)
            for key, text in alerts[name]["annotations"].items()
        }
        return {
            "exp_labels": {**alerts[name]["labels"], **labels},
            "exp_annotations": annotations,
        }

    tests = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'payper_export_backlog_exceeded{sink="meter"}',
                        "values": "0 0 0 1x40",
                    },
                    {"series": 'payper_export_backlog_exceeded{sink="other"}', "values": "0x40"},
                    {"series": 'payper_export_refused_records{sink="stripe"}', "values": "0 3x60"},
                    {"series": 'payper_export_refused_records{sink="meter"}', "values": "0x60"},
                    {
                        "series": 'payper_export_held_records{namespace="team-a"}',
                        "values": "0 0 2x20",
                    },
                    {
                        "series": 'payper_export_events_total{sink="meter",result="failed"}',
                        "values": "0+10x60",
                    },
                    {
                        "series": 'payper_export_events_total{sink="meter",result="sent"}',
                        "values": "5x60",
                    },
                    {
                        "series": 'payper_export_events_total{sink="other",result="sent"}',
                        "values": "0+10x60",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "PayperExportBacklog", "exp_alerts": []},
                    {
                        "eval_time": "25m",
                        "alertname": "PayperExportBacklog",
                        "exp_alerts": [expected("PayperExportBacklog", {"sink": "meter"})],
                    },
                    {"eval_time": "5m", "alertname": "PayperExportHeldRecords", "exp_alerts": []},
                    {
                        "eval_time": "10m",
                        "alertname": "PayperExportHeldRecords",
                        "exp_alerts": [
                            expected("PayperExportHeldRecords", {"namespace": "team-a"}, "2")
                        ],
                    },
                    {"eval_time": "20m", "alertname": "PayperExportRefused", "exp_alerts": []},
                    {
                        "eval_time": "40m",
                        "alertname": "PayperExportRefused",
                        "exp_alerts": [expected("PayperExportRefused", {"sink": "stripe"}, "3")],
                    },
                    {"eval_time": "10m", "alertname": "PayperExportFailing", "exp_alerts": []},
                    {
                        "eval_time": "40m",
                        "alertname": "PayperExportFailing",
                        "exp_alerts": [expected("PayperExportFailing", {"sink": "meter"})],
                    },
                ],
            }
        ],
    }
    test_file = tmp_path / "test.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    run = subprocess.run(
        ["promtool", "test", "rules", str(test_file)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_stripe_sink_reads_its_key_from_a_secret_the_chart_mounts(tmp_path: Path) -> None:
    """The platform's Stripe key lives in a Secret of its own: the chart mounts it
    read-only where the sink's apiKeyFile points, and nothing else changes."""
    key_file = "/var/run/secrets/payper/export/payper-stripe/api-key"
    stripe_sink = {
        "name": "stripe",
        "type": "stripe",
        "apiKeyFile": key_file,
        "customers": {"team-a": "cus_A1"},
        "meters": {"by": "gpuProduct", "eventNames": {"NVIDIA-H100-80GB-HBM3": "h100_seconds"}},
    }
    operator = {"exportSecrets": ["payper-stripe"], "billing": {"export": {"sinks": [stripe_sink]}}}
    values = values_file(tmp_path, operator)
    config = load(operator_config_file(tmp_path, "-f", values))
    (sink,) = config.billing.export.sinks
    assert sink.type == "stripe" and str(sink.api_key_file) == key_file
    (deployment,) = render("-f", values, "--show-only=templates/operator-deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (name,) = [
        n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == "payper-stripe"
    ]
    assert mounts[name]["readOnly"] is True
    assert key_file.startswith(mounts[name]["mountPath"] + "/")
    # A customer id that is not one, or a Secret name Kubernetes would refuse: helm says so.
    bad = merged(
        operator,
        {"billing": {"export": {"sinks": [{**stripe_sink, "customers": {"team-a": "a@b"}}]}}},
    )
    refused = helm("template", "t", str(CHART), "-f", values_file(tmp_path, bad), check=False)
    assert refused.returncode != 0 and "customers" in refused.stderr
    refused = helm(
        "template", "t", str(CHART), "--set", "operator.exportSecrets={Bad_Name}", check=False
    )
    assert refused.returncode != 0 and "exportSecrets" in refused.stderr
