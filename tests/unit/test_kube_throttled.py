"""A 429 from the API server (flow control, or a resource's storage re-initializing after
a CRD change) was not acted on: the client waits its Retry-After and sends it again, a
bounded number of times, and then says what the server said."""

from __future__ import annotations

import time

import pytest
from aiohttp import web

from payper import kube
from payper.kube import ApiError, retry_after_s
from payper_dev.testing.loopback_api import Handler, loopback_api

RECORDS = "/apis/payper.dev/v1alpha1/billingrecords"


def refusing(refusals: int, retry_after: str | None) -> tuple[Handler, list[str]]:
    """A handler that answers the first ``refusals`` requests 429, then 200."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {await request.text()}")
        if len(seen) <= refusals:
            headers = {} if retry_after is None else {"Retry-After": retry_after}
            body = {"kind": "Status", "code": 429, "message": "storage is (re)initializing"}
            return web.json_response(body, status=429, headers=headers)
        return web.json_response({"items": [], "metadata": {}})

    return handler, seen


async def test_a_throttled_request_is_sent_again_after_retry_after() -> None:
    handler, seen = refusing(refusals=2, retry_after="0.2")
    async with loopback_api(RECORDS, handler) as client:
        began = time.monotonic()
        got = await client.request("POST", RECORDS, body={"a": 1})
        waited = time.monotonic() - began
    assert got == {"items": [], "metadata": {}}
    assert seen == ['POST {"a": 1}'] * 3, "the same request, whole, each time"
    assert waited >= 0.4, "it waited the server's Retry-After each time"


async def test_throttling_that_never_ends_fails_with_the_servers_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kube, "THROTTLED_RETRIES", 3)
    handler, seen = refusing(refusals=100, retry_after="0")
    async with loopback_api(RECORDS, handler) as client:
        with pytest.raises(ApiError) as raised:
            await client.get(RECORDS)
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
