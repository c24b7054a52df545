"""The per-GPU reconciliation of one node in one billing window, as the operator keeps it.

Every GPU-second of a metered GPU has one home: attributed to a pod, unattributed (a
process in no pod), unmetered (the driver could not say) or idle. Agents say so per GPU
in every report (``payper.api.usage.GpuTime``); the ledger sums those per node and
billing window into one small object in the operator's namespace, so that ``payper
reconcile`` can show where every GPU-second went next to what the BillingRecords hold.

It is applied exactly once per report, like a record: the object stores the last report
sequence applied per agent (node and agent id) and is written with optimistic
concurrency, so a resend after a crash is recognised. It is bounded: at most
``MAX_GPUS`` rows (more fold into one ``other`` row, sums kept) and ``MAX_AGENTS``
agents (the longest unseen is forgotten; its reports are past the ledger's progress).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field

from payper.api.common import ApiModel, ShortString
from payper.api.usage import GpuTime, Micros

MAX_GPUS = 64
MAX_AGENTS = 64
OTHER_GPU = "other"
"""The row GPUs beyond ``MAX_GPUS`` fold into."""


class NodeWindowReconciliation(ApiModel):
    node: Annotated[str, Field(min_length=1, max_length=253)]
    window_start: datetime
    window_end: datetime
    gpus: Annotated[list[GpuTime], Field(max_length=MAX_GPUS)] = Field(default_factory=list)
    """Per GPU, the sums of the reports applied here."""
    attributed_in_records_us: Micros = 0
    """Of the attributed time, what the ledger applied to BillingRecords (the rest: pods
    not billed by Payper, usage refused for another node, record changes dead-lettered)."""
    unreconciled_in_records_us: Micros = 0
    """Usage applied to BillingRecords from reports that carried no per-GPU times (agents
    from before the reconciliation): in the records, in no row above."""
    reports: Annotated[int, Field(ge=0)] = 0
    last_applied_sequence: Annotated[
        dict[ShortString, Annotated[int, Field(ge=0)]], Field(max_length=MAX_AGENTS)
    ] = Field(default_factory=dict)
    """Per agent (node/agent id), the last report applied here: what makes it exactly-once."""
    forgotten_agents: Annotated[int, Field(ge=0)] = 0
    """Agents dropped from ``lastAppliedSequence`` to keep it within ``MAX_AGENTS``."""
    last_update_time: datetime | None = None
