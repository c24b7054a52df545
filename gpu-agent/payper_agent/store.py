"""The agent's disk: its identity, the meter's checkpoint, and reports not yet acknowledged.

Every write is atomic (temp file, rename), so a crash leaves either the old or the new
file, never half of one; reports are also fsync'ed (file and directory) before anyone
relies on them. The checkpoint is rewritten after every poll (fsync'ed when a report was
cut with it); each report file also carries the checkpoint taken right after it was
cut. On start the newer of the two wins, so a crash between writing a report and the
next checkpoint can neither count that report's usage twice nor lose it.

One agent at a time: ``claim_state_dir`` takes an exclusive lock on the directory's
``lock`` file, held for the process's life (the kernel drops it when the process dies,
however it dies). Two agents on one directory would each send the same reports and
checkpoints under one agent id; it happens when the DaemonSet moves (a new namespace, a
new name) and the new pod starts while the old one is still terminating.

A corrupt or unreadable state file is set aside (renamed ``*.corrupt-<time>``), logged,
and a new agent id starts: the operator's exactly-once bookkeeping is per agent id, so
a fresh id can never collide with reports it has already applied.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


def _open_lock(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    return os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)


async def claim_state_dir(directory: Path, retry_s: float = 0.5) -> int:
    """Wait until this process alone holds ``directory``; returns the open lock file
    (kept open for the process's life)."""
    fd = _open_lock(directory)
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                logger.warning("another agent holds %s; waiting for it to exit", directory)
                waited = True
            await asyncio.sleep(retry_s)
            continue
        if waited:
            logger.info("%s is ours now", directory)
        return fd


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` atomically; ``durable`` also survives a power loss (fsync).

    Without fsync the rename still protects against a killed process (the page cache
    outlives it), which is what the per-poll checkpoint needs; reports are always durable.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


@dataclass
class Checkpoint:
    agent_id: str
    next_sequence: int
    meter: dict[str, Any]
    last_report_end_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "agentId": self.agent_id,
            "nextSequence": self.next_sequence,
            "lastReportEndMs": self.last_report_end_ms,
            "meter": self.meter,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown state version {data.get('version')!r}")
        agent_id = data["agentId"]
        if not isinstance(agent_id, str) or not agent_id:
            raise ValueError("agentId missing")
        next_sequence = int(data["nextSequence"])
        if next_sequence < 1:
            raise ValueError("nextSequence must be >= 1")
        meter = data["meter"]
        if not isinstance(meter, dict) or "polls" not in meter:
            raise ValueError("meter checkpoint missing")
        end = data.get("lastReportEndMs")
        return cls(agent_id, next_sequence, meter, None if end is None else int(end))


@dataclass(frozen=True)
class PendingReport:
    path: Path
    agent_id: str
    sequence: int


class Store:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.reports = directory / "reports"
        self.rejected = directory / "rejected"
        self.state_path = directory / "state.json"
        for path in (self.directory, self.reports, self.rejected):
            path.mkdir(parents=True, exist_ok=True)

    # -- checkpoint ------------------------------------------------------------------
    def load(self) -> tuple[Checkpoint, str]:
        """The checkpoint to continue from, and a note on how it was found."""
        note = "resumed"
        checkpoint: Checkpoint | None = None
        if not self.state_path.exists():
            note = "no state file: starting a new agent id"
        else:
            try:
                checkpoint = Checkpoint.from_json(json.loads(self.state_path.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError) as error:
                aside = self.state_path.with_name(f"state.json.corrupt-{int(time.time())}")
                os.replace(self.state_path, aside)
                note = (
                    f"state file unreadable ({error}); set aside as {aside.name}, "
                    "starting a new agent id"
                )
                logger.error(note)
        if checkpoint is not None:
            newer = self._newer_from_report(checkpoint)
            if newer is not None:
                checkpoint, note = newer, "resumed from the last report (newer than the checkpoint)"
            return checkpoint, note
        fresh = Checkpoint(agent_id=str(uuid.uuid4()), next_sequence=1, meter={})
        self.save(fresh)
        return fresh, note

    def _newer_from_report(self, checkpoint: Checkpoint) -> Checkpoint | None:
        own = [p for p in self.pending() if p.agent_id == checkpoint.agent_id]
        if not own or own[-1].sequence < checkpoint.next_sequence:
            return None
        try:
            data = json.loads(own[-1].path.read_bytes())
            return Checkpoint.from_json(data["stateAfter"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.error("report %s is unreadable: %s", own[-1].path.name, error)
            return None

    def save(self, checkpoint: Checkpoint, durable: bool = True) -> None:
        data = json.dumps(checkpoint.to_json(), separators=(",", ":"))
        atomic_write(self.state_path, data.encode(), durable)

    # -- reports ---------------------------------------------------------------------
    def write_report(self, report: dict[str, Any], state_after: Checkpoint) -> Path:
        name = f"{report['agentId']}-{report['sequence']:012d}.json"
        path = self.reports / name
        atomic_write(
            path, json.dumps({"report": report, "stateAfter": state_after.to_json()}).encode()
        )
        return path

    def pending(self) -> list[PendingReport]:
        """Unacknowledged reports, in sending order: older agent ids first, then sequence."""
        groups: dict[str, list[PendingReport]] = {}
        first_seen: dict[str, int] = {}
        for path in self.reports.glob("*.json"):
            agent_id, _, sequence = path.stem.rpartition("-")
            if not agent_id or not sequence.isdigit():
                continue
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue  # acknowledged meanwhile
            groups.setdefault(agent_id, []).append(PendingReport(path, agent_id, int(sequence)))
            first_seen[agent_id] = min(first_seen.get(agent_id, mtime), mtime)
        ordered: list[PendingReport] = []
        for agent_id in sorted(groups, key=lambda a: (first_seen[a], a)):
            ordered += sorted(groups[agent_id], key=lambda p: p.sequence)
        return ordered

    def read(self, pending: PendingReport) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(pending.path.read_bytes())["report"]
        return data

    def ack(self, pending_reports: list[PendingReport], agent_id: str, through: int) -> int:
        """Delete the agent's reports up to ``through``; how many there were."""
        removed = 0
        for pending in pending_reports:
            if pending.agent_id == agent_id and pending.sequence <= through:
                pending.path.unlink(missing_ok=True)
                removed += 1
        return removed

    def reject(self, pending: PendingReport, suffix: str = "") -> None:
        os.replace(pending.path, self.rejected / (pending.path.name + suffix))

    def replace_with_gap_marker(
        self, pending: PendingReport, node: str, lost_us: int, reason: str
    ) -> None:
        """Set a report aside (kept for audit) and leave, under its sequence, a marker
        that says how much usage was lost and why: the operator's ledger then moves past
        the sequence and records the loss, instead of waiting forever for the report."""
        try:
            original = self.read(pending)
        except (OSError, ValueError, KeyError):
            original = {}
        marker = {
            "agentId": pending.agent_id,
            "sequence": pending.sequence,
            "node": original.get("node", node),
            "intervalStartMs": original.get("intervalStartMs", 0),
            "intervalEndMs": original.get("intervalEndMs", 0),
            "series": [],
            "lostUs": lost_us,
            "lostReason": reason,
            "simulated": bool(original.get("simulated", False)),
        }
        self.reject(pending)
        atomic_write(pending.path, json.dumps({"report": marker}).encode())

    @staticmethod
    def is_gap_marker(report: dict[str, Any]) -> bool:
        return report.get("lostReason") is not None

    def expired(
        self, pending_reports: list[PendingReport], now_ms: int, retention_ms: int
    ) -> list[PendingReport]:
        """Those past retention, or unreadable."""
        old = []
        for pending in pending_reports:
            try:
                report = self.read(pending)
                # A gap marker never expires: it is what tells the operator of a loss.
                if report["intervalEndMs"] < now_ms - retention_ms and not self.is_gap_marker(
                    report
                ):
                    old.append(pending)
            except (OSError, ValueError, KeyError):
                old.append(pending)
        return old
