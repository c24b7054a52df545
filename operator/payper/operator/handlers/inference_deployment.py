"""kopf handlers for InferenceDeployment: reconcile its children, forget it when deleted."""

from __future__ import annotations

from typing import Any

import kopf

from payper.api.common import GROUP, VERSION
from payper.api.inference_deployment import PLURAL
from payper.kube import ApiError
from payper.operator.handlers import Memo, registry

RESOURCE = (GROUP, VERSION, PLURAL)
RETRY_DELAY_S = 5


async def _reconcile(memo: Memo, body: kopf.Body, resumed: bool) -> None:
    try:
        await memo.controller.reconcile(body, resumed=resumed)
    except ApiError as error:
        raise kopf.TemporaryError(str(error), delay=RETRY_DELAY_S) from error


@kopf.on.create(*RESOURCE, registry=registry)
async def created(memo: Memo, body: kopf.Body, **_: Any) -> None:
    await _reconcile(memo, body, resumed=False)


@kopf.on.update(*RESOURCE, field="spec", registry=registry)
async def updated(memo: Memo, body: kopf.Body, **_: Any) -> None:
    await _reconcile(memo, body, resumed=False)


@kopf.on.resume(*RESOURCE, registry=registry)
async def resumed(memo: Memo, body: kopf.Body, **_: Any) -> None:
    await _reconcile(memo, body, resumed=True)


@kopf.on.event(*RESOURCE, registry=registry)
async def seen(memo: Memo, event: kopf.RawEvent, **_: Any) -> None:
    meta = event["object"]["metadata"]
    key = (meta["namespace"], meta["name"])
    memo.controller.registry.saw_deployment(key)  # every event, the initial listing's too
    if event["type"] == "DELETED":
        memo.controller.forget(key)
