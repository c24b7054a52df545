"""A small stand-in model server: real HTTP on a pod's IP, simulated GPU work.

The pod runner starts it for pods of the local cluster, so the gateway, the autoscaler and
billing are exercised against a real process. Each request "runs kernels" for a chosen
number of milliseconds (an asyncio sleep); those busy intervals are published for the
simulated NVML backend of payper-agent when ``PAYPER_SIM_GPU_DIR`` is set.

Endpoints:
- ``POST /v1/infer`` ``{"ms": 120}``: compute for 120 ms, answer JSON.
- ``POST /v1/chat/completions`` (OpenAI-like): ``"stream": true`` streams Server-Sent
  Events, one token every ``token_ms`` (a request field, default ``--token-ms``).
- ``POST /echo``: streams the request body back as it arrives.
- ``GET /stats``: counters (requests, cancelled, in flight), for tests.
- ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from payper.clock import now_ms
from payper_agent.simulated import start_ticks


def simulated_gpu() -> str:
    """Which of its node's simulated GPUs a pod got, as a device plugin would decide.

    Stable per pod: ``GPU-<node>-<n>``, n from the pod UID, among ``PAYPER_SIM_GPUS``
    (default 8) GPUs per node, the names payper-agent's simulated backend uses.
    """
    count = int(os.environ.get("PAYPER_SIM_GPUS", "8"))
    digest = hashlib.sha256(os.environ.get("POD_UID", "").encode()).digest()
    return f"GPU-{os.environ.get('NODE_NAME', 'local')}-{digest[0] % count}"


class BusyLog:
    """Publishes this process's busy intervals (epoch ms) for the simulated NVML backend."""

    def __init__(self, directory: Path | None, gpu: str) -> None:
        self.path: Path | None = None
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        # The PID as this process sees it (in a container: its own PID namespace's) and
        # its start time, by which the agent finds the host PID. The files are named by
        # that PID where the name is free (agents before the start time was published read
        # only such names: the upgrade test runs one), otherwise uniquely: containers
        # sharing the directory may all be PID 1.
        stem = str(pid)
        try:
            (directory / f"{stem}.busy").open("x").close()
        except FileExistsError:
            stem = uuid.uuid4().hex
        identity = {
            "pid": pid,
            "startTicks": start_ticks(),
            "gpu": gpu,
            "pod": {
                "namespace": os.environ.get("POD_NAMESPACE", ""),
                "name": os.environ.get("POD_NAME", ""),
                "uid": os.environ.get("POD_UID", ""),
                "container": os.environ.get("CONTAINER_NAME", "server"),
            },
            "node": os.environ.get("NODE_NAME", ""),
            "startedMs": now_ms(),
        }
        self.path = directory / f"{stem}.busy"
        self.path.touch()  # (already there, when named by the PID)
        # The identity last, written whole: the agent reads the busy file once it sees it.
        partial = directory / f".{stem}.json.partial"
        partial.write_text(json.dumps(identity))
        partial.rename(directory / f"{stem}.json")

    def started(self, start_ms: int) -> None:
        """A kernel began: the simulated driver counts it busy from now on."""
        self._append(f"{start_ms}\n")

    def record(self, start_ms: int, end_ms: int) -> None:
        self._append(f"{start_ms} {end_ms}\n")

    def _append(self, line: str) -> None:
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(line)


class ModelServer:
    def __init__(self, busy: BusyLog, token_ms: int) -> None:
        self.busy = busy
        self.token_ms = token_ms
        self.stats = {"requests": 0, "cancelled": 0, "in_flight": 0, "completed": 0}
        self.pod = os.environ.get("POD_NAME", "local")

    async def _compute(self, ms: int) -> None:
        start = now_ms()
        self.busy.started(start)
        try:
            await asyncio.sleep(ms / 1000)
        finally:
            self.busy.record(start, now_ms())

    async def _tracked(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.stats["requests"] += 1
        self.stats["in_flight"] += 1
        try:
            response: web.StreamResponse = await handler(request)
            self.stats["completed"] += 1
            return response
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1
            raise
        finally:
            self.stats["in_flight"] -= 1

    async def infer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.body_exists else {}
        ms = int(body.get("ms", request.query.get("ms", 50)))
        if not 0 <= ms <= 600_000:
            return web.json_response({"error": "ms must be 0..600000"}, status=400)
        await self._compute(ms)
        return web.json_response({"pod": self.pod, "ms": ms, "output": "ok"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tokens = int(body.get("max_tokens", 16))
        token_ms = int(body.get("token_ms", self.token_ms))
        if not body.get("stream"):
            await self._compute(tokens * token_ms)
            text = " ".join(f"tok{i}" for i in range(tokens))
            return web.json_response(
                {"object": "chat.completion", "choices": [{"message": {"content": text}}]}
            )
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for index in range(tokens):
            await self._compute(token_ms)
            chunk = {
                "object": "chat.completion.chunk",
                "choices": [{"delta": {"content": f"tok{index}"}}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def echo(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        async for chunk in request.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    def app(self) -> web.Application:
        app = web.Application()

        def tracked(handler: Any) -> Any:
            async def wrapped(request: web.Request) -> web.StreamResponse:
                return await self._tracked(request, handler)

            return wrapped

        async def stats(_: web.Request) -> web.Response:
            return web.json_response(self.stats)

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def index(request: web.Request) -> web.Response:
            return web.json_response(
                {"pod": self.pod, "path": request.path_qs, "headers": dict(request.headers)}
            )

        app.router.add_post("/v1/infer", tracked(self.infer))
        app.router.add_post("/v1/chat/completions", tracked(self.chat))
        app.router.add_post("/echo", tracked(self.echo))
        app.router.add_get("/stats", stats)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/{tail:.*}", tracked(index))
        return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="payper-model-server", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("POD_IP", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--token-ms", type=int, default=20, help="compute time per streamed token")
    parser.add_argument(
        "--gpu",
        default=os.environ.get("PAYPER_SIM_GPU") or simulated_gpu(),
        help="the simulated GPU this process runs on (default: one of its node's, by pod UID)",
    )
    args = parser.parse_args(argv)
    sim_dir = os.environ.get("PAYPER_SIM_GPU_DIR")
    server = ModelServer(BusyLog(Path(sim_dir) if sim_dir else None, args.gpu), args.token_ms)
    web.run_app(
        server.app(),
        host=args.host,
        port=args.port,
        print=None,
        handler_cancellation=True,
        access_log=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
