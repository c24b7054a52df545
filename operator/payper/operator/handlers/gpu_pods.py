"""kopf handler for every pod that holds GPUs: where GPU time runs, metered or not.

kopf watches pods once for all pod handlers (filters apply in the operator), so this adds
no API traffic; pods that request no GPU are dropped before any parsing.
"""

from __future__ import annotations

from typing import Any

import kopf

from payper.operator.handlers import Memo, registry


def holds_gpus(spec: kopf.Spec, **_: Any) -> bool:
    return any(
        name.endswith("/gpu")
        for container in spec.get("containers", []) or []
        for name in ((container.get("resources") or {}).get("limits") or {})
    )


@kopf.on.event("", "v1", "pods", when=holds_gpus, registry=registry)
async def gpu_pod_event(memo: Memo, event: kopf.RawEvent, **_: Any) -> None:
    if memo.capacity is not None:
        memo.capacity.observe_pod(event["object"], deleted=event["type"] == "DELETED")
