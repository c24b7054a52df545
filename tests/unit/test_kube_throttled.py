"""A 429 from the API server (flow control, or a resource's storage re-initializing after
a CRD change) was not acted on: the client waits its Retry-After and sends it again, a
bounded number of times, and then says what the server said."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from kubernetes import client as k8s_client

from payper import kube
from payper.kube import ApiError, Credentials, Kube, retry_after_s
from payper_dev.loopback import free_port


@asynccontextmanager
async def api_server(
    refusals: int, retry_after: str | None
) -> AsyncIterator[tuple[Kube, list[str]]]:
    """A loopback server that answers the first ``refusals`` requests 429, then 200."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {await request.text()}")
        if len(seen) <= refusals:
            headers = {} if retry_after is None else {"Retry-After": retry_after}
            body = {"kind": "Status", "code": 429, "message": "storage is (re)initializing"}
            return web.json_response(body, status=429, headers=headers)
        return web.json_response({"items": [], "metadata": {}})

    app = web.Application()
    app.router.add_route("*", "/apis/payper.dev/v1alpha1/billingrecords", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client = Kube(Credentials(f"http://127.0.0.1:{port}", False, k8s_client.Configuration()))
    try:
        yield client, seen
    finally:
        await client.close()
        await runner.cleanup()


async def test_a_throttled_request_is_sent_again_after_retry_after() -> None:
    async with api_server(refusals=2, retry_after="0.2") as (client, seen):
        began = time.monotonic()
        got = await client.request(
            "POST", "/apis/payper.dev/v1alpha1/billingrecords", body={"a": 1}
        )
        waited = time.monotonic() - began
    assert got == {"items": [], "metadata": {}}
    assert seen == ['POST {"a": 1}'] * 3, "the same request, whole, each time"
    assert waited >= 0.4, "it waited the server's Retry-After each time"


async def test_throttling_that_never_ends_fails_with_the_servers_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kube, "THROTTLED_RETRIES", 3)
    async with api_server(refusals=100, retry_after="0") as (client, seen):
        with pytest.raises(ApiError) as raised:
            await client.get("/apis/payper.dev/v1alpha1/billingrecords")
    assert raised.value.status == 429
    assert "storage is (re)initializing" in str(raised.value)
    assert len(seen) == 4, "the first try and 3 more, then it gives up"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 1.0),
        ("2", 2.0),
        ("0", 0.1),  # never a busy loop
        ("-5", 0.1),
        ("86400", kube.MAX_RETRY_AFTER_S),  # a server (or a proxy) cannot park us for a day
        ("nan", 1.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0),  # an HTTP date: not used by kube-apiserver
    ],
)
def test_retry_after_is_read_within_bounds(header: str | None, seconds: float) -> None:
    assert retry_after_s(header) == seconds
