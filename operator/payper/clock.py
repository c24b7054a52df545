"""Wall-clock time as integer milliseconds, and its RFC 3339 form on the Kubernetes API.

Every time Payper records, reports or bills (usage, windows, spans, cold starts, the
demand it sends) is integer milliseconds; these are the one wall clock and the only
conversions to and from the API's timestamps (whole seconds, UTC, ``Z``). Deadlines and
timeouts inside one process (the gateway's hold queue and upstream connects) stay on
asyncio's monotonic clock in float seconds, its own unit: they are never stored, sent or
billed, and what leaves the process from them (``X-Payper-Cold-Start-Ms``, demand
snapshots) is converted to integer milliseconds there.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def seconds(ms: int) -> str:
    """Milliseconds as exact decimal seconds (``1234`` -> ``"1.234"``), for the API and bills."""
    return f"{ms // 1000}.{ms % 1000:03d}"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
