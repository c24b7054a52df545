"""kopf handler for the pods of InferenceDeployments: readiness, scheduling, cold starts."""

from __future__ import annotations

from typing import Any

import kopf

from payper.api.inference_deployment import POD_LABEL
from payper.operator.handlers import Memo, registry


@kopf.on.event("", "v1", "pods", labels={POD_LABEL: kopf.PRESENT}, registry=registry)
async def pod_event(memo: Memo, event: kopf.RawEvent, **_: Any) -> None:
    # The initial listing arrives with type None: existing pods count like new ones.
    memo.controller.observe_pod(event["object"], deleted=event["type"] == "DELETED")
