"""parse_cgroup against the /proc/<pid>/cgroup contents found on real nodes.

Each row is a whole file as the kernel prints it (v1 files have one line per hierarchy,
listed from the highest ID down) and the exact identity it must yield.
"""

from __future__ import annotations

import dataclasses

import pytest

from payper_agent.cgroups import CgroupIdentity, parse_cgroup

UID = "a3966f54-8a91-47a6-836e-3195419dd697"
UID_ = UID.replace("-", "_")  # as the systemd driver writes it
UID2 = "09acc03b-7790-468c-9778-83636c313b71"
CID = "67cbc2bb60483bbba3f41a319f9cbb3f074275de1a553ae0fde652f812dc7042"
CID2 = "23b1152e6398952665c860577bcddfc73b55f4562ab62d8629ad5797b94420d9"
NODE = "d1c2163d8df87d417008fbe357bf29c53664b8e212b895f7408fe5de5d4642cc"  # kind/k3d node container
STATIC = "d2e1ea612ec5e48c1659a2a6cb0ef210"  # a static pod's UID: the manifest hash

SYSTEMD_BURSTABLE = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
SYSTEMD_BESTEFFORT = (
    f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
)

# Ubuntu 20.04, kubelet and containerd on the cgroupfs driver, burstable pod.
V1_CGROUPFS_CONTAINERD_BURSTABLE = f"""\
12:hugetlb:/kubepods/burstable/pod{UID}/{CID}
11:memory:/kubepods/burstable/pod{UID}/{CID}
10:pids:/kubepods/burstable/pod{UID}/{CID}
9:cpuset:/kubepods/burstable/pod{UID}/{CID}
8:freezer:/kubepods/burstable/pod{UID}/{CID}
7:perf_event:/kubepods/burstable/pod{UID}/{CID}
6:rdma:/
5:devices:/kubepods/burstable/pod{UID}/{CID}
4:blkio:/kubepods/burstable/pod{UID}/{CID}
3:net_cls,net_prio:/kubepods/burstable/pod{UID}/{CID}
2:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}
1:name=systemd:/kubepods/burstable/pod{UID}/{CID}
0::/
"""

# RHEL 8, CRI-O on the systemd driver, burstable pod (13 hierarchies, misc at the root).
V1_SYSTEMD_CRIO_BURSTABLE = f"""\
13:misc:/
12:freezer:{SYSTEMD_BURSTABLE}/crio-{CID}.scope
11:cpuset:{SYSTEMD_BURSTABLE}/crio-{CID}.scope
10:hugetlb:{SYSTEMD_BURSTABLE}/crio-{CID}.scope
9:rdma:/
8:net_cls,net_prio:{SYSTEMD_BURSTABLE}/crio-{CID}.scope
7:blkio:{SYSTEMD_BURSTABLE}/crio-{CID}.scope
6:pids:{SYSTEMD_BURSTABLE}/crio-{CID}.scope
5:perf_event:{SYSTEMD_BURSTABLE}/crio-{CID}.scope
4:memory:{SYSTEMD_BURSTABLE}/crio-{CID}.scope
3:devices:{SYSTEMD_BURSTABLE}/crio-{CID}.scope
2:cpu,cpuacct:{SYSTEMD_BURSTABLE}/crio-{CID}.scope
1:name=systemd:{SYSTEMD_BURSTABLE}/crio-{CID}.scope
"""

# CentOS 7, dockershim on the cgroupfs driver, guaranteed pod (no QoS level).
V1_DOCKERSHIM_GUARANTEED = f"""\
11:cpuset:/kubepods/pod{UID}/{CID}
10:memory:/kubepods/pod{UID}/{CID}
9:devices:/kubepods/pod{UID}/{CID}
8:hugetlb:/kubepods/pod{UID}/{CID}
7:perf_event:/kubepods/pod{UID}/{CID}
6:cpu,cpuacct:/kubepods/pod{UID}/{CID}
5:freezer:/kubepods/pod{UID}/{CID}
4:pids:/kubepods/pod{UID}/{CID}
3:blkio:/kubepods/pod{UID}/{CID}
2:net_prio,net_cls:/kubepods/pod{UID}/{CID}
1:name=systemd:/kubepods/pod{UID}/{CID}
"""

# Docker on the systemd driver, besteffort pod.
V1_SYSTEMD_DOCKER_BESTEFFORT = f"""\
11:freezer:{SYSTEMD_BESTEFFORT}/docker-{CID}.scope
10:pids:{SYSTEMD_BESTEFFORT}/docker-{CID}.scope
9:memory:{SYSTEMD_BESTEFFORT}/docker-{CID}.scope
8:cpu,cpuacct:{SYSTEMD_BESTEFFORT}/docker-{CID}.scope
1:name=systemd:{SYSTEMD_BESTEFFORT}/docker-{CID}.scope
"""

# containerd with SystemdCgroup=true on a host where systemd does not manage the tree:
# runc's "<slice>:<prefix>:<id>" ends up as one directory name, at the root of some
# hierarchies and under containerd.service in others.
V1_RUNC_SLICE_NAME = f"""\
11:perf_event:/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}
10:blkio:/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}
9:cpuacct,cpu:/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}
8:cpuset:/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}
1:name=systemd:/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}
"""

# A plain `docker run` container on a v1 host: no kubelet, no pod.
V1_PLAIN_DOCKER = f"""\
12:hugetlb:/docker/{CID}
11:memory:/docker/{CID}
10:pids:/docker/{CID}
9:cpuset:/docker/{CID}
8:freezer:/docker/{CID}
7:perf_event:/docker/{CID}
6:rdma:/
5:devices:/docker/{CID}
4:blkio:/docker/{CID}
3:net_cls,net_prio:/docker/{CID}
2:cpu,cpuacct:/docker/{CID}
1:name=systemd:/docker/{CID}
0::/system.slice/containerd.service
"""

# sshd on a v1 host.
V1_HOST_SERVICE = """\
11:cpuset:/
10:memory:/system.slice/ssh.service
9:devices:/system.slice/ssh.service
4:pids:/system.slice/ssh.service
2:cpu,cpuacct:/system.slice/ssh.service
1:name=systemd:/system.slice/ssh.service
0::/system.slice/ssh.service
"""

CASES = [
    # cgroup v2, systemd driver
    pytest.param(
        f"0::{SYSTEMD_BURSTABLE}/cri-containerd-{CID}.scope\n",
        CgroupIdentity(UID, CID, "containerd"),
        id="v2-systemd-containerd-burstable",
    ),
    pytest.param(
        f"0::{SYSTEMD_BESTEFFORT}/cri-containerd-{CID}.scope\n",
        CgroupIdentity(UID, CID, "containerd"),
        id="v2-systemd-containerd-besteffort",
    ),
    pytest.param(
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
        CgroupIdentity(UID, CID, "containerd"),
        id="v2-systemd-containerd-guaranteed",
    ),
    pytest.param(
        f"0::{SYSTEMD_BURSTABLE}/crio-{CID}.scope\n",
        CgroupIdentity(UID, CID, "cri-o"),
        id="v2-systemd-crio-burstable",
    ),
    pytest.param(
        f"0::{SYSTEMD_BURSTABLE}/crio-{CID}.scope/container\n",
        CgroupIdentity(UID, CID, "cri-o"),
        id="v2-systemd-crio-crun-container-subgroup",
    ),
    pytest.param(
        f"0::{SYSTEMD_BURSTABLE}/crio-conmon-{CID}.scope\n",
        CgroupIdentity(UID, CID, "cri-o"),
        id="v2-systemd-crio-conmon-counts-as-its-container",
    ),
    pytest.param(
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope\n",
        CgroupIdentity(UID, CID, "docker"),
        id="v2-systemd-cri-dockerd-guaranteed",
    ),
    pytest.param(
        f"0::{SYSTEMD_BURSTABLE}\n",
        CgroupIdentity(UID, None, None),
        id="v2-systemd-pod-slice-only",
    ),
    pytest.param(
        f"0::{SYSTEMD_BURSTABLE}/cri-containerd-{CID}.scope (deleted)\n",
        CgroupIdentity(UID, CID, "containerd"),
        id="v2-removed-cgroup-still-names-its-pod",
    ),
    # cgroup v2, cgroupfs driver
    pytest.param(
        f"0::/kubepods/burstable/pod{UID}/{CID}\n",
        CgroupIdentity(UID, CID, None),
        id="v2-cgroupfs-containerd-burstable",
    ),
    pytest.param(
        f"0::/kubepods/besteffort/pod{UID}/{CID}\n",
        CgroupIdentity(UID, CID, None),
        id="v2-cgroupfs-containerd-besteffort",
    ),
    pytest.param(
        f"0::/kubepods/pod{UID}/{CID}\n",
        CgroupIdentity(UID, CID, None),
        id="v2-cgroupfs-containerd-guaranteed",
    ),
    pytest.param(
        f"0::/kubepods/burstable/pod{UID}/crio-{CID}\n",
        CgroupIdentity(UID, CID, "cri-o"),
        id="v2-cgroupfs-crio-burstable",
    ),
    pytest.param(
        f"0::/kubepods/burstable/pod{UID}/{CID[:-1]}\n",
        CgroupIdentity(UID, None, None),
        id="v2-cgroupfs-63-hex-is-no-container-id",
    ),
    # cgroup v1
    pytest.param(
        V1_CGROUPFS_CONTAINERD_BURSTABLE,
        CgroupIdentity(UID, CID, None),
        id="v1-cgroupfs-containerd-burstable-12-hierarchies",
    ),
    pytest.param(
        V1_SYSTEMD_CRIO_BURSTABLE,
        CgroupIdentity(UID, CID, "cri-o"),
        id="v1-systemd-crio-burstable-13-hierarchies",
    ),
    pytest.param(
        V1_DOCKERSHIM_GUARANTEED,
        CgroupIdentity(UID, CID, None),
        id="v1-cgroupfs-dockershim-guaranteed",
    ),
    pytest.param(
        V1_SYSTEMD_DOCKER_BESTEFFORT,
        CgroupIdentity(UID, CID, "docker"),
        id="v1-systemd-docker-besteffort",
    ),
    pytest.param(
        V1_RUNC_SLICE_NAME,
        CgroupIdentity(UID, CID, "containerd"),
        id="v1-runc-slice-prefix-id-as-one-name",
    ),
    pytest.param(
        f"5:memory:/kubepods/burstable/pod{UID}\n1:name=systemd:/kubepods/burstable/pod{UID}\n",
        CgroupIdentity(UID, None, None),
        id="v1-pod-level-only",
    ),
    pytest.param(
        f"5:memory:/kubepods/burstable/pod{UID}\n4:pids:/kubepods/burstable/pod{UID}/{CID}\n",
        CgroupIdentity(UID, CID, None),
        id="v1-container-line-beats-earlier-pod-line",
    ),
    pytest.param(
        f"4:memory:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:{SYSTEMD_BURSTABLE}/cri-containerd-{CID}.scope\n",
        CgroupIdentity(UID, CID, "containerd"),
        id="v1-line-naming-the-runtime-wins",
    ),
    pytest.param(
        f"4:memory:/\n3:cpu,cpuacct:/\n1:name=systemd:/kubepods/besteffort/pod{UID}/{CID}\n",
        CgroupIdentity(UID, CID, None),
        id="v1-only-name-systemd-carries-the-pod",
    ),
    pytest.param(
        f"4:memory:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/system.slice/containerd.service\n",
        CgroupIdentity(UID, CID, None),
        id="v1-name-systemd-without-pod-ignored",
    ),
    # inside a cgroup namespace (the agent's own pod): paths relative to its cgroup
    pytest.param(
        f"0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
        CgroupIdentity(UID, CID, "containerd"),
        id="cgroupns-systemd-same-qos",
    ),
    pytest.param(
        f"0::/../../../kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
        CgroupIdentity(UID, CID, "containerd"),
        id="cgroupns-systemd-other-qos",
    ),
    pytest.param(
        f"0::/../../pod{UID}/{CID}\n",
        CgroupIdentity(UID, CID, None),
        id="cgroupns-cgroupfs-same-qos",
    ),
    pytest.param(
        f"0::/../../../burstable/pod{UID}/{CID}\n",
        CgroupIdentity(UID, CID, None),
        id="cgroupns-cgroupfs-other-qos",
    ),
    pytest.param("0::/\n", None, id="cgroupns-root-says-nothing"),
    pytest.param("0::/../..\n", None, id="cgroupns-outside-says-nothing"),
    pytest.param(f"0::/../{CID2}\n", None, id="cgroupns-sibling-container-no-pod"),
    # the kubepods tree nested under something else
    pytest.param(
        f"0::/system.slice/docker-{NODE}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
        CgroupIdentity(UID, CID, "containerd"),
        id="kind-node-container-kubelet-slice",
    ),
    pytest.param(
        f"12:memory:/docker/{NODE}/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/docker/{NODE}/kubepods/besteffort/pod{UID}/{CID}\n",
        CgroupIdentity(UID, CID, None),
        id="k3d-v1-cgroupfs-under-docker",
    ),
    pytest.param(
        f"0::/user.slice/user-1000.slice/user@1000.service/k3s-rootless.service/kubepods/burstable/pod{UID}/{CID}\n",
        CgroupIdentity(UID, CID, None),
        id="k3s-rootless-under-user-service",
    ),
    pytest.param(
        f"0::/kubepods/burstable/pod{UID2}/{NODE}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
        CgroupIdentity(UID, CID, "containerd"),
        id="cluster-in-a-pod-innermost-pod-wins",
    ),
    pytest.param(
        f"0::/kubepods/pod{UID.upper()}/{CID.upper()}\n",
        CgroupIdentity(UID, CID, None),
        id="upper-case-hex-normalised",
    ),
    # not a pod's process
    pytest.param("0::/init.scope\n", None, id="host-init"),
    pytest.param("0::/user.slice/user-1000.slice/session-2.scope\n", None, id="host-user-session"),
    pytest.param("0::/system.slice/containerd.service\n", None, id="system-service-containerd"),
    pytest.param("0::/system.slice/kubelet.service\n", None, id="system-service-kubelet"),
    pytest.param(V1_HOST_SERVICE, None, id="v1-system-service-sshd"),
    pytest.param(f"0::/system.slice/docker-{CID}.scope\n", None, id="plain-docker-v2-systemd"),
    pytest.param(V1_PLAIN_DOCKER, None, id="plain-docker-v1-cgroupfs"),
    pytest.param(
        f"0::/system.slice/crio-conmon-{CID}.scope\n", None, id="crio-conmon-in-system-slice"
    ),
    pytest.param("0::/kubepods.slice/kubepods-burstable.slice\n", None, id="qos-slice-only"),
    pytest.param(
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC}.slice/cri-containerd-{CID}.scope\n",
        None,
        id="static-pod-hash-uid",
    ),
    # malformed
    pytest.param("", None, id="empty"),
    pytest.param("not a cgroup file\n:::\nx:y\n\n", None, id="garbage"),
    pytest.param(f"0::/kubepods/burstable/pod{UID[:-1]}/{CID}\n", None, id="uid-one-digit-short"),
    pytest.param(
        f"0::/kubepods/burstable/pod{UID[:8]}_{UID[9:]}/{CID}\n", None, id="uid-mixed-separators"
    ),
    pytest.param(f"0::/system.slice/pod{UID}/{CID}\n", None, id="pod-directory-outside-kubepods"),
    pytest.param(f"/kubepods/pod{UID}/{CID}\n", None, id="line-without-fields"),
    pytest.param(f"x::/kubepods/pod{UID}/{CID}\n", None, id="line-non-numeric-hierarchy"),
    pytest.param(f"0::kubepods/pod{UID}/{CID}\n", None, id="line-path-not-absolute"),
    pytest.param(
        f"garbage\n\x00\x01\n3:cpu:/kubepods/pod{UID}/{CID}\n",
        CgroupIdentity(UID, CID, None),
        id="malformed-lines-skipped",
    ),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_parse_cgroup(text: str, expected: CgroupIdentity | None) -> None:
    assert parse_cgroup(text) == expected


def test_identity_is_frozen() -> None:
    identity = CgroupIdentity(UID, CID, "containerd")
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.pod_uid = UID2  # type: ignore[misc]
