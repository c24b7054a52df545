"""Benchmark: what one poll costs the agent with 8 GPUs x 32 processes (simulated NVML).

Runs in a fresh interpreter that imports what ``payper-agent run`` imports, builds a
simulated node with 8 GPUs and 32 busy processes on each (256 series), and measures CPU
time per poll for the meter alone and for the agent's whole poll (meter, report cutting
every 10 polls, the fsync'ed checkpoint after every poll), then the process's RSS.

    .venv/bin/python bench/agent_poll.py [--polls 300]
"""

from __future__ import annotations

import argparse
import gc
import random
import re
import resource
import tempfile
import time
from pathlib import Path

GPUS, PROCESSES_PER_GPU = 8, 32
GOAL_CPU_MS, GOAL_RSS_MIB = 2.0, 60.0


def rss_mib() -> tuple[float, float]:
    status = Path("/proc/self/status").read_text()
    now = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return now / 1024, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--polls", type=int, default=300)
    args = parser.parse_args()

    import payper_agent.main  # noqa: F401 - the agent's imports, for an honest RSS
    from payper_agent.agent import Agent, AgentSettings
    from payper_agent.meter import KnownPids, Meter, SeriesIdentity
    from payper_agent.simulated import Intervals, SimProcess, SimulatedBackend, fake_gpus

    rng = random.Random(1)
    backend = SimulatedBackend(fake_gpus("node", GPUS, "NVIDIA H100 80GB HBM3"))
    identities = {}
    horizon_us = (args.polls + 5) * 1_000_000
    for gpu in backend.gpus():
        for index in range(PROCESSES_PER_GPU):
            pid = 1000 + gpu.index * 100 + index
            busy = Intervals()
            t = rng.randrange(0, 2_000_000)
            while t < horizon_us:
                length = rng.randrange(50_000, 3_000_000)
                busy.add(t, t + length)
                t += length + rng.randrange(500_000, 6_000_000)
            backend.processes[pid] = SimProcess(pid, gpu.uuid, busy, None)
            identities[pid] = SeriesIdentity("team", f"pod-{pid}", f"uid-{pid}", "server", "model")

    def measure(poll: object, polls: int) -> float:
        gc.collect()
        started = time.process_time()
        for step in range(1, polls + 1):
            backend.clock_us = step * 1_000_000
            poll()  # type: ignore[operator]
        return (time.process_time() - started) * 1000 / polls

    meter = Meter(KnownPids(identities))
    meter_ms = measure(lambda: meter.poll(backend), args.polls)

    with tempfile.TemporaryDirectory() as state:
        clock = [0]
        agent = Agent(
            AgentSettings("node", Path(state), 1.0, 10),
            backend,
            KnownPids(identities),
            clock_ms=lambda: clock[0],
        )

        def agent_poll() -> None:
            clock[0] = backend.clock_us // 1000
            agent.poll_once()

        backend.clock_us = 0
        agent_ms = measure(agent_poll, args.polls)
        reports = len(agent.store.pending())
    now, peak = rss_mib()
    series = len(identities)
    print(f"{GPUS} GPUs x {PROCESSES_PER_GPU} processes = {series} series, {args.polls} polls")
    print(f"meter.poll alone: {meter_ms:.3f} CPU ms per poll")
    print(f"agent poll (meter, reports, checkpoint): {agent_ms:.3f} CPU ms per poll")
    ratio = agent_ms / GOAL_CPU_MS
    print(f"  ({reports} reports written); goal <= {GOAL_CPU_MS} ms: {ratio:.2f} of it")
    print(f"RSS: {now:.1f} MiB now, {peak:.1f} MiB peak")
    print(f"  goal <= {GOAL_RSS_MIB:.0f} MiB: {peak / GOAL_RSS_MIB:.2f} of it")


if __name__ == "__main__":
    main()
