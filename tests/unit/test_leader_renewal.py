"""A leader whose renewals get no answer (a slow or throttling API server) steps down
within its lease duration: a renewal never outlasts the lease it renews."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from kubernetes import client as k8s_client

from payper.kube import Credentials, Kube
from payper.operator.leader import LeaderElector, LostLeadership
from payper_dev.loopback import free_port


async def test_a_renewal_with_no_answer_loses_leadership_within_the_lease() -> None:
    stalled, done = asyncio.Event(), asyncio.Event()

    async def never_answers(request: web.Request) -> web.Response:
        stalled.set()
        await done.wait()  # no answer while the test runs
        return web.json_response({}, status=503)

    app = web.Application()
    app.router.add_route("*", "/apis/coordination.k8s.io/v1/namespaces/ns/leases/op", never_answers)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    kube = Kube(Credentials(f"http://127.0.0.1:{port}", False, k8s_client.Configuration()))
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
        await kube.close()
        await runner.cleanup()
    assert stalled.is_set(), "a renewal was attempted"
    assert stepped_down_after < 3.0, "stepped down within about the lease duration"
    assert not elector.is_leader
