"""parse_cgroup against /proc/<pid>/cgroup contents seen on real nodes."""

from __future__ import annotations

import pytest

from payper_agent.cgroups import CgroupIdentity, parse_cgroup

UID = "0f7c8e8a-1b2c-4d5e-8f90-a1b2c3d4e5f6"
UID_ = UID.replace("-", "_")
CID = "3d4f1e2c5b6a798812345678901234567890abcdef1234567890abcdef123456"
CID2 = "aa" * 32

V1_CONTAINERD_BURSTABLE = (
    "\n".join(
        f"{n}:{ctrl}:/kubepods/burstable/pod{UID}/{CID}"
        for n, ctrl in [
            (12, "pids"),
            (11, "hugetlb"),
            (10, "net_cls,net_prio"),
            (9, "perf_event"),
            (8, "cpuset"),
            (7, "freezer"),
            (6, "devices"),
            (5, "memory"),
            (4, "blkio"),
            (3, "cpu,cpuacct"),
            (2, "rdma"),
            (1, "name=systemd"),
        ]
    )
    + "\n0::/\n"
)

V1_SYSTEMD = "\n".join(
    f"{n}:{ctrl}:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
    for n, ctrl in [(5, "memory"), (3, "cpu,cpuacct"), (1, "name=systemd")]
)

CASES = [
    (
        "v2-systemd-containerd-burstable",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
        CgroupIdentity(UID, CID, "containerd"),
    ),
    (
        "v2-systemd-containerd-besteffort",
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
        CgroupIdentity(UID, CID, "containerd"),
    ),
    (
        "v2-systemd-containerd-guaranteed",
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
        CgroupIdentity(UID, CID, "containerd"),
    ),
    (
        "v2-systemd-crio-burstable",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope",
        CgroupIdentity(UID, CID, "cri-o"),
    ),
    (
        "v2-systemd-docker-guaranteed",
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope",
        CgroupIdentity(UID, CID, "docker"),
    ),
    (
        "v2-cgroupfs-burstable",
        f"0::/kubepods/burstable/pod{UID}/{CID}",
        CgroupIdentity(UID, CID, None),
    ),
    ("v2-cgroupfs-guaranteed", f"0::/kubepods/pod{UID}/{CID}", CgroupIdentity(UID, CID, None)),
    (
        "v2-cgroupfs-besteffort",
        f"0::/kubepods/besteffort/pod{UID}/{CID2}",
        CgroupIdentity(UID, CID2, None),
    ),
    ("v1-containerd-burstable-12-lines", V1_CONTAINERD_BURSTABLE, CgroupIdentity(UID, CID, None)),
    ("v1-systemd-containerd", V1_SYSTEMD, CgroupIdentity(UID, CID, "containerd")),
    (
        "v1-pod-level-only",
        f"5:memory:/kubepods/burstable/pod{UID}\n1:name=systemd:/\n",
        CgroupIdentity(UID, None, None),
    ),
    (
        "cgroup-namespace-relative",
        f"0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
        CgroupIdentity(UID, CID, "containerd"),
    ),
    (
        "kind-nested-under-a-node-container",
        f"0::/system.slice/docker-{CID2}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
        CgroupIdentity(UID, CID, "containerd"),
    ),
    (
        "k3s-cgroupfs-nested",
        f"0::/kubepods/burstable/pod{UID}/{CID}/nested",
        CgroupIdentity(UID, CID, None),
    ),
    (
        "upper-case-hex",
        f"0::/kubepods/pod{UID.upper()}/{CID.upper()}",
        CgroupIdentity(UID, CID, None),
    ),
    # negative cases
    ("host-init", "0::/init.scope\n", None),
    ("user-session", "0::/user.slice/user-1000.slice/session-2.scope\n", None),
    ("system-service-containerd", "0::/system.slice/containerd.service\n", None),
    ("system-service-kubelet", "0::/system.slice/kubelet.service\n", None),
    ("plain-docker-container", f"0::/system.slice/docker-{CID}.scope\n", None),
    (
        "crio-conmon-monitor",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope",
        None,
    ),
    ("namespace-root-no-info", "0::/\n", None),
    (
        "v1-host-process",
        "12:pids:/system.slice/sshd.service\n1:name=systemd:/system.slice/sshd.service\n",
        None,
    ),
    ("empty", "", None),
    ("garbage", "not a cgroup file\n:::\nx:y\n", None),
    ("malformed-uid", "0::/kubepods/burstable/pod1234/abcdef\n", None),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_cgroup(text: str, expected: CgroupIdentity | None) -> None:
    assert parse_cgroup(text) == expected


def test_a_line_with_a_container_beats_a_pod_only_line() -> None:
    text = f"5:memory:/kubepods/burstable/pod{UID}\n4:cpu:/kubepods/burstable/pod{UID}/{CID}\n"
    assert parse_cgroup(text) == CgroupIdentity(UID, CID, None)
