"""How the ledger writes one flush's records: each at most once, a bounded number at a
time, failures collected per record (``payper.billing.writes.write_each``), no cluster."""

from __future__ import annotations

import asyncio

import pytest

from payper.billing.records import RecordChange, RecordKey
from payper.billing.writes import write_each
from payper.kube import ApiError

T0 = 1_764_000_000_000


def changes(count: int) -> dict[RecordKey, RecordChange]:
    return {RecordKey("team-a", f"d{i}", T0, "H100"): RecordChange() for i in range(count)}


class Writer:
    """A fake record writer: takes a little time, notes what it wrote and how many at once."""

    def __init__(self, fail: dict[str, BaseException] | None = None) -> None:
        self.fail = fail or {}
        self.written: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, key: RecordKey, _: RecordChange) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001 * (hash(key.deployment) % 3))
            if key.deployment in self.fail:
                raise self.fail[key.deployment]
            self.written.append(key.deployment)
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize(("records", "concurrency", "most"), [(50, 16, 16), (5, 16, 5), (7, 1, 1)])
async def test_each_record_is_written_once_with_at_most_the_bound_in_flight(
    records: int, concurrency: int, most: int
) -> None:
    planned = changes(records)
    writer = Writer()
    outcomes = await write_each(planned, writer, concurrency)
    assert sorted(writer.written) == sorted(k.deployment for k in planned)
    assert len(writer.written) == len(set(writer.written)) == records
    assert writer.most_in_flight == most
    assert list(outcomes) == list(planned)  # the plan's order
    assert all(error is None for error in outcomes.values())


async def test_one_at_a_time_is_the_plans_order() -> None:
    planned = changes(6)
    writer = Writer()
    await write_each(planned, writer, 1)
    assert writer.written == [k.deployment for k in planned]


async def test_no_records_no_writes() -> None:
    assert await write_each({}, Writer(), 16) == {}


async def test_failures_are_collected_per_record_and_the_rest_written() -> None:
    gone = ApiError(404, {"reason": "NotFound"}, "PUT", "/x")
    planned = changes(20)
    writer = Writer({"d3": gone, "d7": OSError("reset"), "d11": TimeoutError()})
    outcomes = await write_each(planned, writer, 4)
    failed = {key.deployment: error for key, error in outcomes.items() if error is not None}
    assert failed == {"d3": gone, "d7": writer.fail["d7"], "d11": writer.fail["d11"]}
    assert len(writer.written) == 17


async def test_any_error_of_one_record_is_that_records_outcome_and_the_rest_are_written() -> None:
    """A bug's exception or a record that cannot hold its change (a pydantic error) stays
    with its record: the flush goes on for every other one."""
    planned = changes(12)
    writer = Writer({"d2": RuntimeError("bug"), "d5": ValueError("amount has 19 digits")})
    outcomes = await write_each(planned, writer, 4)
    failed = {key.deployment: error for key, error in outcomes.items() if error is not None}
    assert failed == {"d2": writer.fail["d2"], "d5": writer.fail["d5"]}
    assert len(writer.written) == 10


async def test_a_cancellation_is_raised_after_every_other_write_finished() -> None:
    planned = changes(12)
    writer = Writer({"d2": asyncio.CancelledError()})
    with pytest.raises(asyncio.CancelledError):
        await write_each(planned, writer, 4)
    assert writer.in_flight == 0  # nothing of this flush still writing
    assert len(writer.written) == 11  # the other workers took the rest
