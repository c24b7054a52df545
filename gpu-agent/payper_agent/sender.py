"""Delivering reports: oldest first, in order, each one until the operator acknowledges it.

The operator acknowledges a batch only after applying it durably, answering with the
highest sequence per agent id it has applied (or recognised as already applied); the
sender then deletes those files. A report the operator cannot apply (not valid, or one
that fails its application) is refused alone: the operator files it in its dead-letter
store, moves past it and lists it under ``refused``, so the batch is acknowledged as
usual. Failures back off exponentially with jitter and never
touch sampling. A report the operator rejects as malformed (400, or 413: too large) is
retried alone, and set aside and counted as dropped only once it has been refused for
``reject_grace`` (10 min): during an upgrade a new agent can briefly talk to an older
operator that does not know its newer fields, and those reports must wait, not be lost.
Reports older than the retention are dropped and
counted too. A dropped report leaves a gap marker under its sequence (no series, the lost
GPU time and why), which the operator applies as an audited loss: the sequence never
stalls. Nothing disappears without a metric and a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp

from payper.clock import now_ms
from payper.identity import TokenFile
from payper_agent import metrics
from payper_agent.store import PendingReport, Store

logger = logging.getLogger(__name__)
MAX_BATCH = 100


class Sender:
    def __init__(
        self,
        store: Store,
        node: str,
        operator_url: str,
        token: TokenFile,
        retention_ms: int = 24 * 3600 * 1000,
        ssl_context: ssl.SSLContext | None = None,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        timeout_s: float = 30.0,
        reject_grace_ms: int = 600_000,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.node = node
        self.url = operator_url.rstrip("/") + "/v1/usage"
        self.token = token
        self.retention_ms = retention_ms
        self.ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.wakeup = asyncio.Event()
        self.reject_grace_ms = reject_grace_ms
        self.clock_ms = clock_ms
        self._refused_since: dict[tuple[str, int], int] = {}
        """The report at the head of the queue that the operator refuses, since when."""

    def _drop_expired(self, pending: list[PendingReport]) -> list[PendingReport]:
        """Drop the reports past retention; the rest, still in sending order."""
        expired = self.store.expired(pending, self.clock_ms(), self.retention_ms)
        for report in expired:
            self._drop(report, "retention")
        return self.store.pending() if expired else pending

    def _drop(self, pending: PendingReport, reason: str) -> None:
        active_us = 0
        marker = False
        try:
            report = self.store.read(pending)
            active_us = sum(int(s.get("activeUs", 0)) for s in report.get("series", []))
            marker = self.store.is_gap_marker(report)
        except (OSError, ValueError, KeyError):
            pass
        metrics.DROPPED_REPORTS.labels(reason).inc()
        metrics.DROPPED_USAGE_SECONDS.labels(reason).inc(active_us / 1e6)
        logger.error(
            "dropping usage report %s (%s): %.3f GPU-seconds will not be billed",
            pending.path.name,
            reason,
            active_us / 1e6,
        )
        if marker:  # a marker the operator refuses: keep it for audit, and stop resending it
            self.store.reject(pending, suffix=".gap-marker")
        else:
            self.store.replace_with_gap_marker(pending, self.node, active_us, reason)

    async def _post(
        self, session: aiohttp.ClientSession, reports: list[dict[str, Any]]
    ) -> tuple[int, Any]:
        body = json.dumps({"reports": reports})
        headers = {**self.token.header(), "Content-Type": "application/json"}
        async with session.post(self.url, data=body, headers=headers, ssl=self.ssl) as response:
            text = await response.text()
            try:
                payload: Any = json.loads(text)
            except ValueError:
                payload = text
            return response.status, payload

    async def send_once(self, session: aiohttp.ClientSession, batch_size: int = MAX_BATCH) -> bool:
        """Send the oldest batch; True if something was acknowledged."""
        pending = self._drop_expired(self.store.pending())
        metrics.REPORT_BACKLOG.set(len(pending))
        if not pending:
            return False
        agent_id = pending[0].agent_id
        batch = [p for p in pending if p.agent_id == agent_id][:batch_size]
        reports = [self.store.read(p) for p in batch]
        status, payload = await self._post(session, reports)
        if status == 200 and isinstance(payload, dict):
            for refused in payload.get("refused") or []:
                metrics.REPORTS_SENT.labels("refused").inc()
                logger.error("the operator refused usage report %s: it is filed there", refused)
            through = int(payload.get("acked", {}).get(agent_id, 0))
            removed = self.store.ack(pending, agent_id, through)
            metrics.REPORTS_SENT.labels("acknowledged").inc(removed)
            metrics.REPORT_BACKLOG.set(len(pending) - removed)
            if removed == 0:
                raise RuntimeError(f"operator acknowledged nothing of {agent_id}: {payload}")
            return True
        if status in (400, 413):
            metrics.REPORTS_SENT.labels("rejected").inc()
            if len(batch) > 1:
                return await self.send_once(session, batch_size=1)  # find the bad one
            head = (batch[0].agent_id, batch[0].sequence)
            self._refused_since = {head: self._refused_since.get(head, self.clock_ms())}
            if self.clock_ms() - self._refused_since[head] < self.reject_grace_ms:
                raise RuntimeError(
                    f"operator refused report {head[1]} ({status}: {payload}); kept for "
                    f"{self.reject_grace_ms // 1000} s in case the operator is older than "
                    "this agent (an upgrade in progress), then set aside"
                )
            self._drop(batch[0], f"rejected-{status}")
            return True
        metrics.REPORTS_SENT.labels(f"http-{status}").inc()
        raise RuntimeError(f"operator answered {status}: {payload}")

    async def run(self) -> None:
        failures = 0
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            while True:
                try:
                    if await self.send_once(session):
                        failures = 0
                        continue
                except (
                    aiohttp.ClientError,
                    TimeoutError,
                    OSError,
                    RuntimeError,
                    ValueError,
                ) as error:
                    failures += 1
                    delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(failures, 16))
                    delay *= random.uniform(0.5, 1.0)
                    logger.warning("sending usage failed (%s); retrying in %.1fs", error, delay)
                    await asyncio.sleep(delay)
                    continue
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), 1.0)
