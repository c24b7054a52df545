"""The simulated backend's live mode: published model servers matched to host processes
(by start time and innermost PID, as containers in their own PID namespaces need), and
their cgroups made up (kwok nodes) or read from /proc (a real node)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from payper_agent.backends import Gpu
from payper_agent.simulated import LiveBackend, host_pid, start_ticks

NODE = "node-a"
GPU = Gpu(0, "GPU-node-a-0", "H100")
REAL_CGROUP = "12:memory:/kubepods/podabc/0123\n0::/\n"


def fake_process(proc: Path, pid: int, ticks: int, nspid: list[int], cgroup: str = "") -> None:
    directory = proc / str(pid)
    directory.mkdir(parents=True)
    # Field 22 is the start time; the command name has a space and a parenthesis.
    fields = ["S"] + ["0"] * 18 + [str(ticks)] + ["0"] * 30
    (directory / "stat").write_text(f"{pid} (python x) y) {' '.join(fields)}\n")
    (directory / "status").write_text("Name:\tpython\nNSpid:\t" + "\t".join(map(str, nspid)) + "\n")
    (directory / "cgroup").write_text(cgroup)


def publish(directory: Path, stem: str, pid: int, ticks: int | None, **extra: object) -> None:
    identity = {
        "pid": pid,
        "gpu": GPU.uuid,
        "node": NODE,
        "pod": {"namespace": "t", "name": "p", "uid": "uid-1", "container": "server"},
        "startedMs": int(time.time() * 1000),
        **({"startTicks": ticks} if ticks is not None else {}),
        **extra,
    }
    (directory / f"{stem}.json").write_text(json.dumps(identity))
    # Busy a moment ago: a process that is not running stays known for a minute after.
    now_ms = int(time.time() * 1000)
    (directory / f"{stem}.busy").write_text(f"{now_ms - 2000} {now_ms - 1000}\n")


def test_start_ticks_reads_field_22_of_our_own_stat() -> None:
    ticks = start_ticks()
    assert isinstance(ticks, int) and ticks > 0
    assert start_ticks(999_999_999) is None


def test_a_container_pid_is_found_by_start_time_and_innermost_pid(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 1, 5, [1])  # the host's init: PID 1, started earlier
    fake_process(proc, 4242, 777, [4242, 1])  # a container's PID 1
    fake_process(proc, 4300, 777, [4300, 7])  # same tick, another PID inside
    fake_process(proc, 4400, 900, [4400, 1])  # another container's PID 1
    assert host_pid(1, 777, str(proc)) == 4242
    assert host_pid(1, 900, str(proc)) == 4400
    assert host_pid(1, 5, str(proc)) == 1  # our own namespace
    assert host_pid(1, 123, str(proc)) is None
    assert host_pid(33, None, str(proc)) == 33  # an older publisher: a host PID


def test_two_containers_both_pid_1_are_two_processes_with_real_cgroups(tmp_path: Path) -> None:
    proc, sim = tmp_path / "proc", tmp_path / "sim"
    sim.mkdir()
    fake_process(proc, 4242, 777, [4242, 1], REAL_CGROUP)
    fake_process(proc, 4400, 900, [4400, 1], "other\n")
    publish(sim, "a", 1, 777)
    publish(sim, "b", 1, 900)
    backend = LiveBackend(sim, NODE, [GPU], cgroups="proc", proc=str(proc))
    backend.refresh()
    assert set(backend.processes) == {4242, 4400}
    assert backend.cgroup(4242) == REAL_CGROUP
    assert backend.cgroup(4400) == "other\n"
    assert backend.cgroup(1) is None  # not a published process
    assert backend.processes[4242].busy.overlap(0, 2**62) == 1_000_000


def test_published_cgroups_are_made_from_the_pod(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    sim.mkdir()
    publish(sim, "1234", 1234, None)
    backend = LiveBackend(sim, NODE, [GPU])
    backend.refresh()
    cgroup = backend.cgroup(1234)
    assert cgroup is not None and "poduid_1" in cgroup


def test_unmatched_and_foreign_processes_are_ignored_then_forgotten(tmp_path: Path) -> None:
    proc, sim = tmp_path / "proc", tmp_path / "sim"
    sim.mkdir()
    proc.mkdir()
    publish(sim, "stale", 1, 42, startedMs=0)  # never matched, published long ago
    publish(sim, "fresh", 1, 43)  # not matched yet: tried again next time
    publish(sim, "elsewhere", 1, 44, node="node-b")
    backend = LiveBackend(sim, NODE, [GPU], cgroups="proc", proc=str(proc))
    backend.refresh()
    assert backend.processes == {}
    fake_process(proc, 5000, 43, [5000, 1])
    backend.refresh()
    assert set(backend.processes) == {5000}
    for stem in ("stale", "elsewhere"):
        (sim / f"{stem}.json").unlink()
    backend.refresh()
    assert backend._ignored == set()


def test_half_written_identity_is_read_again(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "x.json").write_text('{"pid": 12')
    backend = LiveBackend(sim, NODE, [GPU])
    backend.refresh()
    assert backend.processes == {}
    publish(sim, "x", 12, None)
    backend.refresh()
    assert set(backend.processes) == {12}


def test_cgroups_mode_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cgroups"):
        LiveBackend(tmp_path, NODE, [GPU], cgroups="systemd")
