"""Cutting a usage report from the meter: the deltas since the previous report.

Cutting moves each series' reported marks forward in the same step, so the next report
starts exactly where this one ended; the caller persists the report and the meter state
together (see ``payper_agent.store``).
"""

from __future__ import annotations

from typing import Any

from payper.api.billing_record import RoundedMs, SplitUs
from payper.api.usage import SeriesUsage, UsageReport
from payper_agent.meter import Meter


def cut(
    meter: Meter,
    agent_id: str,
    sequence: int,
    node: str,
    start_ms: int,
    end_ms: int,
    simulated: bool = False,
) -> UsageReport:
    # Build the whole report first, then mark its usage reported: a series the report
    # cannot carry raises here with the meter untouched, so nothing is lost or repeated.
    series_usage = []
    included = []
    for series in meter.series.values():
        active_us = series.total_x100 // 100 - series.reported_us
        if active_us == 0 and not series.has_unreported_bursts:
            continue  # (a minute-long burst may end polls after its last active time)
        identity = series.identity
        split = {
            name: x100 // 100 - series.reported_split_us.get(name, 0)
            for name, x100 in series.split_x100.items()
        }
        included.append((series, active_us, split))
        series_usage.append(
            SeriesUsage(
                namespace=identity.namespace,
                pod=identity.pod,
                pod_uid=identity.pod_uid,
                container=identity.container,
                gpu=series.gpu,
                gpu_product=series.product,
                inference_deployment=identity.inference_deployment,
                active_us=active_us,
                rounded_ms=series.rounded_ms,
                bursts=series.bursts,
                split_us=SplitUs.model_validate(split) if any(split.values()) else None,
            )
        )
    unattributed_us = meter.unattributed_x100 // 100 - meter.unattributed_reported_us
    unmetered_us = meter.unmetered_us - meter.unmetered_reported_us
    gpus = meter.gpu_time.rows(series_usage)
    report = UsageReport(
        agent_id=agent_id,
        sequence=sequence,
        node=node,
        interval_start_ms=start_ms,
        interval_end_ms=end_ms,
        series=series_usage,
        unattributed_us=unattributed_us,
        unmetered_gpus=sorted(meter.unmetered),
        unmetered_us=unmetered_us,
        gpus=gpus,
        simulated=simulated,
    )
    for series, active_us, split in included:
        series.reported_us += active_us
        for name, us in split.items():
            series.reported_split_us[name] = series.reported_split_us.get(name, 0) + us
        series.reported_rounded_ms += series.rounded_ms
        series.reported_bursts += series.bursts
        series.rounded_ms = RoundedMs()
        series.bursts = 0
    meter.unattributed_reported_us += unattributed_us
    meter.unmetered_reported_us += unmetered_us
    meter.gpu_time.mark_reported(gpus)
    return report


def report_json(report: UsageReport) -> dict[str, Any]:
    return report.model_dump(mode="json", by_alias=True)
