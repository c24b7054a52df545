"""Pricing plans and the money arithmetic: decimal only, one rounding rule.

A plan bills at one granularity (1ms, 1s or 1m) with a price per GPU-second per GPU
product (and a default), plus a reserved price per GPU-hour per product, used only to
show what the same provisioned time would have cost on reserved GPUs.

The rounding rule, applied once per record and per adjustment, never per report:
``amount = billed_ms x price_per_gpu_second / 1000``, computed exactly in
``decimal.Decimal`` and then rounded half-up to ``AMOUNT_PLACES`` decimal places. So an
amount is reproducible from the record alone: its billed milliseconds and the price it
snapshotted.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated

from pydantic import Field, field_validator

from payper.api.billing_record import Granularity
from payper.api.common import ApiModel, DecimalString

AMOUNT_PLACES = 6
QUANTUM = Decimal(1).scaleb(-AMOUNT_PLACES)
DEFAULT_PRODUCT = "default"
UNKNOWN_PRODUCT = "unknown"


def product_key(name: str) -> str:
    """NVML says "NVIDIA H100 80GB HBM3", the node label "NVIDIA-H100-80GB-HBM3": one key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-") or UNKNOWN_PRODUCT


def amount(billed_ms: int, price_per_gpu_second: str) -> Decimal:
    exact = Decimal(billed_ms) * Decimal(price_per_gpu_second) / Decimal(1000)
    return exact.quantize(QUANTUM, rounding=ROUND_HALF_UP)


def reserved_amount(provisioned_ms: int, price_per_gpu_hour: str) -> Decimal:
    exact = Decimal(provisioned_ms) * Decimal(price_per_gpu_hour) / Decimal(3_600_000)
    return exact.quantize(QUANTUM, rounding=ROUND_HALF_UP)


def money(value: Decimal) -> str:
    """A decimal string in the CRD's pattern (no exponent, no sign)."""
    return format(value.quantize(QUANTUM, rounding=ROUND_HALF_UP), "f")


PriceTable = Annotated[
    dict[str, DecimalString],
    Field(min_length=1, json_schema_extra={"required": [DEFAULT_PRODUCT]}),
]
"""The "default" entry is checked by ``Plan`` (with its message) and required by the schema."""


class Plan(ApiModel):
    granularity: Granularity = "1s"
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    price_per_gpu_second: PriceTable
    """Per GPU product (node-label form, e.g. NVIDIA-H100-80GB-HBM3), with a "default"."""
    reserved_price_per_gpu_hour: PriceTable

    @field_validator("price_per_gpu_second", "reserved_price_per_gpu_hour")
    @classmethod
    def _has_default(cls, table: dict[str, str]) -> dict[str, str]:
        if DEFAULT_PRODUCT not in table:
            raise ValueError(f'needs a "{DEFAULT_PRODUCT}" entry for GPU products not listed')
        return {product_key(k) if k != DEFAULT_PRODUCT else k: v for k, v in table.items()}

    def price(self, product: str) -> str:
        return self.price_per_gpu_second.get(
            product_key(product), self.price_per_gpu_second[DEFAULT_PRODUCT]
        )

    def reserved_price(self, product: str) -> str:
        table = self.reserved_price_per_gpu_hour
        return table.get(product_key(product), table[DEFAULT_PRODUCT])


def default_plans() -> dict[str, Plan]:
    return {
        "default": Plan(
            granularity="1s",
            currency="USD",
            price_per_gpu_second={DEFAULT_PRODUCT: "0.0011", "NVIDIA-H100-80GB-HBM3": "0.0012"},
            reserved_price_per_gpu_hour={DEFAULT_PRODUCT: "2.50", "NVIDIA-H100-80GB-HBM3": "3.20"},
        )
    }
