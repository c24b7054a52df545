"""The billing part of the operator's configuration: windows, grace, flushes, plans.

Billing owns its settings; the operator's configuration file embeds them under
``billing:`` and validates them at start-up with the rest.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from payper.api.common import ApiModel, DnsLabel, ShortString
from payper.billing.pricing import Plan, default_plans


class BillingConfig(ApiModel):
    window_seconds: Annotated[int, Field(ge=10, le=86400)] = 3600
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
        if value % 10 or 86400 % value:
            raise ValueError(
                "must be a multiple of 10 s that divides a day (agents report every 10 s)"
            )
        return value
