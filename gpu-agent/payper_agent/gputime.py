"""Per-GPU accounting of wall-clock time: where every microsecond of each GPU went.

The meter bills per series (container x GPU); this keeps, per physical GPU, the other
side of the ledger: the wall-clock time the meter accounted on it (each poll moves the
GPU's period start to the driver's newest sample, and the time between is accounted
exactly once), the part no sample could cover (a gap longer than a few polls, a GPU the
driver cannot meter) and the active time of processes in no pod. A report then says per
GPU: attributed (its series' active time, MIG instances summed on their GPU) +
unattributed + unmetered + idle = wall, so a GPU-second that was not billed is a number,
not a guess. Idle is what remains; should the driver's per-process percentages of one
period sum to more than 100 % (integer rounding), the surplus is reported as excess.

Counters are cumulative with reported marks, like the meter's, so a report carries whole
microseconds and the remainder waits for the next one; the state is in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from payper.api.usage import GpuTime, SeriesUsage


@dataclass
class GpuAccount:
    product: str
    wall_us: int = 0
    unmetered_us: int = 0
    unattributed_x100: int = 0
    reported_wall_us: int = 0
    reported_unmetered_us: int = 0
    reported_unattributed_us: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "product": self.product,
            "wallUs": self.wall_us,
            "unmeteredUs": self.unmetered_us,
            "unattributedX100": self.unattributed_x100,
            "reportedWallUs": self.reported_wall_us,
            "reportedUnmeteredUs": self.reported_unmetered_us,
            "reportedUnattributedUs": self.reported_unattributed_us,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GpuAccount:
        return cls(
            product=str(data["product"]),
            wall_us=int(data["wallUs"]),
            unmetered_us=int(data["unmeteredUs"]),
            unattributed_x100=int(data["unattributedX100"]),
            reported_wall_us=int(data["reportedWallUs"]),
            reported_unmetered_us=int(data["reportedUnmeteredUs"]),
            reported_unattributed_us=int(data["reportedUnattributedUs"]),
        )


@dataclass
class GpuClock:
    """Every GPU's account, and which GPU each MIG instance the meter saw belongs to."""

    accounts: dict[str, GpuAccount] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    """MIG instance UUID -> its GPU's UUID (series carry the instance)."""

    def _account(self, gpu: str, product: str) -> GpuAccount:
        account = self.accounts.get(gpu)
        if account is None:
            account = self.accounts[gpu] = GpuAccount(product)
        return account

    def unmetered(self, gpu: str, product: str, last_us: int, now_us: int) -> None:
        """The driver could not meter this GPU since ``last_us``: all of it unmetered."""
        span = max(0, now_us - last_us)
        account = self._account(gpu, product)
        account.wall_us += span
        account.unmetered_us += span

    def metered(
        self, gpu: str, product: str, last_us: int, next_us: int, max_period_us: int
    ) -> None:
        """A poll accounted (last, next] on this GPU; beyond one sample's longest period,
        nothing was measured (the meter bills at most that much of a gap)."""
        span = max(0, next_us - last_us)
        account = self._account(gpu, product)
        account.wall_us += span
        account.unmetered_us += max(0, span - max_period_us)

    def unattributed(self, gpu: str, product: str, amount_x100: int) -> None:
        self._account(gpu, product).unattributed_x100 += amount_x100

    def device(self, device: str, gpu: str) -> None:
        self.devices[device] = gpu

    def rows(self, series: Iterable[SeriesUsage]) -> list[GpuTime]:
        """This report's per-GPU times; ``series`` are the report's. Nothing is marked."""
        attributed: dict[str, int] = {}
        products: dict[str, str] = {}
        for usage in series:
            gpu = self.devices.get(usage.gpu, usage.gpu)
            attributed[gpu] = attributed.get(gpu, 0) + usage.active_us
            products.setdefault(gpu, usage.gpu_product)
        rows = []
        for gpu in sorted({*self.accounts, *attributed}):
            account = self.accounts.get(gpu) or GpuAccount(products[gpu])
            wall = account.wall_us - account.reported_wall_us
            unmetered = account.unmetered_us - account.reported_unmetered_us
            unattributed = account.unattributed_x100 // 100 - account.reported_unattributed_us
            used = attributed.get(gpu, 0)
            if not (wall or unmetered or unattributed or used):
                continue
            rest = wall - used - unattributed - unmetered
            rows.append(
                GpuTime(
                    gpu=gpu,
                    gpu_product=account.product,
                    wall_us=wall,
                    attributed_us=used,
                    unattributed_us=unattributed,
                    unmetered_us=unmetered,
                    idle_us=max(0, rest),
                    excess_us=max(0, -rest),
                )
            )
        return rows

    def mark_reported(self, rows: Iterable[GpuTime]) -> None:
        for row in rows:
            account = self.accounts.get(row.gpu)
            if account is None:
                continue  # attributed only (a series restored from before this accounting)
            account.reported_wall_us += row.wall_us
            account.reported_unmetered_us += row.unmetered_us
            account.reported_unattributed_us += row.unattributed_us

    def to_json(self) -> dict[str, Any]:
        return {
            "accounts": {gpu: a.to_json() for gpu, a in self.accounts.items()},
            "devices": dict(self.devices),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> GpuClock:
        """A checkpoint from before this accounting has none: it starts from the next poll."""
        if not data:
            return cls()
        return cls(
            accounts={str(g): GpuAccount.from_json(a) for g, a in data["accounts"].items()},
            devices={str(d): str(g) for d, g in data.get("devices", {}).items()},
        )
