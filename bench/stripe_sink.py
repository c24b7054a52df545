"""Benchmark: the Stripe sink's meter events per second and CPU, against stripe-mock.

Stripe takes one meter event per request, so a sink owed 10,000 deployments' deltas makes
10,000 requests (and two per record with a correction). This measures what the Stripe
SDK (``stripe.StripeClient`` on aiohttp, as ``payper.billing.stripe_sink`` uses it)
costs per event, side by side in one run with a baseline: the same requests (same form
body, same headers that matter, same concurrency) from a bare aiohttp client. Both go to
stripe-mock on loopback, which validates each against Stripe's API definition, so
neither side can send something Stripe would refuse. Stripe's own limits (live mode:
about 1,000 meter events per second per account) bound a real sink long before either.

    make stripe-mock && .venv/bin/python bench/stripe_sink.py [--events 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlencode

import aiohttp

from payper.billing.config import StripeSinkConfig
from payper.billing.sinks import UsageEvent
from payper.billing.stripe_sink import StripeSink, meter_event
from payper_dev.testing.stripe_proxy import StripeMock

HOUR = 3_600_000
CONCURRENCY = 8
BATCH = 100


def events(count: int, now_ms: int) -> list[UsageEvent]:
    start = (now_ms - 2 * HOUR) // HOUR * HOUR
    return [
        UsageEvent(
            id=f"00000000-0000-4000-8000-{i:012d}-1",
            account="team-a",
            deployment=f"d{i:05d}",
            gpu_product="NVIDIA-H100-80GB-HBM3",
            plan="default",
            currency="USD",
            granularity="1s",
            window_start_ms=start,
            window_end_ms=start + HOUR,
            corrects_window_start_ms=None,
            active_ms=1234 + i,
            billed_ms=2000 + 1000 * (i % 7),
            amount=Decimal("0.0024"),
        )
        for i in range(count)
    ]


def form(params: dict[str, object]) -> str:
    payload = params["payload"]
    assert isinstance(payload, dict)
    flat = {k: v for k, v in params.items() if k != "payload"}
    flat |= {f"payload[{k}]": v for k, v in payload.items()}
    return urlencode(flat)


async def bare(config: StripeSinkConfig, all_events: list[UsageEvent]) -> None:
    """The baseline: the same requests from aiohttp alone."""
    gate = asyncio.Semaphore(CONCURRENCY)
    now = time.time()
    headers = {
        "Authorization": "Bearer sk_test_bench",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    async with aiohttp.ClientSession() as session:

        async def one(event: UsageEvent) -> None:
            params = meter_event(config, event, now)
            assert isinstance(params, dict)
            async with (
                gate,
                session.post(
                    f"{config.api_base}/v1/billing/meter_events",
                    data=form(params),
                    headers={**headers, "Idempotency-Key": event.id},
                ) as response,
            ):
                await response.read()
                assert response.status == 200, await response.text()

        for start in range(0, len(all_events), BATCH):
            await asyncio.gather(*(one(e) for e in all_events[start : start + BATCH]))


async def with_sdk(config: StripeSinkConfig, all_events: list[UsageEvent]) -> None:
    sink = StripeSink(config, time.time)
    for start in range(0, len(all_events), BATCH):
        sent = await sink.send(all_events[start : start + BATCH])
        assert not sent.refused and not sent.failed, (sent.refused, sent.failed)
    await sink.close()


Run = Callable[[StripeSinkConfig, list[UsageEvent]], Awaitable[None]]


def measure(
    run: Run, config: StripeSinkConfig, all_events: list[UsageEvent]
) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    asyncio.run(run(config, all_events))
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=4000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        mock = StripeMock(Path(directory) / "stripe-mock.log").start()
        try:
            key = Path(directory) / "key"
            key.write_text("sk_test_bench\n")
            config = StripeSinkConfig.model_validate(
                {
                    "name": "stripe",
                    "type": "stripe",
                    "apiKeyFile": str(key),
                    "apiBase": mock.url,
                    "customers": {"team-a": "cus_Bench"},
                    "meters": {"eventNames": {"default": "gpu_seconds"}},
                    "concurrency": CONCURRENCY,
                }
            )
            all_events = events(args.events, int(time.time() * 1000))
            measure(bare, config, all_events[:200])  # warm both paths up
            measure(with_sdk, config, all_events[:200])
            baseline = measure(bare, config, all_events)
            sdk = measure(with_sdk, config, all_events)
        finally:
            mock.stop()
    print(f"events {args.events}, {CONCURRENCY} requests in flight, batches of {BATCH}")
    print("| run | wall s | events/s | CPU s | CPU ms per event |")
    print("|---|---|---|---|---|")
    for label, (wall, cpu) in (("bare aiohttp (baseline)", baseline), ("Stripe SDK sink", sdk)):
        print(
            f"| {label} | {wall:.1f} | {args.events / wall:.0f} | {cpu:.1f} | "
            f"{1000 * cpu / args.events:.2f} |"
        )
    print(f"SDK / bare: wall {sdk[0] / baseline[0]:.2f}x, CPU {sdk[1] / baseline[1]:.2f}x")


if __name__ == "__main__":
    main()
