"""Pricing plans and the money arithmetic: decimal only, one rounding rule.

A plan bills at one granularity (1ms, 1s or 1m) with a price per GPU-second per GPU
product (and a default), plus a reserved price per GPU-hour per product, used only to
show what the same provisioned time would have cost on reserved GPUs.

The rounding rule, applied once per record and per adjustment, never per report:
``amount = billed_ms x price_per_gpu_second / 1000``, computed exactly in
``decimal.Decimal`` and then rounded half-up to ``AMOUNT_PLACES`` decimal places. So an
amount is reproducible from the record alone: its billed milliseconds and the price it
snapshotted.

MIG: an instance's GPU product names its profile, as NVML names the MIG device
("NVIDIA H100 80GB HBM3 MIG 1g.10gb", key ``NVIDIA-H100-80GB-HBM3-MIG-1g.10gb``). A price
table key for that profile wins. Otherwise the profile is priced at its parent GPU's
price (that product's key, else "default") times the profile's share of the GPU: its
compute slices (the ``<g>g`` of the profile, or the ``<c>c`` of a compute instance inside
one, "1c.3g.40gb") over the GPU's compute slices in MIG mode, which NVIDIA's MIG user
guide gives per GPU (``MIG_SLICES``: 7 on A100, H100, H200, H20, GH200 and B200, 4 on
A30 and RTX PRO 6000). So 1g on an H100 is 1/7 of its price, 4g on an A30 is all of
it. The derived price is rounded half-up to ``PRICE_PLACES`` decimal places (what a price
string holds) before it is snapshotted into a record, so the record still reproduces its
amount from its own price.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
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


PRICE_PLACES = 12
"""Decimal places of a price string (``payper.api.common.DECIMAL_PATTERN``)."""
MIG_SLICES_DEFAULT = 7
MIG_SLICES: dict[str, int] = {"A30": 4, "RTX-PRO-6000": 4}
"""Compute slices of a whole GPU in MIG mode, for the GPUs that do not have seven: the
first key found in the parent product's key wins."""
_MIG_PROFILE = re.compile(
    r"^(?P<parent>.+)-MIG-(?:(?P<compute>[0-9]+)c\.)?(?P<slices>[0-9]+)g\.[0-9]+gb(?:-[a-z]+)*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class MigProfile:
    parent: str
    """The parent GPU's product key."""
    slices: int
    gpu_slices: int

    @property
    def share(self) -> Decimal:
        """The profile's share of the GPU (never more than all of it)."""
        return min(Decimal(1), Decimal(self.slices) / Decimal(self.gpu_slices))


def mig_profile(product: str) -> MigProfile | None:
    """The MIG profile a product key names, or None for a whole GPU."""
    match = _MIG_PROFILE.match(product_key(product))
    if match is None:
        return None
    parent = match["parent"]
    gpu_slices = next((n for k, n in MIG_SLICES.items() if k in parent), MIG_SLICES_DEFAULT)
    return MigProfile(parent, int(match["compute"] or match["slices"]), gpu_slices)


def _price_string(value: Decimal) -> str:
    text = format(value.quantize(Decimal(1).scaleb(-PRICE_PLACES), rounding=ROUND_HALF_UP), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _priced(table: dict[str, str], product: str) -> str:
    """The table's price for a product: its own key, else (a MIG profile) the parent's
    price times the profile's share, else the default."""
    key = product_key(product)
    if key in table:
        return table[key]
    profile = mig_profile(key)
    if profile is None:
        return table[DEFAULT_PRODUCT]
    with localcontext() as context:
        context.prec = 60  # 18 integer and 12 decimal digits, times a share, exactly
        return _price_string(Decimal(_priced(table, profile.parent)) * profile.share)


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
    """Per GPU product (node-label form, e.g. NVIDIA-H100-80GB-HBM3), with a "default".
    A MIG profile is a product of its own (NVIDIA-H100-80GB-HBM3-MIG-1g.10gb); one not
    listed costs its GPU's price times its share of the GPU (1g of 7 slices: 1/7)."""
    reserved_price_per_gpu_hour: PriceTable

    @field_validator("price_per_gpu_second", "reserved_price_per_gpu_hour")
    @classmethod
    def _has_default(cls, table: dict[str, str]) -> dict[str, str]:
        if DEFAULT_PRODUCT not in table:
            raise ValueError(f'needs a "{DEFAULT_PRODUCT}" entry for GPU products not listed')
        return {product_key(k) if k != DEFAULT_PRODUCT else k: v for k, v in table.items()}

    def price(self, product: str) -> str:
        return _priced(self.price_per_gpu_second, product)

    def reserved_price(self, product: str) -> str:
        return _priced(self.reserved_price_per_gpu_hour, product)


def default_plans() -> dict[str, Plan]:
    return {
        "default": Plan(
            granularity="1s",
            currency="USD",
            price_per_gpu_second={DEFAULT_PRODUCT: "0.0011", "NVIDIA-H100-80GB-HBM3": "0.0012"},
            reserved_price_per_gpu_hour={DEFAULT_PRODUCT: "2.50", "NVIDIA-H100-80GB-HBM3": "3.20"},
        )
    }
