"""A local stand-in for the operator's usage endpoint, for testing the agent alone.

It keeps the endpoint's contract without a cluster: apply each agent's reports in
sequence order, recognise a resend, apply nothing beyond a gap, and answer with the last
applied sequence per agent. Its state outlives ``stop()``, like the operator's durable
progress, so a test can restart it mid-delivery; a subclass can fail requests on purpose.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from payper_dev.loopback import free_port


class UsageReceiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.last: dict[str, int] = {}
        self.applied: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None

    def apply(self, body: dict[str, Any]) -> None:
        for report in body["reports"]:
            agent, sequence = report["agentId"], report["sequence"]
            last = self.last.get(agent, 0)
            if sequence <= last:
                continue  # a resend: recognised as applied
            if sequence != last + 1:
                break  # a gap: apply nothing beyond it
            self.last[agent] = sequence
            self.applied.append(report)

    def acked(self) -> web.Response:
        return web.json_response({"acked": dict(self.last)})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.apply(await request.json())
        return self.acked()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/usage", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def active_us(self) -> int:
        return sum(s["activeUs"] for r in self.applied for s in r["series"])

    def agent_ids(self) -> list[str]:
        return sorted({r["agentId"] for r in self.applied})
