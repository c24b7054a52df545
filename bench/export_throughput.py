"""Benchmark: exporting 10,000 deployments' records to a CloudEvents sink, and what the
outbox costs.

On a local cluster (real kube-apiserver and etcd), ``--records`` sealed BillingRecords
(one per deployment, each holding usage of its own window and a correction of an
earlier one) are exported by the operator's own ``Exporter``, in this process, to the
test suite's CloudEvents receiver in another process (it parses every event with the
CloudEvents SDK). Measured from the first step until every record is Exported: events
per second, this process's CPU, and API writes per record (one patch seals the delta,
one records its acknowledgement and labels the record Exported).

Two baselines, in the same run: the same events POSTed to the same receiver in the same
batches with no outbox (no annotations read or written): what sending alone costs, so
that ratio is the outbox's price for exactly-once; and one flush's status write of every
record, as the ledger writes them: what billing already costs per record.

Then each record's size as the API server stores it, with and without its export
annotation, for docs/architecture.md's steady-state figures.

    .venv/bin/python bench/export_throughput.py [--records 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from payper.api.billing_record import PLURAL, BillingRecordSpec, BillingRecordStatus
from payper.api.common import API_VERSION
from payper.billing import outbox, seal
from payper.billing.config import CloudEventsSinkConfig, ExportConfig
from payper.billing.exporter import Exporter, Tracked, usage_event
from payper.billing.records import EXPORTED, STATE_LABEL
from payper.billing.sinks import CloudEventsSink
from payper.billing.writes import write_each
from payper.kube import Kube, resource_path
from payper_dev.cluster.local import ClusterConfig
from payper_dev.loopback import free_port
from payper_dev.testing.billing import record_spec
from payper_dev.testing.cluster import local_cluster

CRDS = Path(__file__).resolve().parents[1] / "crds"
NAMESPACE = "bench-export"
KEY = b"bench-key-" * 4
HOUR = 3_600_000


def record(index: int) -> dict[str, Any]:
    name = f"d{index:05d}-20261128-010000-abcdef"
    spec = record_spec(NAMESPACE, f"d{index:05d}", "2026-11-28T01:00:00Z", "2026-11-28T02:00:00Z")
    return {
        "apiVersion": API_VERSION,
        "kind": "BillingRecord",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {STATE_LABEL: "Open"},
            "annotations": {seal.ANNOTATION: seal.seal(KEY, NAMESPACE, name, spec)},
        },
        "spec": spec,
    }


STATUS = {
    "state": "Open",
    "activeMs": 1_234_567,
    "activeUs": 1_234_567_000,
    "billedMs": 1_240_000,
    "amount": "1.488000",
    "adjustments": [
        {
            "originalWindowStart": "2026-11-28T00:00:00Z",
            "reason": "late usage",
            "activeMs": 4_567,
            "activeUs": 4_567_000,
            "billedMs": 5_000,
            "amount": "0.006000",
        }
    ],
}


async def create(kube: Kube, count: int) -> list[dict[str, Any]]:
    await kube.create(
        resource_path("v1", "namespaces"),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
    )
    made: list[dict[str, Any]] = []
    queue = list(range(count))

    async def worker() -> None:
        while queue:
            body = record(queue.pop())
            created = await kube.create(resource_path(API_VERSION, PLURAL, NAMESPACE), body)
            path = resource_path(API_VERSION, PLURAL, NAMESPACE, body["metadata"]["name"])
            assert created["metadata"]["uid"]
            made.append(await kube.patch(f"{path}/status", {"status": STATUS}))

    await asyncio.gather(*(worker() for _ in range(16)))
    return made


def receiver(port: int) -> subprocess.Popen[bytes]:
    code = (
        "import sys, time\n"
        "from payper_dev.testing.cloudevents_receiver import CloudEventsReceiver\n"
        f"r = CloudEventsReceiver(port={port}).start()\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
        "while True: time.sleep(3600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == b"ready"
    return process


async def export_all(
    kube: Kube, records: list[dict[str, Any]], url: str, batch: int
) -> dict[str, float]:
    sink = CloudEventsSinkConfig(name="meter", type="cloudevents", url=url, batch_size=batch)
    exporter = Exporter(kube, ExportConfig(sinks=[sink]), KEY, lambda *_: None, time.time)
    for item in records:
        exporter.observe(item)
    writes = {"n": 0}
    patch = kube.patch

    async def counted(*args: Any, **kwargs: Any) -> Any:
        writes["n"] += 1
        return await patch(*args, **kwargs)

    kube.patch = counted  # type: ignore[method-assign]
    (runner,) = exporter.runners.values()
    sending = asyncio.create_task(runner.run())
    cpu, wall = time.process_time(), time.perf_counter()
    while exporter.tracked:
        await exporter.step()
        await asyncio.sleep(0.05)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    sending.cancel()
    await exporter.close()
    kube.patch = patch  # type: ignore[method-assign]
    events = 2 * len(records)
    return {"wall": wall, "cpu": cpu, "events": events, "writes": writes["n"]}


def tracked(item: dict[str, Any]) -> Tracked:
    status = BillingRecordStatus.model_validate(item["status"])
    return Tracked(
        location=(NAMESPACE, item["metadata"]["name"]),
        resource_version=item["metadata"]["resourceVersion"],
        identity=item["metadata"]["uid"],
        spec=BillingRecordSpec.model_validate(item["spec"]),
        final=True,
        totals=outbox.totals(status),
        states={},
        written={},
    )


async def send_only(records: list[dict[str, Any]], url: str, batch: int) -> dict[str, float]:
    """The baseline: the same events, the same batches, no outbox."""
    sink = CloudEventsSink(
        CloudEventsSinkConfig(name="meter", type="cloudevents", url=url), "//payper"
    )
    events = []
    for item in records:
        record = tracked(item)
        state = outbox.step(outbox.SinkState(), record.totals, None)
        events += [usage_event(record, d) for d in outbox.deltas(record.identity, state)]
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, len(events), batch):
        await sink.send(events[start : start + batch])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await sink.close()
    return {"wall": wall, "cpu": cpu, "events": len(events), "writes": 0}


async def status_writes(kube: Kube, records: list[dict[str, Any]]) -> dict[str, float]:
    """The second baseline: one flush's status write of every record, as the ledger
    writes them (PUT /status, 16 at a time; this one makes them Final, as the flush
    after their grace does): what billing already costs per record."""
    latest = {r["metadata"]["name"]: r for r in records}

    async def write(name: str, item: dict[str, Any]) -> None:
        status = {**item["status"], "state": "Final", "finalizedAt": "2026-11-28T02:05:00Z"}
        path = resource_path(API_VERSION, PLURAL, NAMESPACE, name, "status")
        latest[name] = await kube.request("PUT", path, body={**item, "status": status})

    cpu, wall = time.process_time(), time.perf_counter()
    outcomes = await write_each(dict(latest), write, 16)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert not any(outcomes.values()), next(e for e in outcomes.values() if e)
    records[:] = list(latest.values())
    return {"wall": wall, "cpu": cpu, "events": 2 * len(records), "writes": len(records)}


async def sizes(kube: Kube, name: str) -> tuple[int, int]:
    """A record's stored size (JSON as the API server returns it), and its export
    annotation's share."""
    found = await kube.get(resource_path(API_VERSION, PLURAL, NAMESPACE, name))
    text = (found["metadata"].get("annotations") or {}).get(outbox.annotation("meter"), "")
    return len(json.dumps(found, separators=(",", ":"))), len(text) + len(
        outbox.annotation("meter")
    )


async def run(kubeconfig: Path, count: int, batch: int, url: str) -> None:
    async with Kube.connect(kubeconfig) as kube:
        made = await create(kube, count)
        baseline = await send_only(made, url, batch)
        flushed = await status_writes(kube, made)
        exported = await export_all(kube, made, url, batch)
        listing = await kube.list(
            resource_path(API_VERSION, PLURAL, NAMESPACE),
            {"labelSelector": f"{STATE_LABEL}={EXPORTED}"},
        )
        assert len(listing["items"]) == count, "every record Exported"
        size, annotation = await sizes(kube, made[0]["metadata"]["name"])
    print(f"records {count}, batch {batch}")
    print(
        "| run | events | wall s | events/s | CPU s | CPU ms per 1,000 events "
        "| API writes per record |"
    )
    print("|---|---|---|---|---|---|---|")
    runs = (
        ("send only (baseline)", baseline),
        ("one flush's status writes (baseline)", flushed),
        ("export with the outbox", exported),
    )
    for label, result in runs:
        print(
            f"| {label} | {result['events']:.0f} | {result['wall']:.1f} | "
            f"{result['events'] / result['wall']:.0f} | {result['cpu']:.1f} | "
            f"{1e6 * result['cpu'] / result['events']:.0f} | {result['writes'] / count:.2f} |"
        )
    for label, result in (("send only", baseline), ("one flush's status writes", flushed)):
        print(
            f"export / {label}: wall {exported['wall'] / result['wall']:.2f}x, "
            f"CPU {exported['cpu'] / result['cpu']:.2f}x"
        )
    print(f"stored record: {size} bytes, of which the export annotation {annotation}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    port = free_port()
    sink = receiver(port)
    try:
        with tempfile.TemporaryDirectory() as directory:
            config = ClusterConfig(pod_cidr="127.15.0.0/16", crds_dir=str(CRDS))
            with local_cluster(Path(directory) / "cluster", config) as handle:
                asyncio.run(
                    run(handle.kubeconfig, args.records, args.batch, f"http://127.0.0.1:{port}/")
                )
    finally:
        sink.terminate()
        sink.wait(timeout=30)


if __name__ == "__main__":
    main()
