"""After ``down``, nothing of the real node is left on the machine. Runs last in the
tier (the session's node is gone afterwards)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from payper_dev.cluster import node as real_node
from payper_dev.testing.cluster import NodeCluster, eventually


def test_down_leaves_nothing(
    node_cluster: NodeCluster, namespace: str, served_pod: dict[str, Any]
) -> None:
    node = node_cluster.node
    state = node.state()
    assert state is not None
    assert real_node.node_cgroups(), "a running pod has cgroups under the node's root"
    # A NetworkPolicy on the pod, so kube-router has made its per-pod chains and ipsets.
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "fence"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}],
        },
    }
    node_cluster.handle.apply_items([policy], "-n", namespace)
    eventually(real_node.node_ipsets, 60, what="kube-router's ipsets for the policy")
    chains = " ".join(real_node.iptables_kube_chains())
    assert "KUBE-ROUTER-FORWARD" in chains and "KUBE-POD-FW-" in chains, chains
    node.down()
    assert real_node.leftovers(node.directory) == []
    for path in (
        "/var/lib/kubelet/device-plugins",
        "/var/log/pods",
        "/var/log/containers",
        "/var/lib/cni/results",
        "/run/containerd/s",
        "/run/containerd/runc",
    ):
        assert not os.path.lexists(path), path
    # Every fixed path the node (or the chart's hostPath volumes) created is gone.
    assert not [p for p in state.absent_paths if os.path.lexists(p)]
    assert not Path(f"/sys/class/net/{real_node.BRIDGE}").exists()
    assert real_node.node_cgroups() == []
    assert real_node.iptables_kube_chains() == []
    assert real_node.node_ipsets() == []
    tables = real_node.nft_tables()
    assert not [t for t in tables if t.endswith(("kube-proxy", real_node.NFT_TABLE))], tables
    assert real_node.mounts_under(str(node.directory), "/var/lib/kubelet", "/run/netns") == []
    assert not [n for n in real_node._netns() if n.name.startswith("cni-")]
    assert real_node.read_sysctls() == state.sysctls
    assert not real_node.LOCK_FILE.exists()
    on_node = node_cluster.handle.get_json(
        "pods", "-A", "--field-selector", f"spec.nodeName={real_node.NODE_NAME}"
    )
    assert on_node["items"] == []
