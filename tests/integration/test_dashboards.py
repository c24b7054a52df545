"""The billing dashboards against a real Prometheus scraping a real end-to-end run.

Operator, gateway and simulated agents serve traffic on the local cluster while Debian's
Prometheus scrapes them every second. Every panel query of the generated dashboard, with
its variables substituted as Grafana would, must return data; the spend and GPU-seconds
panels must agree with the BillingRecords; and every exposition passes promtool.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal

import aiohttp
import pytest

from payper_dev.dashboards import PANELS, Query
from payper_dev.testing.cloudevents_receiver import CloudEventsReceiver
from payper_dev.testing.cluster import ClusterHandle
from payper_dev.testing.prometheus import Prometheus, check_metrics
from payper_dev.testing.stack import Stack, StackOptions, inference_deployment, running

SUBSTITUTIONS = {"$__rate_interval": "30s", "$__range": "15m", "$__interval": "15s"}


@pytest.fixture(scope="module")
def observed(
    crds_installed: ClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Prometheus, str]]:
    workdir = tmp_path_factory.mktemp("dashboards")
    # TLS on the operator API, as the chart deploys it: demand and usage both cross it.
    # An export sink, for the export row.
    sink = CloudEventsReceiver().start()
    export = {"sinks": [{"name": "meter", "type": "cloudevents", "url": sink.url}]}
    options = StackOptions(
        agents=True,
        tls=True,
        operator_extra={"billing": {"flushIntervalSeconds": 1, "export": export}},
    )
    with running(crds_installed, workdir / "stack", options) as stack:
        prometheus = Prometheus(workdir / "prometheus", stack.scrape_targets()).start()
        try:
            namespace = crds_installed.namespace("dash")
            asyncio.run(_drive(stack, namespace))
            prometheus.wait_for_scrapes_after(time.time())  # the state after the last flush
            yield stack, prometheus, namespace
        finally:
            prometheus.stop()
            sink.stop()


async def _drive(stack: Stack, namespace: str) -> None:
    stack.deploy(
        namespace,
        *(inference_deployment(n, idle_timeout_s=120, max_replicas=1) for n in ("vision", "chat")),
    )
    rng = random.Random(9)
    async with aiohttp.ClientSession() as http:

        async def client(name: str) -> None:
            for _ in range(8):
                async with http.post(
                    f"{stack.gateway_url}/{namespace}/{name}/v1/infer",
                    json={"ms": rng.choice([200, 700, 1500])},
                ) as r:
                    assert r.status == 200
                await asyncio.sleep(rng.choice([0.2, 2.5]))

        await asyncio.gather(client("vision"), client("chat"))
    await stack.settle()


def _expr(query: Query, namespace: str) -> str:
    expr = query.expr.replace("$namespace", namespace).replace("$deployment", ".*")
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def test_prometheus_scrapes_every_component(observed: tuple[Stack, Prometheus, str]) -> None:
    _, prometheus, _ = observed
    health = prometheus.targets_up()
    assert len(health) == 4  # operator, gateway, two agents
    assert all(health.values()), health


@pytest.mark.parametrize("job", ["payper-operator", "payper-gateway", "payper-agent"])
def test_promtool_finds_nothing_to_fix(observed: tuple[Stack, Prometheus, str], job: str) -> None:
    stack, _, _ = observed
    for target in stack.scrape_targets()[job]:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert check_metrics(text) == []
        assert "payper_" in text


@pytest.mark.parametrize(
    ("panel", "query"),
    [(p, q) for p in PANELS for q in p.queries],
    ids=[f"{p.title}-{i}" for p in PANELS for i, _ in enumerate(p.queries)],
)
def test_every_panel_query_returns_data(
    observed: tuple[Stack, Prometheus, str], panel: object, query: Query
) -> None:
    _, prometheus, namespace = observed
    result = prometheus.query(_expr(query, namespace))
    assert result, f"no data for {query.expr}"


def test_spend_and_gpu_seconds_panels_agree_with_the_records(
    observed: tuple[Stack, Prometheus, str],
) -> None:
    stack, prometheus, namespace = observed
    records = stack.cluster.get_json("brec", "-n", namespace)["items"]
    amount = sum(Decimal(r["status"]["amount"]) for r in records)
    active_s = sum(int(r["status"]["activeUs"]) for r in records) / 1e6
    assert amount > 0
    spend_panel = next(p for p in PANELS if p.title == "Pay-per-compute vs reserved GPUs")
    spend = float(prometheus.query(_expr(spend_panel.queries[0], namespace))[0]["value"][1])
    usage_panel = next(p for p in PANELS if p.title == "Active vs provisioned GPU time")
    active_query = Query(usage_panel.queries[0].expr.replace("$__rate_interval", "$__range"))
    active = float(prometheus.query(_expr(active_query, namespace))[0]["value"][1])
    # increase() extrapolates to the end of the range by at most about one scrape interval
    # of growth; with every series starting at zero it never misses the beginning.
    assert float(amount) * 0.98 <= spend <= float(amount) * 1.10, (spend, amount)
    assert active_s * 0.98 <= active <= active_s * 1.10, (active, active_s)
    exact = float(
        prometheus.query(f'sum(payper_billed_amount_total{{namespace="{namespace}"}})')[0]["value"][
            1
        ]
    )
    assert abs(exact - float(amount)) < 1e-6
