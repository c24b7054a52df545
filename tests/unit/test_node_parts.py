"""The real node's pure parts: its network stays inside 198.18.0.0/15, its configuration
carries the settings this kind of machine needs, its credentials are proper node ones."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from payper_dev.cluster import node, node_binaries, pki

TEST_NET = ipaddress.ip_network("198.18.0.0/15")


def test_the_pod_network_has_no_route_out_of_the_test_range() -> None:
    config = node.cni_config(Path("/x/ipam"))
    bridge = config["plugins"][0]
    assert bridge["bridge"] == node.BRIDGE
    assert bridge["ipMasq"] is False
    ranges = bridge["ipam"]["ranges"][0][0]
    assert ipaddress.ip_network(ranges["subnet"]).subnet_of(TEST_NET)  # type: ignore[arg-type]
    assert ranges["gateway"] == node.NODE_IP == pki.REAL_NODE_IP
    destinations = [ipaddress.ip_network(r["dst"]) for r in bridge["ipam"]["routes"]]
    assert ipaddress.ip_network("0.0.0.0/0") not in destinations
    assert {str(d) for d in destinations} == {node.TEST_NET, "10.96.0.0/16"}


def test_containerd_keeps_to_its_own_paths_and_this_machines_limits(tmp_path: Path) -> None:
    text = node.containerd_config(tmp_path, tmp_path / "c.sock", "/usr/lib/cni", 4242)
    config = tomllib.loads(text)
    assert config["root"].startswith(str(tmp_path))
    assert config["state"].startswith(str(tmp_path))
    runtime = config["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    options = runtime["containerd"]["runtimes"]["runc"]["options"]
    assert options["SystemdCgroup"] is False
    assert options["Root"].startswith(str(tmp_path))
    assert config["plugins"]["io.containerd.grpc.v1.cri"]["stream_server_address"] == "127.0.0.1"
    assert config["plugins"]["io.containerd.nri.v1.nri"]["disable"] is True
    images = config["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == node_binaries.PAUSE_IMAGE


def test_the_kubelet_listens_only_on_the_bridge_and_loopback(tmp_path: Path) -> None:
    config = node.kubelet_config(tmp_path, tmp_path / "pki", tmp_path / "c.sock", 4243)
    assert config["address"] == node.NODE_IP
    assert config["healthzBindAddress"] == "127.0.0.1"
    assert config["readOnlyPort"] == 0
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["authorization"]["mode"] == "Webhook"
    assert config["registerWithTaints"] == [node.REAL_NODE_TAINT]
    assert config["cgroupRoot"] == node.CGROUP_ROOT
    assert config["failCgroupV1"] is False
    assert config["resolvConf"] == ""
    proxy = node.kube_proxy_config(tmp_path / "k", 1, 2)
    assert proxy["nodePortAddresses"] == [f"{node.NODE_IP}/32"]
    assert proxy["healthzBindAddress"].startswith("127.0.0.1:")
    assert proxy["conntrack"]["maxPerCore"] == 0


def test_the_cluster_dns_answers_cluster_names_only() -> None:
    text = node.corefile(Path("/k"), 1, 2)
    assert "forward" not in text
    assert f"bind {node.NODE_IP}" in text
    wrapper = node_binaries.coredns_wrapper()
    assert "plugin/kubernetes" in wrapper
    assert "plugin/azure" not in wrapper
    dns_slice = node.cluster_dns_objects()[-1]
    assert dns_slice["endpoints"][0]["addresses"] == [node.NODE_IP]


def test_the_node_credential_is_a_proper_node_identity(tmp_path: Path) -> None:
    pki.generate(tmp_path, "10.96.0.1")
    cert = x509.load_pem_x509_certificate((tmp_path / "node.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    subject = cert.subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        f"system:node:{node.NODE_NAME}"
    )
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    cert.verify_directly_issued_by(ca)
    serving = x509.load_pem_x509_certificate((tmp_path / "kubelet-serving.crt").read_bytes())
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address(node.NODE_IP) in names.get_values_for_type(x509.IPAddress)


def test_a_machine_that_cannot_run_the_node_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node.os, "geteuid", lambda: 1000)
    assert "root" in (node.cannot_run() or "")
    monkeypatch.setattr(node.os, "geteuid", lambda: 0)
    monkeypatch.setattr(node_binaries.shutil, "which", lambda tool: None)
    reason = node.cannot_run() or ""
    assert "runc" in reason
    assert "make node-deps" in reason


def test_kube_router_enforces_policies_only_and_listens_nowhere() -> None:
    command = node.kube_router_command(Path("/bin/kube-router"), Path("/k/kube-router.kubeconfig"))
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in command[1:])
    assert flags["run-firewall"] == "true"
    assert flags["run-router"] == flags["run-service-proxy"] == "false"
    assert flags["run-loadbalancer"] == "false"
    assert flags["health-port"] == flags["metrics-port"] == "0"
    assert flags["hostname-override"] == node.NODE_NAME
    assert flags["service-cluster-ip-range"] == node.SERVICE_CIDR
    assert flags["kubeconfig"] == "/k/kube-router.kubeconfig"
    assert "kube-router" in node.COMPONENTS
    assert "kube-router" in node.AFTER_REGISTRATION  # it reads its Node at start
    role = node.kube_router_objects()[0]
    verbs = {verb for rule in role["rules"] for verb in rule["verbs"]}
    assert verbs <= {"get", "list", "watch"}


def test_kube_router_is_cached_apart_from_the_other_node_parts() -> None:
    """Adding or bumping kube-router never changes the other parts' cache key (a cold
    build of those takes about 14 minutes)."""
    router = node_binaries.kube_router_dir()
    assert router.name == f"kube-router-{node_binaries.KUBE_ROUTER_VERSION}"
    assert router.parent == node_binaries.cached_dir().parent
    assert "kube-router" not in node_binaries.versions_tag()
    assert "kube-router" not in node_binaries.NODE_BINARIES
    assert node_binaries.DEBIAN_TOOLS["ipset"] == "ipset"


def test_teardown_finds_kube_routers_jumps_and_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    filter_rules = "\n".join(
        [
            "-P FORWARD ACCEPT",
            "-N KUBE-ROUTER-FORWARD",
            '-A FORWARD -m comment --comment "kube-router netpol - TEMCG2JMHZYE7H7T" '
            "-j KUBE-ROUTER-FORWARD",
            "-A FORWARD -o docker0 -j ACCEPT",
        ]
    )
    sets = "KUBE-SRC-ABCDEFGHIJKLMNOP\nKUBE-DST-ABCDEFGHIJKLMNOP\nTMP-ABCDEFGHIJKLMNOP\nmine\n"

    def fake_sh(
        *cmd: str, check: bool = True, input: str | None = None, timeout_s: float = 0
    ) -> str:
        if cmd[0] == "ipset":
            return sets
        return filter_rules if cmd[0] == "iptables" and cmd[3] == "filter" else ""

    monkeypatch.setattr(node, "_sh", fake_sh)
    monkeypatch.setattr(node.shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    (jump,) = node._kube_jumps()
    assert jump == (
        "iptables", "-w", "-t", "filter", "-D", "FORWARD", "-m", "comment",
        "--comment", "kube-router netpol - TEMCG2JMHZYE7H7T", "-j", "KUBE-ROUTER-FORWARD",
    )  # fmt: skip
    assert node.node_ipsets() == [
        "KUBE-SRC-ABCDEFGHIJKLMNOP",
        "KUBE-DST-ABCDEFGHIJKLMNOP",
        "TMP-ABCDEFGHIJKLMNOP",
    ]
