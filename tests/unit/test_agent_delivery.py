"""The agent's disk and its sender: exactly once, in order, through failures.

The receiver is ``payper_dev.testing.usage_receiver``, a local stand-in for the operator's
usage endpoint with the same contract; here it fails, times out and restarts at random.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from payper.identity import TokenFile
from payper_agent.agent import Agent, AgentSettings
from payper_agent.meter import KnownPids, SeriesIdentity
from payper_agent.sender import Sender
from payper_agent.simulated import Intervals, SimProcess, SimulatedBackend, fake_gpus
from payper_agent.store import Checkpoint, Store, claim_state_dir
from payper_dev.loopback import free_port
from payper_dev.testing.usage_receiver import UsageReceiver

NOW_MS = int(time.time() * 1000)


def report(agent_id: str, sequence: int, active_us: int = 1000) -> dict[str, Any]:
    return {
        "agentId": agent_id,
        "sequence": sequence,
        "node": "n",
        "intervalStartMs": NOW_MS + sequence * 10_000,
        "intervalEndMs": NOW_MS + sequence * 10_000 + 10_000,
        "series": [
            {
                "namespace": "ns",
                "pod": "p",
                "podUid": "u",
                "container": "c",
                "gpu": "GPU-0",
                "gpuProduct": "H100",
                "activeUs": active_us,
                "roundedMs": {"1ms": 1, "1s": 1000, "1m": 60000},
                "bursts": 1,
            }
        ],
    }


class FlakyReceiver(UsageReceiver):
    """Fails, times out after applying, or drops the connection after applying, at random."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.restarts = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        roll = self.rng.random()
        if roll < 0.15:
            return web.json_response({"error": "flaky"}, status=500)
        self.apply(await request.json())
        if roll < 0.25:
            await asyncio.sleep(2)  # applied, but the answer comes after the client gave up
        if roll < 0.32 and request.transport is not None:
            request.transport.close()  # applied, then the connection dies
            return web.Response()
        return self.acked()


async def test_every_report_is_applied_exactly_once_in_order(tmp_path: Path) -> None:
    rng = random.Random(42)
    store = Store(tmp_path / "state")
    checkpoint = Checkpoint("agent-a", 1, {"polls": 0})
    (tmp_path / "token").write_text("t")
    receiver = FlakyReceiver(rng)
    await receiver.start()
    sender = Sender(
        store,
        "node-a",
        f"http://127.0.0.1:{receiver.port}",
        TokenFile(tmp_path / "token"),
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
        timeout_s=0.5,
    )
    total = 120
    task = asyncio.create_task(sender.run())

    async def produce() -> None:
        for sequence in range(1, total + 1):
            store.write_report(report("agent-a", sequence), checkpoint)
            sender.wakeup.set()
            await asyncio.sleep(rng.random() * 0.02)

    async def chaos() -> None:
        while len(receiver.applied) < total:
            await asyncio.sleep(0.3)
            await receiver.stop()  # the receiver restarts; its state is durable
            receiver.restarts += 1
            await asyncio.sleep(0.2)
            await receiver.start()

    producer, monkey = asyncio.create_task(produce()), asyncio.create_task(chaos())
    await producer
    for _ in range(600):
        if not store.pending() and len(receiver.applied) == total:
            break
        await asyncio.sleep(0.05)
    monkey.cancel()
    task.cancel()
    await asyncio.gather(task, monkey, return_exceptions=True)
    await receiver.stop()
    assert [(r["agentId"], r["sequence"]) for r in receiver.applied] == [
        ("agent-a", s) for s in range(1, total + 1)
    ]
    assert store.pending() == []
    assert receiver.restarts >= 1


async def test_a_malformed_report_is_set_aside_and_counted(tmp_path: Path) -> None:
    from payper_agent import metrics

    store = Store(tmp_path / "state")
    checkpoint = Checkpoint("agent-b", 1, {"polls": 0})
    for sequence in (1, 2, 3):
        store.write_report(report("agent-b", sequence, active_us=2_000_000), checkpoint)
    (tmp_path / "token").write_text("t")
    last: dict[str, int] = {}
    markers: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        if any(r["sequence"] == 2 and r["series"] for r in body["reports"]):
            return web.json_response({"error": "reports.0.series: bad"}, status=400)
        markers.extend(r for r in body["reports"] if r.get("lostReason"))
        for item in body["reports"]:
            last[item["agentId"]] = item["sequence"]
        return web.json_response({"acked": last})

    app = web.Application()
    app.router.add_post("/v1/usage", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    before = metrics.DROPPED_USAGE_SECONDS.labels("rejected-400")._value.get()
    clock = [1_000_000]
    sender = Sender(
        store,
        "node-a",
        f"http://127.0.0.1:{port}",
        TokenFile(tmp_path / "token"),
        reject_grace_ms=600_000,
        clock_ms=lambda: clock[0],
    )
    async with __import__("aiohttp").ClientSession() as session:
        assert await sender.send_once(session), "report 1 acknowledged"
        for advance in (0, 599_999):  # an older operator, mid-upgrade: kept, not dropped
            clock[0] += advance
            with pytest.raises(RuntimeError, match="refused report 2"):
                await sender.send_once(session)
            assert [p.sequence for p in store.pending()] == [2, 3]
        clock[0] += 1
        for _ in range(6):
            if not store.pending():
                break
            await sender.send_once(session)
    await runner.cleanup()
    assert store.pending() == []
    assert [p.name for p in (tmp_path / "state" / "rejected").iterdir()] == [
        "agent-b-000000000002.json"
    ]
    assert metrics.DROPPED_USAGE_SECONDS.labels(
        "rejected-400"
    )._value.get() - before == pytest.approx(2.0)
    # In its place the operator got a gap marker: sequence 2, no series, the loss and why.
    assert [(m["sequence"], m["series"], m["lostUs"], m["lostReason"]) for m in markers] == [
        (2, [], 2_000_000, "rejected-400")
    ]
    assert last == {"agent-b": 3}, "the sequence went on past the dropped report"


def test_reports_past_retention_are_dropped_and_counted(tmp_path: Path) -> None:
    from payper_agent import metrics

    store = Store(tmp_path)
    checkpoint = Checkpoint("agent-c", 1, {"polls": 0})
    old = report("agent-c", 1, active_us=3_000_000)
    old["intervalEndMs"] = int(time.time() * 1000) - 10_000
    store.write_report(old, checkpoint)
    store.write_report(report("agent-c", 2), checkpoint)
    (tmp_path / "token").write_text("t")
    sender = Sender(
        store, "node-a", "http://127.0.0.1:9", TokenFile(tmp_path / "token"), retention_ms=1000
    )
    before = metrics.DROPPED_REPORTS.labels("retention")._value.get()
    before_s = metrics.DROPPED_USAGE_SECONDS.labels("retention")._value.get()
    kept = sender._drop_expired(store.pending())
    assert [p.sequence for p in kept] == [p.sequence for p in store.pending()] == [1, 2]
    marker = store.read(kept[0])
    assert (marker["series"], marker["lostUs"], marker["lostReason"]) == (
        [],
        3_000_000,
        "retention",
    )
    assert sender._drop_expired(store.pending()) == kept, "a gap marker never expires"
    assert [p.name for p in (tmp_path / "rejected").iterdir()] == ["agent-c-000000000001.json"]
    assert metrics.DROPPED_REPORTS.labels("retention")._value.get() - before == 1
    assert metrics.DROPPED_USAGE_SECONDS.labels("retention")._value.get() - before_s == 3.0


def _agent(directory: Path, backend: SimulatedBackend, clock: list[int]) -> Agent:
    identity = SeriesIdentity("ns", "p", "uid-p", "server")
    return Agent(
        AgentSettings("node-a", directory, poll_interval_s=1.0, report_interval_s=10),
        backend,
        KnownPids({7: identity}),
        clock_ms=lambda: clock[0],
    )


def test_a_crash_between_report_and_checkpoint_neither_loses_nor_repeats(tmp_path: Path) -> None:
    backend = SimulatedBackend(fake_gpus("node-a", 1, "H100"))
    busy = Intervals()
    busy.add(0, 60_000_000)
    backend.processes[7] = SimProcess(7, "GPU-node-a-0", busy, None)
    clock = [0]
    agent = _agent(tmp_path, backend, clock)
    for second in range(25):  # reports at 10 s and 20 s
        clock[0] = second * 1000
        backend.clock_us = clock[0] * 1000
        agent.poll_once()
    reports = agent.store.pending()
    assert [p.sequence for p in reports] == [1, 2]
    # Simulate the crash: the checkpoint on disk predates report 2.
    stale = json.loads(reports[0].path.read_bytes())["stateAfter"]
    (tmp_path / "state.json").write_text(json.dumps(stale))
    restarted = _agent(tmp_path, backend, clock)
    assert restarted.note.startswith("resumed from the last report")
    assert restarted.next_sequence == 3
    for second in range(25, 45):
        clock[0] = second * 1000
        backend.clock_us = clock[0] * 1000
        restarted.poll_once()
    total_us = sum(
        s["activeUs"] for p in restarted.store.pending() for s in restarted.store.read(p)["series"]
    )
    assert [p.sequence for p in restarted.store.pending()] == [1, 2, 3, 4]
    assert total_us == 40_000_000  # busy from 0 s; reported through the 40 s boundary


def test_a_corrupt_state_file_is_set_aside_and_a_new_agent_id_starts(tmp_path: Path) -> None:
    backend = SimulatedBackend(fake_gpus("node-a", 1, "H100"))
    first = _agent(tmp_path, backend, [0])
    (tmp_path / "state.json").write_text("{not json")
    second = _agent(tmp_path, backend, [0])
    assert second.agent_id != first.agent_id
    assert "set aside" in second.note
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1
    (tmp_path / "state.json").unlink()
    third = _agent(tmp_path, backend, [0])
    assert third.agent_id not in (first.agent_id, second.agent_id)
    assert third.note == "no state file: starting a new agent id"


def _hold_state_dir(directory: Path) -> subprocess.Popen[str]:
    """Another agent process holding ``directory`` (until it is killed)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import asyncio, sys, pathlib\n"
            "from payper_agent.store import claim_state_dir\n"
            f"asyncio.run(claim_state_dir(pathlib.Path({str(directory)!r})))\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


async def test_one_agent_at_a_time_holds_a_state_directory(tmp_path: Path) -> None:
    """A second agent on the same directory (a DaemonSet moved to a new namespace, its
    new pod up while the old one terminates) waits until the first one's process ends."""

    holder = _hold_state_dir(tmp_path)
    try:
        waiting = asyncio.create_task(claim_state_dir(tmp_path, retry_s=0.01))
        for _ in range(20):  # twenty retries while the holder lives: still waiting
            await asyncio.sleep(0.01)
        assert not waiting.done()
        holder.kill()  # however it dies, the kernel drops its lock
        fd = await asyncio.wait_for(waiting, 30)
        os.close(fd)
    finally:
        holder.kill()
        holder.wait()
