"""A leader whose renewals get no answer (a slow or throttling API server) steps down
within its lease duration: a renewal never outlasts the lease it renews."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from payper.operator.leader import LeaderElector, LostLeadership
from payper_dev.testing.loopback_api import loopback_api


async def test_a_renewal_with_no_answer_loses_leadership_within_the_lease() -> None:
    stalled, done = asyncio.Event(), asyncio.Event()

    async def never_answers(request: web.Request) -> web.Response:
        stalled.set()
        await done.wait()  # no answer while the test runs
        return web.json_response({}, status=503)

    lease = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/op"
    async with loopback_api(lease, never_answers) as kube:
        elector = LeaderElector(kube, "ns", "op", "me", duration_s=2, renew_s=0.2)
        elector.is_leader = True
        began = time.monotonic()
        try:
            with pytest.raises(LostLeadership, match="could not renew"):
                async with asyncio.timeout(10):  # the bound under test is 2 s; this is the test's
                    await elector.keep()
            stepped_down_after = time.monotonic() - began
        finally:
            done.set()
    assert stalled.is_set(), "a renewal was attempted"
    assert stepped_down_after < 3.0, "stepped down within about the lease duration"
    assert not elector.is_leader
