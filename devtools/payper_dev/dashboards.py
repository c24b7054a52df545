"""Grafana billing dashboards, built as code with grafana-foundation-sdk.

``make dashboards`` writes the JSON into ``charts/payper/dashboards/`` (shipped as
ConfigMaps for the Grafana sidecar); ``make dashboards-check`` fails when the checked-in
JSON differs from what this module builds. The queries live in ``PANELS`` so the tests
can run every one of them against a real Prometheus with the variables substituted.

grafana-foundation-sdk is a development dependency: only this generator imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payper_dev import generated

SELECTOR = 'namespace=~"$namespace", inference_deployment=~"$deployment"'
UID = "payper-billing"
FILE_NAME = "payper-billing.json"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class PanelSpec:
    title: str
    kind: str
    """timeseries, stat or table."""
    unit: str
    queries: tuple[Query, ...]
    description: str
    width: int = 12
    height: int = 8
    row: str = ""
    """A row it opens (the panels after it, up to the next row, are in it)."""


def _sum(metric: str, by: str = "", window: str = "$__range") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (increase({metric}{{{SELECTOR}}}[{window}]))"


def _quantile(q: float, histogram: str) -> str:
    rate = f"rate({histogram}_bucket{{{SELECTOR}}}[$__range])"
    return f"histogram_quantile({q}, sum by (le) ({rate}))"


ACTIVE = "payper_gpu_active_seconds_total"
PROVISIONED = "payper_gpu_provisioned_seconds_total"
REQUESTS = "payper_gateway_requests_total"
BY_DEPLOYMENT = "namespace, inference_deployment"

PANELS: tuple[PanelSpec, ...] = (
    PanelSpec(
        "Spend over time",
        "timeseries",
        "currencyUSD",
        (
            Query(
                _sum(
                    "payper_billed_amount_total",
                    "namespace, inference_deployment",
                    "$__rate_interval",
                ),
                "{{namespace}}/{{inference_deployment}}",
            ),
        ),
        "Amount billed per interval for active GPU time, by namespace and deployment.",
        width=24,
    ),
    PanelSpec(
        "Active vs provisioned GPU time",
        "timeseries",
        "s",
        (
            Query(
                _sum("payper_gpu_active_seconds_total", "", "$__rate_interval"),
                "active (billed work)",
            ),
            Query(
                _sum("payper_gpu_provisioned_seconds_total", "", "$__rate_interval"),
                "provisioned (GPUs held)",
            ),
        ),
        "GPU-seconds in which kernels ran, against GPU-seconds the pods held their GPUs.",
    ),
    PanelSpec(
        "GPU utilization (active / provisioned)",
        "stat",
        "percentunit",
        (
            Query(
                f"{_sum(ACTIVE)} / {_sum(PROVISIONED)}",
                "utilization",
                True,
            ),
        ),
        "Share of provisioned GPU time in which kernels ran.",
        width=6,
    ),
    PanelSpec(
        "Idle GPU time, not billed",
        "stat",
        "s",
        (
            Query(
                f"{_sum(PROVISIONED)} - {_sum(ACTIVE)}",
                "idle",
                True,
            ),
        ),
        "Provisioned minus active GPU-seconds: time a reserved GPU would have charged for.",
        width=6,
    ),
    PanelSpec(
        "The same work billed per ms, s and min",
        "stat",
        "currencyUSD",
        (
            Query(
                _sum("payper_amount_at_granularity_total", "granularity"),
                "per {{granularity}}",
                True,
            ),
        ),
        "What the active GPU time costs at each billing granularity (rounded up per burst).",
    ),
    PanelSpec(
        "Pay-per-compute vs reserved GPUs",
        "stat",
        "currencyUSD",
        (
            Query(_sum("payper_billed_amount_total"), "pay-per-compute", True),
            Query(
                _sum("payper_reserved_equivalent_amount_total"),
                "reserved, same provisioned time",
                True,
            ),
        ),
        "The amount billed against what reserved GPUs would have cost for the same time.",
    ),
    PanelSpec(
        "Cold starts",
        "timeseries",
        "short",
        (
            Query(
                _sum(
                    "payper_cold_starts_total",
                    "namespace, inference_deployment",
                    "$__rate_interval",
                ),
                "{{namespace}}/{{inference_deployment}}",
            ),
        ),
        "Scale-ups from zero that reached a ready endpoint.",
        width=8,
    ),
    PanelSpec(
        "Cold start duration p50 / p95",
        "timeseries",
        "s",
        tuple(
            Query(
                _quantile(q, "payper_cold_start_duration_seconds"),
                f"p{int(q * 100)}",
            )
            for q in (0.5, 0.95)
        ),
        "From the scale-up decision to the first ready endpoint.",
        width=8,
    ),
    PanelSpec(
        "Cold start phases (median)",
        "timeseries",
        "s",
        (
            Query(
                "histogram_quantile(0.5, sum by (le, phase) "
                f"(rate(payper_cold_start_phase_seconds_bucket{{{SELECTOR}}}[$__range])))",
                "{{phase}}",
            ),
        ),
        "Where cold starts spend their time: request held -> pod created (create), "
        "scheduled (schedule), image pulled (image, as the kubelet measured it), containers "
        "running (start), Ready (ready), first byte forwarded by the gateway (forward).",
        width=24,
    ),
    PanelSpec(
        "Gateway requests by code",
        "timeseries",
        "reqps",
        (
            Query(
                f"sum by (code) (rate({REQUESTS}{{{SELECTOR}}}[$__rate_interval]))",
                "{{code}}",
            ),
        ),
        "Requests answered by payper-gateway, per second, by HTTP status.",
        width=8,
    ),
    PanelSpec(
        "Gateway latency p50 / p99",
        "timeseries",
        "s",
        tuple(
            Query(
                _quantile(q, "payper_gateway_request_duration_seconds"),
                f"p{int(q * 100)}",
            )
            for q in (0.5, 0.99)
        ),
        "Arrival to last byte, cold-start wait included.",
    ),
    PanelSpec(
        "Gateway queueing",
        "timeseries",
        "short",
        (
            Query(
                f"sum(max_over_time(payper_gateway_queued_requests{{{SELECTOR}}}[$__range]))",
                "held requests (max)",
            ),
            Query(
                f"sum(max_over_time(payper_gateway_requests_in_flight{{{SELECTOR}}}[$__range]))",
                "in flight (max)",
            ),
        ),
        "Requests held while a deployment starts, and requests in flight.",
    ),
    PanelSpec(
        "Where GPU time went (every metered GPU)",
        "timeseries",
        "s",
        (
            Query(
                'sum by (use) (increase(payper_gpu_time_seconds_total{use!="excess"}'
                "[$__rate_interval]))",
                "{{use}}",
            ),
            Query(
                "sum (increase(payper_gpu_wall_seconds_total[$__rate_interval]))",
                "wall clock",
            ),
        ),
        "The per-GPU reconciliation, all nodes: attributed to pods + unattributed (no pod) + "
        "unmetered (the driver could not say) + idle = wall-clock time. Per node and GPU: "
        "payper reconcile.",
        width=18,
    ),
    PanelSpec(
        "Unmetered GPU capacity",
        "stat",
        "short",
        (
            Query(
                "sum(payper_gpu_unmetered_capacity_gpus) or vector(0)",
                "GPUs",
                True,
            ),
        ),
        "GPUs held by pods on nodes that send no usage reports (no payper-agent there).",
        width=6,
    ),
    PanelSpec(
        "Top spenders",
        "table",
        "currencyUSD",
        (
            Query(
                f"topk(10, {_sum('payper_billed_amount_total', BY_DEPLOYMENT)})",
                "",
                True,
            ),
        ),
        "The ten deployments that spent most in the time range.",
        width=24,
    ),
    PanelSpec(
        "Usage events exported",
        "timeseries",
        "short",
        (
            Query(
                "sum by (sink, result) (increase(payper_export_events_total[$__rate_interval]))",
                "{{sink}} {{result}}",
            ),
        ),
        "Usage events each export sink took (sent) or did not (failed: retried with "
        "backoff; refused: kept until the configuration covers them; nothing dropped). "
        "All namespaces.",
        row="Export",
    ),
    PanelSpec(
        "Export lag and backlog",
        "timeseries",
        "short",
        (
            Query("max by (sink) (payper_export_lag_seconds)", "{{sink}} lag (s)"),
            Query("sum by (sink) (payper_export_backlog_records)", "{{sink}} records owed"),
            Query("sum by (sink) (payper_export_refused_records)", "{{sink}} records refused"),
        ),
        "Per sink: how long the oldest delta still owed has waited since it was sealed, how "
        "many records it is owed, and how many of those it refused (a namespace with no "
        "customer, a plan with no meter: kept, the operator's log says which). payper "
        "export status shows what is owed from the records.",
        width=8,
    ),
    PanelSpec(
        "Final records awaiting export",
        "stat",
        "short",
        (Query("sum(payper_billing_records_awaiting_export) or vector(0)", "records", True),),
        "Final BillingRecords not yet acknowledged by every sink: kept in etcd until they "
        "are (then Exported, and deleted after the retention).",
        width=4,
    ),
)


def _variables() -> list[Any]:
    from grafana_foundation_sdk.builders import dashboard
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

    source = DataSourceRef(type_val="prometheus", uid="${datasource}")
    return [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        dashboard.QueryVariable("namespace")
        .label("Namespace")
        .datasource(source)
        .query("label_values(payper_gpu_active_seconds_total, namespace)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*"),
        dashboard.QueryVariable("deployment")
        .label("Inference deployment")
        .datasource(source)
        .query(f'label_values({ACTIVE}{{namespace=~"$namespace"}}, inference_deployment)')
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*"),
    ]


def _panel(spec: PanelSpec) -> Any:
    from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    kinds: dict[str, Any] = {
        "timeseries": timeseries.Panel,
        "stat": stat.Panel,
        "table": table.Panel,
    }
    builder = kinds[spec.kind]()
    panel = (
        builder.title(spec.title)
        .description(spec.description)
        .unit(spec.unit)
        .span(spec.width)
        .height(spec.height)
        .datasource(DataSourceRef(type_val="prometheus", uid="${datasource}"))
    )
    for index, query in enumerate(spec.queries):
        target = prometheus.Dataquery().expr(query.expr).ref_id(chr(ord("A") + index))
        if query.legend:
            target = target.legend_format(query.legend)
        target = target.instant() if query.instant else target.range()
        panel = panel.with_target(target)
    return panel


def build() -> dict[str, Any]:
    from grafana_foundation_sdk.builders import dashboard
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    board = (
        dashboard.Dashboard("Payper: GPU billing")
        .uid(UID)
        .tags(["payper", "billing", "gpu"])
        .description(
            "Pay-per-compute GPU billing: what ran, what was billed, what idled, what it saved."
        )
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("utc")
        .editable()
    )
    for variable in _variables():
        board = board.with_variable(variable)
    for spec in PANELS:
        if spec.row:
            board = board.with_row(dashboard.Row(spec.row))
        board = board.with_panel(_panel(spec))
    built: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder, sort_keys=True))
    return built


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def write(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    path.write_text(render())
    return path


def drift(directory: Path) -> str:
    return generated.drift(directory / FILE_NAME, render())
