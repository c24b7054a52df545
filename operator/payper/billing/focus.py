"""FOCUS cost and usage files from BillingRecords: ``payper export focus``.

FOCUS (the FinOps Foundation's Open Cost and Usage Specification, version 1.0) is what
FinOps tools read for chargeback. One row per record for its own window's usage, and one
per correction it holds (late usage of an earlier window: ``ChargeClass`` Correction,
``ChargePeriod`` the original window). The records are chosen exactly as ``payper bill``
chooses them (by window start), and each record's rows add up to its line there, so a
file's ``BilledCost`` per currency equals the invoice's total for the same period.

Who is who: the billing account is the tenant's namespace (the account its records
name), the sub-account is the InferenceDeployment, the SKU the GPU product and the SKU
price the plan's price for it. Costs are in the plan's currency; list, contracted,
effective and billed cost are the same (Payper has no discounts or commitments).
Payper's own columns carry the ``x_Payper`` prefix, as the specification asks of
columns it does not define.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from payper.api.billing_record import BillingRecord
from payper.billing.invoice import selected
from payper.billing.pricing import amount
from payper.clock import iso, seconds

VERSION = "1.0"
COLUMNS = (
    "AvailabilityZone",
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
    "x_PayperRecord",
    "x_PayperActiveMs",
    "x_PayperBilledMs",
    "x_PayperGranularity",
)
UNIT = "GPU-Seconds"


def _at(moment: datetime) -> str:
    return iso(int(moment.timestamp() * 1000))


def _month(moment: datetime) -> tuple[str, str]:
    start = moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return _at(start), _at(end)


def rows(
    records: Iterable[BillingRecord],
    start_ms: int | None,
    end_ms: int | None,
    issuer: str = "Payper",
) -> list[dict[str, str]]:
    """The FOCUS rows of the records ``payper bill`` would list for the same period."""
    found = []
    for record in selected(records, start_ms, end_ms):
        spec, status = record.spec, record.status
        price = Decimal(spec.price_per_gpu_second)
        deployment = spec.inference_deployment or "(no InferenceDeployment)"
        parts: list[tuple[datetime, datetime, int, int, Decimal, bool]] = []
        own_active, own_billed = status.active_ms, status.billed_ms
        own_cost = amount(status.billed_ms, spec.price_per_gpu_second)
        length = spec.window.end - spec.window.start
        for adjustment in status.adjustments:
            cost = amount(adjustment.billed_ms, spec.price_per_gpu_second)
            start = adjustment.original_window_start
            parts.append(
                (start, start + length, adjustment.active_ms, adjustment.billed_ms, cost, True)
            )
            own_active -= adjustment.active_ms
            own_billed -= adjustment.billed_ms
            own_cost -= cost
        parts.insert(
            0, (spec.window.start, spec.window.end, own_active, own_billed, own_cost, False)
        )
        period_start, period_end = _month(spec.window.start)
        for start, end, active_ms, billed_ms, cost, correction in parts:
            if correction is False and active_ms == billed_ms == 0 and cost == 0 and len(parts) > 1:
                continue  # a record holding only corrections
            row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
            row.update(
                BilledCost=format(cost, "f"),
                BillingAccountId=spec.account,
                BillingAccountName=spec.account,
                BillingCurrency=spec.currency,
                BillingPeriodStart=period_start,
                BillingPeriodEnd=period_end,
                ChargeCategory="Usage",
                ChargeClass="Correction" if correction else "",
                ChargeDescription=f"Active GPU time of {deployment} on {spec.gpu_product}"
                + (f" (late usage of {_at(start)})" if correction else ""),
                ChargeFrequency="Usage-Based",
                ChargePeriodStart=_at(start),
                ChargePeriodEnd=_at(end),
                ConsumedQuantity=seconds(active_ms)
                if active_ms >= 0
                else "-" + seconds(-active_ms),
                ConsumedUnit=UNIT,
                ContractedCost=format(cost, "f"),
                ContractedUnitPrice=str(price),
                EffectiveCost=format(cost, "f"),
                InvoiceIssuerName=issuer,
                ListCost=format(cost, "f"),
                ListUnitPrice=str(price),
                PricingCategory="Standard",
                PricingQuantity=seconds(billed_ms),
                PricingUnit=UNIT,
                ProviderName=issuer,
                PublisherName=issuer,
                ResourceId=f"{spec.account}/{deployment}",
                ResourceName=deployment,
                ResourceType="InferenceDeployment",
                ServiceCategory="AI and Machine Learning",
                ServiceName="Payper GPU inference",
                SkuId=spec.gpu_product,
                SkuPriceId=f"{spec.plan}/{spec.gpu_product}",
                SubAccountId=f"{spec.account}/{deployment}",
                SubAccountName=deployment,
                Tags=json.dumps({"payper.dev/plan": spec.plan}, sort_keys=True),
                x_PayperRecord=f"{record.metadata.namespace}/{record.metadata.name}",
                x_PayperActiveMs=str(active_ms),
                x_PayperBilledMs=str(billed_ms),
                x_PayperGranularity=spec.granularity,
            )
            found.append(row)
    found.sort(key=lambda r: (r["BillingAccountId"], r["ResourceId"], r["ChargePeriodStart"]))
    return found


def as_csv(found: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(found)
    return out.getvalue()


def billed_totals(found: list[dict[str, str]]) -> dict[str, Decimal]:
    """BilledCost per currency (what the invoice's totals must equal)."""
    totals: dict[str, Decimal] = {}
    for row in found:
        currency = row["BillingCurrency"]
        totals[currency] = totals.get(currency, Decimal(0)) + Decimal(row["BilledCost"])
    return totals
