"""Watches carry objects as large as the API server stores: one event per line, whole."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from payper.kube import Informer
from payper_dev.testing.loopback_api import loopback_api


async def test_a_watch_event_over_aiohttps_line_limit_arrives_whole() -> None:
    big = {
        "type": "ADDED",
        "object": {
            "metadata": {"name": "big", "resourceVersion": "2"},
            "data": {"k": "x" * 2_000_000},
        },
    }
    small = {"type": "MODIFIED", "object": {"metadata": {"name": "small", "resourceVersion": "3"}}}

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "true":
            return web.json_response({"metadata": {"resourceVersion": "1"}, "items": []})
        response = web.StreamResponse()
        await response.prepare(request)
        payload = (json.dumps(big) + "\n" + json.dumps(small) + "\n").encode()
        for start in range(0, len(payload), 65_000):  # events split across chunks
            await response.write(payload[start : start + 65_000])
            await asyncio.sleep(0)
        await response.write(b'{"type": "MODIFIED", "obj')  # cut mid-event: dropped
        return response

    seen: list[tuple[str, str, int]] = []

    async def on_event(kind: str, obj: dict[str, object]) -> None:
        meta = obj["metadata"]
        assert isinstance(meta, dict)
        seen.append((kind, meta["name"], len(json.dumps(obj))))

    async with loopback_api("/api/v1/secrets", handler) as kube:
        informer = Informer(kube, "/api/v1/secrets", on_event, metadata_only=True)
        task = asyncio.create_task(informer.run())
        try:
            for _ in range(100):
                if len(seen) >= 2:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert [(kind, name) for kind, name, _ in seen[:2]] == [("ADDED", "big"), ("MODIFIED", "small")]
    assert seen[0][2] > 2_000_000
    # The cache holds metadata only, never the data.
    assert informer.cache["/big"] == {"metadata": {"name": "big", "resourceVersion": "2"}}
