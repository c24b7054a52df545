"""kopf handler for pods: every pod, because billing follows GPU time into any of them.

Pods of InferenceDeployments (by their selector label) also drive readiness, scheduling
and cold starts; the rest matter for billing only (attributed by owner chain).
"""

from __future__ import annotations

from typing import Any

import kopf

from payper.operator.handlers import Memo, registry


@kopf.on.event("", "v1", "pods", registry=registry)
async def pod_event(memo: Memo, event: kopf.RawEvent, **_: Any) -> None:
    # The initial listing arrives with type None: existing pods count like new ones.
    memo.controller.observe_pod(event["object"], deleted=event["type"] == "DELETED")
