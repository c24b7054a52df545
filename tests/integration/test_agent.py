"""payper-agent live, on the simulated backend: exact across SIGKILLs and lost state.

Two agents meter the same node: one runs undisturbed, the other is killed with SIGKILL
at random moments and restarted. A local receiver per agent (the usage endpoint's
contract: apply in sequence order, once per agent id and sequence) collects what each
delivered. The killed agent must end with the same totals as the undisturbed one, to
within one poll interval per kill, and never more.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from payper_dev.loopback import free_port, http_ok
from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import scraped_sum
from payper_dev.testing.usage_receiver import UsageReceiver

NODE = "gpu-node-0"
GPU = f"GPU-{NODE}-0"
POLL_S = 1.0
REPORT_S = 5


def start_agent(
    cluster: ClusterHandle,
    sim_dir: Path,
    state_dir: Path,
    receiver: UsageReceiver,
    log: Path,
    port: int | None = None,
) -> subprocess.Popen[bytes]:
    token = state_dir.parent / f"{state_dir.name}.token"
    token.write_text("not-checked-by-the-test-receiver")
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "payper_agent.main",
                "run",
                "--node",
                NODE,
                "--backend",
                "simulated",
                "--sim-dir",
                str(sim_dir),
                "--state-dir",
                str(state_dir),
                "--operator-url",
                f"http://127.0.0.1:{receiver.port}",
                "--token-file",
                str(token),
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--listen",
                f"127.0.0.1:{port or free_port()}",
                "--poll-interval",
                str(POLL_S),
                "--report-interval",
                str(REPORT_S),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def write_schedule(
    sim_dir: Path, pid: int, pod: dict[str, Any], start_ms: int, rng: random.Random
) -> int:
    """Busy intervals from ``start_ms`` on; returns the truth in microseconds."""
    (sim_dir / f"{pid}.json").write_text(
        json.dumps({"pid": pid, "gpu": GPU, "node": NODE, "pod": pod, "startedMs": start_ms})
    )
    lines, total, t = [], 0, start_ms
    for _ in range(14):
        busy = rng.choice([300, 700, 1_300, 2_600])
        lines.append(f"{t} {t + busy}\n")
        total += busy * 1000
        t += busy + rng.choice([2_200, 3_100, 4_000])
    (sim_dir / f"{pid}.busy").write_text("".join(lines))
    return total


@pytest.fixture
async def gpu_pod(cluster: ClusterHandle, namespace: str) -> dict[str, Any]:
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "model-0", "labels": {"payper.dev/inference-deployment": "model"}},
        "spec": {
            "nodeName": NODE,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "containers": [
                {
                    "name": "server",
                    "image": "model:1",
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    uid = eventually(
        lambda: cluster.get_json("pod", "model-0", "-n", namespace)["metadata"]["uid"],
        20,
    )
    return {"namespace": namespace, "name": "model-0", "uid": uid, "container": "server"}


async def test_sigkilled_agent_totals_equal_an_undisturbed_run(
    cluster: ClusterHandle, gpu_pod: dict[str, Any], tmp_path: Path
) -> None:
    rng = random.Random(20261126)
    sim_dir = tmp_path / "sim"
    sim_dir.mkdir()
    process = subprocess.Popen(["sleep", "600"])  # noqa: ASYNC220 - stands in for a model server PID
    receivers = {"steady": UsageReceiver(), "killed": UsageReceiver()}
    for receiver in receivers.values():
        await receiver.start()
    agents: dict[str, subprocess.Popen[bytes]] = {}
    try:
        ports = {name: free_port() for name in receivers}
        for name, receiver in receivers.items():
            agents[name] = start_agent(
                cluster, sim_dir, tmp_path / name, receiver, tmp_path / f"{name}.log", ports[name]
            )
        readyz = [f"http://127.0.0.1:{port}/readyz" for port in ports.values()]
        eventually(lambda: all(http_ok(url) for url in readyz), 60, 0.1, "agents ready")
        # Both synced their pod watch (ready) and polled at least once.
        polled = [f"http://127.0.0.1:{port}/metrics" for port in ports.values()]
        eventually(
            lambda: all(
                scraped_sum(url, "payper_agent_poll_duration_seconds_count") for url in polled
            ),
            30,
            0.1,
            "a first poll",
        )
        start_ms = int(time.time() * 1000) + 1_000
        truth_us = write_schedule(sim_dir, process.pid, gpu_pod, start_ms, rng)
        kills = 0
        while time.time() < start_ms / 1000 + 45:
            await asyncio.sleep(rng.uniform(3.0, 9.0))
            os.killpg(agents["killed"].pid, signal.SIGKILL)
            agents["killed"].wait()
            kills += 1
            await asyncio.sleep(rng.uniform(0.3, 2.0))
            agents["killed"] = start_agent(
                cluster, sim_dir, tmp_path / "killed", receivers["killed"], tmp_path / "killed.log"
            )
            # Each kill must hit an agent that resumed (a busy machine starts it slowly).
            await asyncio.to_thread(
                eventually,
                lambda wanted=kills: (  # type: ignore[misc]
                    (tmp_path / "killed.log").read_text().count("resumed") >= wanted
                ),
                60,
                0.1,
                "the restarted agent resumed",
            )
        last_busy_end = max(
            int(line.split()[1])
            for line in (sim_dir / f"{process.pid}.busy").read_text().splitlines()
        )
        # Until both agents delivered a report cut two report intervals past the last busy
        # moment (every burst closed and reported); an agent with GPUs reports every
        # interval, busy or not.
        covered_ms = last_busy_end + 2 * REPORT_S * 1000

        def delivered() -> bool:
            return all(
                any(r["intervalEndMs"] >= covered_ms for r in receiver.applied)
                for receiver in receivers.values()
            )

        await asyncio.to_thread(eventually, delivered, 120, 0.2, "reports past the last burst")
        steady, killed = receivers["steady"].active_us(), receivers["killed"].active_us()
        log = (tmp_path / "killed.log").read_text()
        assert kills >= 3
        assert abs(steady - truth_us) <= 0.01 * truth_us, (steady, truth_us)
        # Integer percents round differently when polls fall differently (a restart's first
        # poll spans the downtime): up to 0.5 % of the time plus 5 ms per poll boundary.
        # A report counted twice would add at least one whole burst (>= 300 ms).
        quantization_us = int(0.005 * truth_us) + kills * 10_000
        assert killed <= steady + quantization_us, f"double counting: {killed} > {steady}"
        assert steady - killed <= kills * POLL_S * 1_000_000 + quantization_us, (steady, killed)
        assert len(receivers["killed"].agent_ids()) == 1, "a restart must keep the agent id"
        assert log.count("resumed") >= kills
        series = {
            (s["namespace"], s["pod"], s["container"], s["gpu"], s["inferenceDeployment"])
            for r in receivers["steady"].applied
            for s in r["series"]
        }
        assert series == {(gpu_pod["namespace"], "model-0", "server", GPU, "model")}

        # Lose the state file: a new agent id, said so in the log.
        os.killpg(agents["killed"].pid, signal.SIGKILL)
        agents["killed"].wait()
        (tmp_path / "killed" / "state.json").unlink()
        message = "no state file: starting a new agent id"
        said_before = (tmp_path / "killed.log").read_text().count(message)
        agents["killed"] = start_agent(
            cluster, sim_dir, tmp_path / "killed", receivers["killed"], tmp_path / "killed.log"
        )
        eventually(
            lambda: (tmp_path / "killed.log").read_text().count(message) == said_before + 1,
            20,
            what="the restarted agent to say it starts a new agent id",
        )
        new_id = json.loads((tmp_path / "killed" / "state.json").read_text())["agentId"]
        assert new_id not in receivers["killed"].agent_ids()
    finally:
        for agent in agents.values():
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
        process.kill()
        process.wait()
        for receiver in receivers.values():
            await receiver.stop()
