"""Which pod and container a host process belongs to, from ``/proc/<pid>/cgroup``.

NVML names the processes on a GPU by host PID; to bill a pod the agent has to turn each
PID into a pod UID and container ID, and the only place the kernel keeps that is the
process's cgroup path, which the kubelet and the container runtime name after both.

The path's shape depends on:

- cgroup version: v1 has one ``<id>:<controllers>:<path>`` line per hierarchy, v2 a
  single ``0::<path>`` line (hybrid hosts have both);
- cgroup driver: cgroupfs writes ``/kubepods/<qos>/pod<uid>/<id>``, systemd writes
  ``/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice/
  <prefix>-<id>.scope``; guaranteed pods have no QoS level (``/kubepods/pod<uid>``,
  ``kubepods-pod<uid>.slice``);
- runtime: the systemd scope's prefix is ``cri-containerd`` (containerd), ``crio``
  (CRI-O) or ``docker`` (cri-dockerd); under cgroupfs containerd and Docker use the bare
  ID (runtime unknown) and CRI-O ``crio-<id>``;
- where the tree is mounted: kind and k3s-in-docker nest it under the node container
  (``/system.slice/docker-<id>.scope/kubelet.slice/kubelet-kubepods.slice/...``), and a
  containerd whose ``SystemdCgroup`` setting disagrees with the host's cgroup manager
  leaves runc's literal ``<slice>:cri-containerd:<id>`` as one directory name;
- cgroup namespaces: a reader inside one (the agent's own pod) sees paths relative to
  its root, beginning with ``/..``; ``0::/`` alone says nothing.

Choices:

- Anything without a well-formed pod UID (8-4-4-4-12 hex, dashes or underscores) is not
  a pod's process: host processes, system services, plain Docker containers. Static
  pods, whose UID is a bare 32-hex config hash, are left out too: their mirror pod's
  API UID differs, so the agent could not match them anyway. A cgroupfs ``pod<uid>``
  directory counts only under ``kubepods``, a QoS level or ``..`` (a namespace's view).
- CRI-O's monitor, ``crio-conmon-<id>.scope``, lives in the pod's slice and watches
  container ``<id>``; it is reported as that container (runtime ``cri-o``). It never
  opens a GPU, so NVML does not list it; if it ever did, its container is the right
  place for the time.
- Only the component right after the pod names the container; deeper cgroups (crun's
  ``crio-<id>.scope/container``, a workload's own sub-cgroups) belong to it.
- When the pod component appears more than once (a cluster nested in a pod), the
  innermost wins: that is the kubelet the process was started by.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEX = "[0-9a-fA-F]"
# One separator throughout: kubelet's dashes, or the systemd driver's underscores.
_UID = (
    rf"(?P<uid>{_HEX}{{8}}(?P<sep>[-_]){_HEX}{{4}}(?P=sep){_HEX}{{4}}"
    rf"(?P=sep){_HEX}{{4}}(?P=sep){_HEX}{{12}})"
)
# cgroupfs driver: a directory named pod<uid> under kubepods or its QoS level.
_CGROUPFS_POD = re.compile(rf"pod{_UID}")
_CGROUPFS_POD_PARENTS = frozenset({"kubepods", "burstable", "besteffort", ".."})
# systemd driver: the slice name repeats its ancestry, so it always says "kubepods"
# (kind prefixes "kubelet-"). runc's "<slice>:<prefix>:<id>" may follow in the same name.
_SYSTEMD_POD = re.compile(
    rf"(?:\w+-)*kubepods(?:-besteffort|-burstable)?-pod{_UID}\.slice"
    r"(?::(?P<prefix>[\w-]+):(?P<id>\w+))?"
)
_CONTAINER = re.compile(
    rf"(?P<prefix>cri-containerd|crio-conmon|crio|docker)-(?P<scoped>{_HEX}{{64}})(?:\.scope)?"
    rf"|(?P<bare>{_HEX}{{64}})"
)
_LINE = re.compile(r"(?P<hierarchy>\d+):(?P<controllers>[^:]*):(?P<path>/.*)")
_RUNTIMES = {
    "cri-containerd": "containerd",
    "crio": "cri-o",
    "crio-conmon": "cri-o",
    "docker": "docker",
}
# v2 marks a removed cgroup this way (a zombie whose container is gone).
_DELETED = " (deleted)"


@dataclass(frozen=True)
class CgroupIdentity:
    pod_uid: str
    """Canonical UUID form: lower case, dashes."""
    container_id: str | None
    """The runtime's 64-hex ID; None when the path stops at the pod's cgroup."""
    runtime: str | None
    """``containerd``, ``cri-o`` or ``docker``; None where the path does not say (cgroupfs)."""


def _container(name: str) -> tuple[str, str | None] | None:
    """(id, runtime) named by one path component, or None."""
    match = _CONTAINER.fullmatch(name)
    if match is None:
        return None
    if match["bare"] is not None:
        return match["bare"].lower(), None
    return match["scoped"].lower(), _RUNTIMES[match["prefix"]]


def _pod_at(parts: list[str], i: int) -> tuple[str, str] | None:
    """(pod UID, the component that may name its container) if ``parts[i]`` is a pod."""
    after = parts[i + 1] if i + 1 < len(parts) else ""
    if (pod := _SYSTEMD_POD.fullmatch(parts[i])) is not None:
        if pod["id"] is not None:  # runc's "<slice>:<prefix>:<id>" as one name
            after = f"{pod['prefix']}-{pod['id']}.scope"
    else:
        parent = parts[i - 1] if i > 0 else ""
        pod = _CGROUPFS_POD.fullmatch(parts[i]) if parent in _CGROUPFS_POD_PARENTS else None
        if pod is None:
            return None
    return pod["uid"].lower().replace("_", "-"), after


def _from_path(path: str) -> CgroupIdentity | None:
    parts = path.removesuffix(_DELETED).split("/")
    found: CgroupIdentity | None = None
    for i in range(len(parts)):
        if (pod := _pod_at(parts, i)) is None:
            continue
        uid, after = pod
        id_runtime = _container(after)
        # A later match replaces an earlier one: the innermost pod wins.
        found = CgroupIdentity(uid, *id_runtime) if id_runtime else CgroupIdentity(uid, None, None)
    return found


def _rank(identity: CgroupIdentity) -> tuple[bool, bool]:
    return identity.container_id is not None, identity.runtime is not None


def parse_cgroup(text: str) -> CgroupIdentity | None:
    """The pod (and container) named by a ``/proc/<pid>/cgroup`` file, or None.

    Of several lines (cgroup v1), the one that says the most wins: a container ID over a
    bare pod, a known runtime over an unknown one, then the first. Malformed lines are
    skipped.
    """
    best: CgroupIdentity | None = None
    for line in text.splitlines():
        match = _LINE.fullmatch(line.strip())
        if match is None:
            continue
        found = _from_path(match["path"])
        if found is not None and (best is None or _rank(found) > _rank(best)):
            best = found
    return best
