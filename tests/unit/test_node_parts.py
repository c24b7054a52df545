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
