"""Usage reports as an agent cuts and sends them, for the tests on the local cluster: one
report factory and one way to post a batch with a node's agent token."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from payper.api.inference_deployment import POD_LABEL
from payper.billing import flush
from payper_dev.testing.stack import Stack


def agent_token(stack: Stack, node: str) -> str:
    return stack.agent_token_file(node).read_text()


def report(
    agent: str,
    sequence: int,
    pod: dict[str, Any],
    active_us: int,
    node: str | None = None,
) -> dict[str, Any]:
    """One usage report, as ``node``'s agent (the pod's own node unless named) cuts it,
    of ``active_us`` for the pod's server container."""
    now = int(time.time() * 1000)
    meta = pod["metadata"]
    return {
        "agentId": agent,
        "sequence": sequence,
        "node": node or pod["spec"]["nodeName"],
        "intervalStartMs": now - 5000,
        "intervalEndMs": now,
        "series": [
            {
                "namespace": meta["namespace"],
                "pod": meta["name"],
                "podUid": meta["uid"],
                "container": "server",
                "gpu": "GPU-gpu-node-0-0",
                "gpuProduct": "NVIDIA H100 80GB HBM3",
                "inferenceDeployment": (meta.get("labels") or {}).get(POD_LABEL),
                "activeUs": active_us,
                "roundedMs": {
                    "1ms": -(-active_us // 1000),
                    "1s": 1000 * -(-active_us // 1_000_000),
                    "1m": 60000,
                },
                "bursts": 1,
            }
        ],
    }


async def post_until_acked(
    http: aiohttp.ClientSession, stack: Stack, token: str, body: Any, agent: str, sequence: int
) -> None:
    """Resend, as an agent does, until the operator acknowledges ``sequence``: a report
    that names a pod the operator has not seen on the node waits for it, a bounded time."""
    deadline = time.monotonic() + flush.UNSEEN_POD_WAIT_MS / 1000 + 30
    while True:
        status, answer = await post_usage(http, stack, token, body)
        assert status == 200, answer
        if answer["acked"].get(agent, 0) >= sequence:
            return
        assert time.monotonic() < deadline, f"report {sequence} of {agent} not acknowledged"
        await asyncio.sleep(0.5)


async def post_usage(
    http: aiohttp.ClientSession, stack: Stack, token: str | None, body: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(
        stack.operator_url + "/v1/usage",
        data=data,
        headers={**headers, "Content-Type": "application/json"},
    ) as response:
        return response.status, await response.json(content_type=None)
