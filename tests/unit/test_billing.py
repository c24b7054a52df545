"""Billing arithmetic: amounts, record updates, exactly-once, adjustments, plans."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from payper.api.billing_record import (
    MAX_AGENTS,
    MAX_POD_INTERVALS,
    BillingRecordSpec,
    BillingRecordStatus,
    RoundedMs,
    SplitUs,
)
from payper.billing import flush, seal
from payper.billing.config import BillingConfig
from payper.billing.events import BillingEvents
from payper.billing.flush import BillingWindows, Observations
from payper.billing.pricing import (
    UNKNOWN_PRODUCT,
    Plan,
    amount,
    mig_profile,
    money,
    product_key,
    reserved_amount,
)
from payper.billing.records import (
    PodSpan,
    RecordChange,
    UsageDelta,
    apply,
    record_name,
    same_totals,
    window_start,
)
from payper.clock import iso
from payper.observed import Key, PodView
from payper.operator.config import ConfigError, load
from payper_dev.testing.billing import record_spec

SPEC = BillingRecordSpec.model_validate(
    record_spec("team-a", "llm", "2026-11-26T10:00:00Z", "2026-11-26T11:00:00Z")
)


def usage(
    agent: str, sequence: int, active_us: int, one_s: int, bursts: int = 1, late: int | None = None
) -> UsageDelta:
    return UsageDelta(
        agent,
        sequence,
        active_us,
        RoundedMs(
            per_millisecond=-(-active_us // 1000), per_second=one_s, per_minute=60_000 * bursts
        ),
        bursts,
        late,
    )


@pytest.mark.parametrize(
    ("billed_ms", "price", "expected"),
    [
        (1000, "0.0012", "0.001200"),
        (1, "0.0012", "0.000001"),  # 0.0000012 rounds half-up to 6 places
        (0, "0.5", "0.000000"),
        (3_600_000, "0.0012", "4.320000"),
        (1234, "0.000417", "0.000515"),  # 0.000514578
        (5, "0.0001", "0.000001"),  # 0.0000005: half up
    ],
)
def test_amount_is_decimal_and_rounds_half_up_once(
    billed_ms: int, price: str, expected: str
) -> None:
    assert money(amount(billed_ms, price)) == expected
    assert isinstance(amount(billed_ms, price), Decimal)


def test_reserved_amount_prices_provisioned_hours() -> None:
    assert money(reserved_amount(3_600_000, "3.20")) == "3.200000"
    assert money(reserved_amount(90_000, "3.20")) == "0.080000"


def test_a_report_lands_once_whatever_the_retries() -> None:
    change = RecordChange(usage=[usage("a", 1, 1_500_400, 2000), usage("a", 1, 300_000, 1000)])
    first, applied = apply(BillingRecordStatus(), SPEC, change, 1000)
    assert applied == [("a", 1)]
    assert first.active_us == 1_800_400
    assert first.active_ms == 1800
    assert first.billed_ms == 3000
    assert first.amount == "0.003600"
    assert first.last_applied_sequence == {"a": 1}
    again, applied_again = apply(first, SPEC, change, 2000)
    assert applied_again == []
    assert same_totals(again, first)
    assert again.to_wire() == {**first.to_wire(), "lastUpdateTime": iso(2000)}
    more, _ = apply(
        first,
        SPEC,
        RecordChange(usage=[usage("a", 2, 200_000, 1000), usage("b", 1, 100_000, 1000)]),
        3000,
    )
    assert more.active_us == 2_100_400
    assert more.last_applied_sequence == {"a": 2, "b": 1}
    assert more.billed_ms == 5000
    assert more.active_gpu_seconds == "2.100"
    assert not same_totals(more, first)


def test_late_usage_is_an_adjustment_in_the_totals_and_labelled() -> None:
    original = 1_764_147_600_000
    status, _ = apply(
        BillingRecordStatus(),
        SPEC,
        RecordChange(usage=[usage("a", 7, 2_000_000, 2000, late=original)]),
        5,
    )
    (adjustment,) = status.adjustments
    assert adjustment.to_wire()["originalWindowStart"] == iso(original)
    assert "already final" in adjustment.reason
    assert (adjustment.active_ms, adjustment.billed_ms, adjustment.amount) == (
        2000,
        2000,
        "0.002400",
    )
    assert status.active_ms == 2000
    assert status.billed_ms == 2000


def test_provisioned_time_from_pod_spans_is_idempotent() -> None:
    change = RecordChange(pods={"u1": PodSpan("u1", "llm-0", 2, 1_000, 61_000)})
    status, _ = apply(BillingRecordStatus(active_us=30_000_000), SPEC, change, 100)
    assert status.provisioned_ms == 120_000
    assert status.idle_ms == 90_000
    assert status.reserved_equivalent_amount == money(reserved_amount(120_000, "3.20"))
    longer = RecordChange(pods={"u1": PodSpan("u1", "llm-0", 2, 1_000, 91_000)})
    again, _ = apply(status, SPEC, longer, 200)
    again, _ = apply(again, SPEC, longer, 300)
    assert again.provisioned_ms == 180_000


def test_windows_and_names() -> None:
    window = 3_600_000
    assert window_start(1_764_151_234_567, window) == 1_764_151_200_000
    name = record_name("llm", 1_764_151_200_000, "NVIDIA-H100-80GB-HBM3")
    assert name.startswith("llm-20251126-100000-")
    assert name != record_name("llm", 1_764_151_200_000, "NVIDIA-A100")
    assert product_key("NVIDIA H100 80GB HBM3") == product_key("NVIDIA-H100-80GB-HBM3")


def test_plans_pick_the_product_price_or_the_default() -> None:
    plan = Plan(
        price_per_gpu_second={"default": "0.001", "NVIDIA H100 80GB HBM3": "0.002"},
        reserved_price_per_gpu_hour={"default": "2"},
    )
    assert plan.price("NVIDIA-H100-80GB-HBM3") == "0.002"
    assert plan.price("NVIDIA-L4") == "0.001"
    assert plan.reserved_price("anything") == "2"


MIG_PLAN = Plan(
    price_per_gpu_second={
        "default": "0.001",
        "NVIDIA H100 80GB HBM3": "0.0014",
        "NVIDIA A30": "0.0004",
        "NVIDIA-H100-80GB-HBM3-MIG-3g.40gb": "0.0005",  # the platform's own profile price
    },
    reserved_price_per_gpu_hour={"default": "2.10", "NVIDIA-H100-80GB-HBM3": "3.50"},
)


@pytest.mark.parametrize(
    ("product", "price", "reserved"),
    [
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "0.0002", "0.5"),  # 1/7 of the H100
        ("NVIDIA H100 80GB HBM3 MIG 1g.20gb", "0.0002", "0.5"),  # memory does not count
        ("NVIDIA H100 80GB HBM3 MIG 2g.20gb", "0.0004", "1"),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "0.0005", "1.5"),  # a key for it wins
        ("NVIDIA H100 80GB HBM3 MIG 4g.40gb", "0.0008", "2"),
        ("NVIDIA H100 80GB HBM3 MIG 7g.80gb", "0.0014", "3.5"),  # the whole GPU
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb+me", "0.0002", "0.5"),  # media extensions
        ("NVIDIA H100 80GB HBM3 MIG 1c.3g.40gb", "0.0002", "0.5"),  # 1 of 3g's slices
        ("NVIDIA-H100-80GB-HBM3-MIG-1g.10gb", "0.0002", "0.5"),  # the key form
        ("NVIDIA A30 MIG 1g.6gb", "0.0001", "0.525"),  # A30: 4 slices; reserved: default
        ("NVIDIA A30 MIG 4g.24gb", "0.0004", "2.1"),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "0.000142857143", "0.3"),  # default's 1/7
        ("NVIDIA H100 80GB HBM3", "0.0014", "3.50"),  # a whole GPU, as before
        ("NVIDIA H100 80GB HBM3 MIG", "0.001", "2.10"),  # no profile: not a share
    ],
)
def test_a_mig_profile_is_its_key_else_its_share_of_the_gpu_price(
    product: str, price: str, reserved: str
) -> None:
    assert MIG_PLAN.price(product) == price
    assert MIG_PLAN.reserved_price(product) == reserved
    BillingRecordSpec.model_validate(
        {**SPEC.to_wire(), "pricePerGpuSecond": price, "reservedPricePerGpuHour": reserved}
    )  # a derived price is a valid price string


def test_mig_profile_share_is_exact_decimal() -> None:
    profile = mig_profile("NVIDIA H100 80GB HBM3 MIG 2g.20gb")
    assert profile is not None
    assert (profile.parent, profile.slices, profile.gpu_slices) == ("NVIDIA-H100-80GB-HBM3", 2, 7)
    assert profile.share == Decimal(2) / Decimal(7)
    assert mig_profile("NVIDIA H100 80GB HBM3") is None
    assert mig_profile("NVIDIA A30 MIG 8g.48gb").share == 1  # type: ignore[union-attr]


def test_split_mig_time_is_said_in_the_record() -> None:
    def split_usage(sequence: int, equal: int, proportional: int) -> UsageDelta:
        delta = usage("a", sequence, 2_000_000, 2000)
        return UsageDelta(
            **{**delta.__dict__, "split_us": SplitUs(equal=equal, proportional=proportional)}
        )

    plain, _ = apply(BillingRecordStatus(), SPEC, RecordChange(usage=[usage("a", 1, 1, 0)]), 1)
    assert plain.split_us is None and "splitUs" not in plain.to_wire()
    change = RecordChange(usage=[split_usage(2, 1_000_000, 0), split_usage(3, 0, 500_000)])
    status, _ = apply(plain, SPEC, change, 2)
    assert status.split_us == SplitUs(equal=1_000_000, proportional=500_000)
    assert status.to_wire()["splitUs"] == {"proportional": 500_000, "equal": 1_000_000}
    again, _ = apply(status, SPEC, change, 3)
    assert again.split_us == status.split_us, "a resend adds nothing"


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        (
            "billing:\n  plans:\n    gold:\n      pricePerGpuSecond: {h100: '0.1'}\n      reservedPricePerGpuHour: {default: '1'}\n",
            "billing.plans.gold.pricePerGpuSecond",
        ),
        (
            "billing:\n  plans:\n    gold:\n      granularity: 1h\n      pricePerGpuSecond: {default: '0.1'}\n      reservedPricePerGpuHour: {default: '1'}\n",
            "billing.plans.gold.granularity",
        ),
        (
            "billing:\n  plans:\n    gold:\n      pricePerGpuSecond: {default: 0.1}\n      reservedPricePerGpuHour: {default: '1'}\n",
            "billing.plans.gold.pricePerGpuSecond.default",
        ),
        (
            "billing:\n  plans:\n    gold:\n      currency: usd\n      pricePerGpuSecond: {default: '0.1'}\n      reservedPricePerGpuHour: {default: '1'}\n",
            "billing.plans.gold.currency",
        ),
        ("billing:\n  windowSeconds: 7\n", "billing.windowSeconds"),
        ("billing:\n  plans:\n    Bad_Name: {}\n", "billing.plans.Bad_Name"),
    ],
)
def test_bad_pricing_stops_the_operator_naming_the_key(
    tmp_path: Path, yaml_text: str, key: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        load(path)
    assert key in str(error.value)


def test_counts_wait_for_a_product_then_are_filed_after_a_window_and_grace() -> None:
    windows = BillingWindows(window_ms=60_000, grace_ms=30_000)
    key = ("team-a", "llm")
    pods = {key: {"u": PodView("llm-0", "u", 0, False, "0/3 nodes fit")}}
    unplaced: dict[Key, int] = {}
    filed = []
    for now in (1_000, 1_000 + 89_999, 1_000 + 90_000, 1_000 + 90_001):
        seen = Observations(BillingEvents(requests={key: 1}), pods, {}, {}, unplaced)
        planned = flush.plan([], {}, seen, windows, now)
        unplaced = planned.unplaced_since
        filed.append(
            [(k.product, c.requests) for k, c in planned.changes.items() if c.requests]
            or planned.held_requests
        )
    assert filed == [
        {key: 1},
        {key: 1},
        [(UNKNOWN_PRODUCT, 1)],  # no pod ever landed: filed as they are
        {key: 1},  # a new wait begins
    ]


GRANTING = BillingConfig.model_validate(
    {
        "plans": {
            "default": {
                "pricePerGpuSecond": {"default": "1"},
                "reservedPricePerGpuHour": {"default": "1"},
            },
            "discount": {
                "pricePerGpuSecond": {"default": "0.5"},
                "reservedPricePerGpuHour": {"default": "1"},
            },
            "free": {
                "pricePerGpuSecond": {"default": "0"},
                "reservedPricePerGpuHour": {"default": "0"},
            },
        },
        "grants": [
            {"namespaces": ["team-a"], "plans": ["discount"], "defaultPlan": "discount"},
            {
                "namespaceSelector": {"tier": "partner"},
                "plans": ["default", "discount"],
                "defaultPlan": "default",
            },
        ],
    }
)


@pytest.mark.parametrize(
    ("namespace", "labels", "requested", "priced_at", "granted"),
    [
        ("team-a", {}, None, "discount", True),  # the grant's default
        ("team-a", {"tier": "partner"}, "default", "discount", False),  # first match wins
        ("team-b", {"tier": "partner"}, "discount", "discount", True),
        ("team-b", {"tier": "partner"}, None, "default", True),
        ("team-c", {}, None, "default", True),  # no grant: the cluster default
        ("team-c", {}, "free", "default", False),  # a configured plan nobody granted
        ("team-c", {}, "discount", "default", False),  # granted elsewhere, not here
        ("team-c", {}, "platinum", "default", False),  # not even configured
        ("team-c", {"tier": "partner-x"}, "discount", "default", False),
    ],
)
def test_tenants_never_choose_their_price(
    namespace: str, labels: dict[str, str], requested: str | None, priced_at: str, granted: bool
) -> None:
    choice = GRANTING.plan_for(namespace, labels, requested)
    assert (choice.name, choice.granted, choice.requested) == (priced_at, granted, requested)


@pytest.mark.parametrize(
    ("billing", "message"),
    [
        ({"defaultPlan": "gold"}, "defaultPlan: 'gold'"),
        (
            {"grants": [{"namespaces": ["a"], "plans": ["gold"], "defaultPlan": "gold"}]},
            "grants.0: 'gold'",
        ),
        (
            {"grants": [{"namespaces": ["a"], "plans": ["default"], "defaultPlan": "x"}]},
            "defaultPlan 'x' is not among its plans",
        ),
        ({"grants": [{"plans": ["default"], "defaultPlan": "default"}]}, "names namespaces"),
    ],
)
def test_plan_references_are_checked_at_start(billing: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        BillingConfig.model_validate(billing)


def test_a_thousand_and_one_churned_pods_keep_the_record_writable_and_exact() -> None:
    """A tenant churns pods through one window to push the record past its bound of pod
    intervals (which would make it unwritable and stall the node's agents)."""
    spans = {
        f"u{i:04d}": PodSpan(f"u{i:04d}", f"llm-{i}", 1, 1_000 + i * 10, 1_000 + i * 10 + 5_000)
        for i in range(1_001)
    }
    status = BillingRecordStatus()
    for batch in (dict(list(spans.items())[:600]), dict(list(spans.items())[600:])):
        status, _ = apply(status, SPEC, RecordChange(pods=batch), 2_000_000)
    assert len(status.pod_intervals) <= MAX_POD_INTERVALS
    assert status.folded_pods == 1_001 - len(status.pod_intervals)
    assert status.provisioned_ms == 1_001 * 5_000, "nothing lost to folding"
    assert min(p.uid for p in status.pod_intervals) == "u0001", "the earliest ended folded"
    again, _ = apply(status, SPEC, RecordChange(pods={"u1000": spans["u1000"]}), 2_000_001)
    assert again.provisioned_ms == status.provisioned_ms, "re-applying a span changes nothing"
    BillingRecordStatus.model_validate(again.to_wire())  # within every bound of the CRD


def test_a_seal_verifies_only_the_record_it_was_made_for() -> None:
    key, other_key = b"k" * 32, b"o" * 32
    spec = {"inferenceDeployment": "llm", "pricePerGpuSecond": "0.0012"}
    record = {
        "metadata": {
            "namespace": "team-a",
            "name": "llm-20261127-160000-abcdef",
            "annotations": {
                seal.ANNOTATION: seal.seal(key, "team-a", "llm-20261127-160000-abcdef", spec)
            },
        },
        "spec": spec,
    }
    assert seal.verify(key, record) is True
    assert seal.verify(other_key, record) is False, "another operator's key"
    cheaper = {**record, "spec": {**spec, "pricePerGpuSecond": "0"}}
    assert seal.verify(key, cheaper) is False, "a seal copied onto another spec"
    elsewhere = {**record, "metadata": {**record["metadata"], "namespace": "team-b"}}
    assert seal.verify(key, elsewhere) is False, "a seal copied into another namespace"
    unsealed = {**record, "metadata": {"namespace": "team-a", "name": "x"}}
    assert seal.verify(key, unsealed) is None


def test_a_record_forgets_agents_whose_reports_are_durable_and_stays_bounded() -> None:
    """More agent ids than the CRD's map allows touch one record in a window (a big fleet,
    or agents restarted with new ids): the record keeps only those not yet durable in the
    ledger's progress, so it stays writable; the totals are exact throughout."""
    status, durable = BillingRecordStatus(), {}
    for n in range(MAX_AGENTS + 100):
        agent = f"node-{n}/agent"
        change = RecordChange(usage=[usage(agent, 1, 1_000, 1_000)])
        status, applied = apply(status, SPEC, change, 0, durable)
        assert applied == [(agent, 1)]
        durable[agent] = 1  # the ledger saved its progress after the flush
        assert len(status.last_applied_sequence) <= 2
    assert status.active_us == (MAX_AGENTS + 100) * 1_000
    # An agent in flight (applied here, its progress not saved yet) is remembered: a
    # resend after a crash is recognised by the record itself.
    status, applied = apply(
        status, SPEC, RecordChange(usage=[usage("late/agent", 1, 5, 0)]), 0, durable
    )
    again, reapplied = apply(
        status, SPEC, RecordChange(usage=[usage("late/agent", 1, 5, 0)]), 0, durable
    )
    assert applied == [("late/agent", 1)] and reapplied == []
    assert again.active_us == status.active_us
