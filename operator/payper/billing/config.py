"""The billing part of the operator's configuration: windows, grace, flushes, plans.

Billing owns its settings; the operator's configuration file embeds them under
``billing:`` and validates them at start-up with the rest.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from payper.api.common import ApiModel, DnsLabel, ShortString
from payper.billing.pricing import Plan, default_plans

DAY_SECONDS = 86400
WINDOW_STEP_SECONDS = 10
"""Agents cut reports on 10 s boundaries: a window of whole steps never splits a report."""
WINDOW_LENGTHS = tuple(
    seconds
    for seconds in range(WINDOW_STEP_SECONDS, DAY_SECONDS + 1, WINDOW_STEP_SECONDS)
    if DAY_SECONDS % seconds == 0
)
"""Every allowed window length: whole steps that tile each UTC day exactly."""

WindowSeconds = Annotated[
    int,
    Field(ge=WINDOW_STEP_SECONDS, le=DAY_SECONDS, json_schema_extra={"enum": list(WINDOW_LENGTHS)}),
]
"""Checked by ``BillingConfig`` (with its message); the JSON Schema lists the lengths, so the
chart's values.schema.json refuses what the operator would refuse."""


class BillingConfig(ApiModel):
    window_seconds: WindowSeconds = 3600
    """One BillingRecord per deployment (and GPU product) per window."""
    grace_seconds: Annotated[int, Field(ge=0, le=86400)] = 300
    """A record becomes Final this long after its window ends; later usage is an adjustment."""
    flush_interval_seconds: Annotated[float, Field(ge=0.2, le=300)] = 10.0
    """Each record is written at most once per flush; usage reports are acknowledged after it."""
    ledger_config_map: ShortString = "payper-usage-ledger"
    """Per agent id, the last report applied everywhere (in the leader election namespace)."""
    plans: dict[DnsLabel, Plan] = Field(default_factory=default_plans)

    @field_validator("window_seconds")
    @classmethod
    def _window(cls, value: int) -> int:
        if value not in WINDOW_LENGTHS:
            raise ValueError(
                "must be a multiple of 10 s that divides a day (agents report every 10 s)"
            )
        return value
