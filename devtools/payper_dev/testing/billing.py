"""What the billing tests share: a namespace's records and their totals, against what
the agents measured; traffic through the gateway; a deployment to bill."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import aiohttp

from payper.billing.records import EXPORTED, STATE_LABEL
from payper.clock import parse_iso
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import Stack, inference_deployment

H100_PRICE = Decimal("0.0012")  # the default plan, 1 s granularity


def records(cluster: ClusterHandle, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json("brec", "-n", namespace)["items"]
    return items


def record_totals(cluster: ClusterHandle, namespace: str) -> dict[str, dict[str, Any]]:
    totals: dict[str, dict[str, Any]] = {}
    for record in records(cluster, namespace):
        status = record.get("status") or {}
        total = totals.setdefault(
            record["spec"].get("inferenceDeployment", ""),
            {"activeUs": 0, "1ms": 0, "1s": 0, "1m": 0, "bursts": 0, "amount": Decimal(0)},
        )
        total["activeUs"] += int(status.get("activeUs", 0))
        for granularity in ("1ms", "1s", "1m"):
            total[granularity] += int((status.get("roundedMs") or {}).get(granularity, 0))
        total["bursts"] += int(status.get("bursts", 0))
        total["amount"] += Decimal(status.get("amount", "0"))
    return totals


MEASURED = ("activeUs", "1ms", "1s", "1m", "bursts")


def assert_records_equal_truth(
    stack: Stack, namespace: str, deployments: list[str], limit_s: float = 30
) -> None:
    """The records hold exactly what the agents measured, per deployment.

    Both sides are snapshots of moving things: an agent cuts a report whenever a burst
    closes (a 1 s burst at the edge of ``settle``, a 1 min burst a minute after the
    traffic), which is in its truth at once and in the records a flush later. So this
    waits, bounded, for a moment when no report is in flight, the truth is the same before
    and after the records are read, and the two agree; usage lost or counted twice never
    agrees, and the failure prints both totals and the stack's logs."""
    pairs: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
    amounts: dict[str, Decimal | None] = {}

    def agree() -> bool:
        truth = stack.agent_truth()
        totals = record_totals(stack.cluster, namespace)
        steady = not stack.agent_backlog() and stack.agent_truth() == truth
        for name in deployments:
            got, wanted = totals.get(name, {}), truth.get((namespace, name), {})
            pairs[name] = (
                {k: got.get(k, 0) for k in MEASURED},
                {k: wanted.get(k, 0) for k in MEASURED},
            )
            amounts[name] = got.get("amount")
        return steady and all(got == wanted for got, wanted in pairs.values())

    try:
        eventually(agree, limit_s, 0.5, "records equal to the agents' measurement")
    except AssertionError:
        mismatch = "; ".join(
            f"{name}: records {got}, agents {wanted}" for name, (got, wanted) in pairs.items()
        )
        raise AssertionError(f"{mismatch}\n{stack.logs()}") from None
    for name, (_, wanted) in pairs.items():
        assert wanted["activeUs"] > 0, f"{name}: the agents measured nothing"
        assert amounts[name] == H100_PRICE * wanted["1s"] / 1000, name


async def traffic(
    http: aiohttp.ClientSession,
    stack: Stack,
    namespace: str,
    name: str,
    rng: random.Random,
    seconds: float,
) -> list[int]:
    statuses = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        ms = rng.choice([120, 450, 900, 1600])
        async with http.post(
            f"{stack.gateway_url}/{namespace}/{name}/v1/infer", json={"ms": ms}
        ) as response:
            statuses.append(response.status)
        await asyncio.sleep(rng.choice([0.1, 0.5, 2.5, 4.0]))
    return statuses


async def kill_mid_export(
    http: aiohttp.ClientSession,
    stack: Stack,
    namespace: str,
    name: str,
    rng: random.Random,
    sink_back: Callable[[], None],
) -> None:
    """SIGKILL the operator while a sink is taking events (their acknowledgements never
    written), bring the sink back (``sink_back``), keep the traffic going through the
    restart, and wait until the records hold what the agents measured."""
    assert stack.operator is not None
    stack.operator.stop(sig=signal.SIGKILL)
    sink_back()
    statuses = await traffic(http, stack, namespace, name, rng, 3)
    await asyncio.to_thread(stack.start_operator)
    statuses += await traffic(http, stack, namespace, name, rng, 3)
    assert set(statuses) == {200}
    await stack.settle()
    assert_records_equal_truth(stack, namespace, [name])


def model(name: str) -> dict[str, Any]:
    return inference_deployment(name, idle_timeout_s=120, max_replicas=1)


def record_spec(
    account: str,
    deployment: str,
    start: str,
    end: str,
    price: str = "0.0012",
    granularity: str = "1s",
) -> dict[str, Any]:
    """A BillingRecord's spec as the ledger makes it: the default plan on an H100."""
    return {
        "inferenceDeployment": deployment,
        "account": account,
        "window": {"start": start, "end": end},
        "plan": "default",
        "granularity": granularity,
        "currency": "USD",
        "pricePerGpuSecond": price,
        "reservedPricePerGpuHour": "3.20",
        "gpuProduct": "NVIDIA-H100-80GB-HBM3",
    }


def put_record(
    cluster: ClusterHandle,
    namespace: str,
    name: str,
    spec: dict[str, Any],
    status: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> None:
    """A record made by hand (as an earlier operator, or someone else, left it)."""
    body = {
        "apiVersion": "payper.dev/v1alpha1",
        "kind": "BillingRecord",
        "metadata": {"name": name, **(metadata or {})},
        "spec": spec,
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    cluster.kubectl(
        "patch", "brec", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip


def ended_records(stack: Stack, namespace: str, by_ms: int) -> list[dict[str, Any]]:
    return [
        r
        for r in records(stack.cluster, namespace)
        if parse_iso(r["spec"]["window"]["end"]) <= by_ms
    ]


def exported(record: dict[str, Any]) -> bool:
    return (record["metadata"].get("labels") or {}).get(STATE_LABEL) == EXPORTED


async def wait_exported(stack: Stack, namespace: str, by_ms: int) -> list[dict[str, Any]]:
    """Until every record of the namespace whose window ended by ``by_ms`` is Exported
    (Final after its grace, then acknowledged by the sink); returns them."""

    def done() -> bool:
        ended = ended_records(stack, namespace, by_ms)
        return bool(ended) and all(exported(r) for r in ended)

    try:
        await asyncio.to_thread(eventually, done, 120, 0.5, f"{namespace}'s records exported")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.logs()}") from None
    return ended_records(stack, namespace, by_ms)
