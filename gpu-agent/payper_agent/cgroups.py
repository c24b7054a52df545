"""Which pod and container a host process belongs to, from ``/proc/<pid>/cgroup``.

NVML names processes by host PID; the kubelet puts every container in a cgroup whose
path carries the pod UID and the container ID. The formats vary by cgroup version (v1:
one line per hierarchy; v2: a single ``0::`` line), cgroup driver (cgroupfs:
``/kubepods/burstable/pod<uid>/<id>``; systemd:
``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope``),
runtime (containerd ``cri-containerd-``, CRI-O ``crio-``, Docker ``docker-``), QoS class
(guaranteed pods sit directly under ``kubepods``) and cgroup namespaces (paths relative
to the namespace root, starting ``/..``). ``parse_cgroup`` reads them all and returns
None for anything that is not a pod's process: host processes, system services, plain
Docker containers.

CRI-O's ``crio-conmon-<id>.scope`` is the container's monitor process, not the
container: it never runs kernels, so it is not attributed (None).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_POD = re.compile(rf"pod({_UID})(?:\.slice)?(?:/|$)", re.IGNORECASE)
_CONTAINER = re.compile(
    r"(?:^|/)(?:(cri-containerd|crio|docker)-)?([0-9a-f]{64})(?:\.scope)?(?:/|$)", re.IGNORECASE
)
_CONMON = re.compile(r"crio-conmon-[0-9a-f]{64}\.scope", re.IGNORECASE)
_RUNTIMES = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker"}


@dataclass(frozen=True)
class CgroupIdentity:
    pod_uid: str
    """Canonical UUID form: lower case, dashes."""
    container_id: str | None
    runtime: str | None


def _from_path(path: str) -> CgroupIdentity | None:
    if "kubepods" not in path.lower() or _CONMON.search(path):
        return None
    pod = _POD.search(path)
    if pod is None:
        return None
    uid = pod.group(1).lower().replace("_", "-")
    after = path[pod.end() :]
    container = _CONTAINER.search(after)
    if container is None:
        return CgroupIdentity(uid, None, None)
    prefix = container.group(1)
    runtime = _RUNTIMES[prefix.lower()] if prefix else None
    return CgroupIdentity(uid, container.group(2).lower(), runtime)


def parse_cgroup(text: str) -> CgroupIdentity | None:
    """The pod (and container) named by a ``/proc/<pid>/cgroup`` file, or None."""
    best: CgroupIdentity | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        found = _from_path(parts[2])
        if found is None:
            continue
        if found.container_id is not None:
            return found
        best = best or found
    return best
