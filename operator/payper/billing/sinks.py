"""What a sink is told, and what it answers: the seam between the exporter and each
billing system it sends to.

Every sink gets the same ``UsageEvent`` per delta part and answers with ``Sent``: which
events it now has, which it refused (it will not take them as they are: an account it
has no customer for, a request the billing system rejects; they are kept and offered
again only after the longest backoff, so one bad record never blocks the rest), and
which failed (try again, after a backoff). A sink that takes a batch whole or not at all
raises ``SinkError`` instead. The CloudEvents sink is here; the Stripe one is
``payper.billing.stripe_sink``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from payper.billing.config import CloudEventsSinkConfig
from payper.clock import iso

EVENT_TYPE = "dev.payper.gpu.usage"
CORRECTION_TYPE = "dev.payper.gpu.usage.correction"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"


@dataclass(frozen=True)
class UsageEvent:
    """One delta part, as every sink is told it."""

    id: str
    account: str
    deployment: str | None
    gpu_product: str
    plan: str
    currency: str
    granularity: str
    window_start_ms: int
    window_end_ms: int
    corrects_window_start_ms: int | None
    """A correction: usage of this earlier window, which was Final when it arrived."""
    active_ms: int
    billed_ms: int
    amount: Decimal

    @property
    def time_ms(self) -> int:
        """When the usage happened: its window's start (a correction: the original's)."""
        return (
            self.window_start_ms
            if self.corrects_window_start_ms is None
            else (self.corrects_window_start_ms)
        )


class SinkError(Exception):
    """A sink did not take a batch (it is retried, after a backoff)."""


@dataclass
class Sent:
    """A sink's answer to one batch, per event id."""

    taken: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    """Why: not sent again until the longest backoff has passed."""
    failed: dict[str, str] = field(default_factory=dict)
    """Why: sent again after the next backoff."""


class Sink(Protocol):
    async def send(self, events: list[UsageEvent]) -> Sent: ...

    async def close(self) -> None: ...


# -- CloudEvents -------------------------------------------------------------------------
def cloudevent(event: UsageEvent, source: str) -> CloudEvent:
    data: dict[str, Any] = {
        "account": event.account,
        "inferenceDeployment": event.deployment,
        "gpuProduct": event.gpu_product,
        "plan": event.plan,
        "granularity": event.granularity,
        "windowStart": iso(event.window_start_ms),
        "windowEnd": iso(event.window_end_ms),
        "activeMs": event.active_ms,
        "billedMs": event.billed_ms,
        "amount": str(event.amount),
        "currency": event.currency,
    }
    if event.corrects_window_start_ms is not None:
        data["correctsWindowStart"] = iso(event.corrects_window_start_ms)
    return CloudEvent(
        {
            "id": event.id,
            "source": source,
            "type": EVENT_TYPE if event.corrects_window_start_ms is None else CORRECTION_TYPE,
            "subject": event.account,
            "time": datetime.fromtimestamp(event.time_ms / 1000, UTC),
            "datacontenttype": "application/json",
        },
        data,
    )


def cloudevents_batch(events: list[UsageEvent], source: str) -> bytes:
    """A structured-mode batch (``application/cloudevents-batch+json``) of the events."""
    form = JSONFormat()
    return b"[" + b",".join(form.write(cloudevent(e, source)) for e in events) + b"]"


class CloudEventsSink:
    """POSTs each batch whole; a receiver that answers 2xx has every event in it."""

    def __init__(self, config: CloudEventsSinkConfig, source: str) -> None:
        self.config = config
        self.source = source
        self._session: aiohttp.ClientSession | None = None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": BATCH_CONTENT_TYPE}
        if self.config.bearer_token_file is not None:
            token = Path(self.config.bearer_token_file).read_text().strip()
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def send(self, events: list[UsageEvent]) -> Sent:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds)
            )
        body = cloudevents_batch(events, self.source)
        try:
            async with self._session.post(
                self.config.url, data=body, headers=self._headers()
            ) as response:
                await response.content.read(64 * 1024)  # bounded: the answer is not used
                if response.status // 100 != 2:
                    raise SinkError(f"{self.config.url} answered {response.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise SinkError(f"{self.config.url}: {error!r}") from error
        return Sent(taken={e.id for e in events})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
