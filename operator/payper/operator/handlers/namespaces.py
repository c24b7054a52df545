"""kopf handler for namespaces: their labels select which pricing plans they are granted."""

from __future__ import annotations

from typing import Any

import kopf

from payper.operator.handlers import Memo, registry


@kopf.on.event("", "v1", "namespaces", registry=registry)
async def namespace_event(memo: Memo, event: kopf.RawEvent, **_: Any) -> None:
    # The initial listing arrives with type None: existing namespaces count like new ones.
    memo.controller.observe_namespace(event["object"], deleted=event["type"] == "DELETED")
