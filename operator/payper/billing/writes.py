"""Writing many objects at once, each once, a bounded number at a time.

Records are independent objects: written one after another, their API round trips add
up (at 4,000 agents a flush outgrew its interval; at 10,000 deployments one export step
did, ``bench/README.md``). The ledger's record writes and the exporter's annotation
patches both go through ``write_each``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

WriteError = Exception
"""What keeps one record from being written in a flush (the rest are still written): an
API error, a timeout, and also anything else its write raised (a change the record cannot
hold): one record never stops the flush. Cancellation is not caught."""


async def write_each(
    changes: Mapping[K, V],
    write: Callable[[K, V], Awaitable[None]],
    concurrency: int,
) -> dict[K, WriteError | None]:
    """Write each change exactly once, at most ``concurrency`` at a time; per key, in the
    plan's order, the error that kept it from being written (None: written).

    A fixed number of workers take the changes from one iterator, so no record is written
    twice and at most ``concurrency`` requests are in flight. Any exception a write raises is
    that key's outcome (``BaseException``s such as cancellation are raised only after
    every write has finished: no write of this flush outlives it).
    """
    outcomes: dict[K, WriteError | None] = {}
    pending = iter(list(changes.items()))

    async def worker() -> None:
        for key, change in pending:
            try:
                await write(key, change)
            except Exception as error:
                outcomes[key] = error
            else:
                outcomes[key] = None

    workers = min(max(1, concurrency), len(changes))
    results = await asyncio.gather(*(worker() for _ in range(workers)), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return {key: outcomes[key] for key in changes if key in outcomes}
