"""The local cluster's pure parts: configuration, kwok stages, PKI, binary lookup, pod runner."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from payper_dev import loopback
from payper_dev.cluster import binaries, kwok, pki, podrunner
from payper_dev.cluster.local import ClusterConfig, ClusterError, LocalCluster


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pod_cidr": "10.0.0.0/16"}, "loopback"),
        ({"gpu_nodes": -1}, "gpu_nodes"),
        ({"gpus_per_node": 0}, "gpus_per_node"),
        ({"cold_start_ms": -5}, "cold_start_ms"),
    ],
)
def test_cluster_config_rejects_bad_values(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ClusterError, match=message):
        ClusterConfig(**change).validate()


def test_kwok_configuration_simulates_cold_starts_with_a_per_pod_override() -> None:
    documents = list(yaml.safe_load_all(kwok.configuration("127.9.0.0/16", "127.0.0.1", 2500)))
    options = documents[0]["options"]
    assert options["cidr"] == "127.9.0.0/16"
    assert options["manageNodesWithLabelSelector"] == f"{kwok.MANAGED_LABEL}=true"
    stages = {d["metadata"]["name"]: d["spec"] for d in documents[1:]}
    assert set(stages) == {
        "node-initialize",
        "node-heartbeat",
        "pod-create",
        "pod-ready",
        "pod-ready-listening",
        "pod-delete",
        "pod-delete-overdue",
    }
    for name in ("pod-ready", "pod-ready-listening"):
        delay = stages[name]["delay"]
        assert delay["durationMilliseconds"] == 2500
        assert kwok.COLD_START_ANNOTATION in delay["durationFrom"]["expressionFrom"]
    # A pod the runner serves is never Ready on the timer alone: only once it listens.
    timer = {e["key"]: e for e in stages["pod-ready"]["selector"]["matchExpressions"]}
    runner_key = f'.metadata.annotations["{podrunner.ANNOTATION}"]'
    assert timer[runner_key]["operator"] == "DoesNotExist"
    listening = {e["key"]: e for e in stages["pod-ready-listening"]["selector"]["matchExpressions"]}
    listening_key = f'.metadata.annotations["{podrunner.LISTENING_ANNOTATION}"]'
    assert listening[listening_key] == {"key": listening_key, "operator": "In", "values": ["true"]}
    assert "podIP: {{ PodIPWith" in stages["pod-create"]["next"]["statusTemplate"]
    assert stages["pod-delete"]["next"] == {"delete": True}
    # A runner pod is removed by the runner once its process stopped (kwok removes it
    # only when its grace has run out), never while it drains.
    at_once = {e["key"]: e for e in stages["pod-delete"]["selector"]["matchExpressions"]}
    assert at_once[runner_key]["operator"] == "DoesNotExist"
    overdue = stages["pod-delete-overdue"]
    assert {e["key"]: e["operator"] for e in overdue["selector"]["matchExpressions"]}[
        runner_key
    ] == "Exists"
    assert overdue["delay"]["durationFrom"] == {"expressionFrom": ".metadata.deletionTimestamp"}


def test_node_manifests_carry_gpu_capacity_labels_and_taint(tmp_path: Path) -> None:
    config = ClusterConfig(gpu_nodes=3, gpus_per_node=4, gpu_product="NVIDIA-A100-SXM4-40GB")
    nodes = LocalCluster(tmp_path).node_manifests(config)
    gpu = [n for n in nodes if n["metadata"]["name"].startswith("gpu-")]
    assert len(gpu) == 3
    assert len(nodes) == 4
    for node in gpu:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
        assert node["spec"]["taints"][0]["key"] == "nvidia.com/gpu"
    cpu = next(n for n in nodes if n not in gpu)
    assert "nvidia.com/gpu" not in cpu["status"]["allocatable"]
    assert cpu["spec"]["taints"] == []


def test_pki_signs_the_apiserver_and_clients_with_one_ca(tmp_path: Path) -> None:
    pki.generate(tmp_path, "10.96.0.1")
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "apiserver.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kubernetes.default.svc" in names.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "10.96.0.1",
    }
    admin = x509.load_pem_x509_certificate((tmp_path / "admin.crt").read_bytes())
    admin.verify_directly_issued_by(ca)
    groups = [a.value for a in admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert groups == ["system:masters"]
    assert (tmp_path / "sa.key").stat().st_mode & 0o077 == 0


def test_staging_modules_come_from_the_kubernetes_go_mod() -> None:
    gomod = """module k8s.io/kubernetes
replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tgithub.com/other/thing => github.com/fork/thing v1.0.0
)
"""
    assert binaries._staging_modules(gomod) == ["k8s.io/api", "k8s.io/client-go"]
    with pytest.raises(binaries.BuildError, match="no staging replace lines"):
        binaries._staging_modules("module x\n")


def test_payper_k8s_bin_must_hold_every_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in binaries.ALL_BINARIES[:-1]:
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PAYPER_K8S_BIN", str(tmp_path))
    missing = binaries.ALL_BINARIES[-1]
    with pytest.raises(binaries.BuildError, match=f"lacks: {missing}"):
        binaries.find_bin_dir()
    (tmp_path / missing).write_text("#!/bin/sh\n")
    (tmp_path / missing).chmod(0o755)
    assert binaries.find_bin_dir() == tmp_path
    assert binaries.binary("etcd") == str(tmp_path / "etcd")


def _pod(
    ip: str | None,
    uid: str = "u1",
    deleting: bool = False,
    profile: str = "sleep",
    grace_s: int | None = None,
    pre_stop_s: int | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "namespace": "ns",
        "name": "p",
        "uid": uid,
        "annotations": {podrunner.ANNOTATION: profile},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-11-26T10:00:00Z"
        if grace_s is not None:
            meta["deletionGracePeriodSeconds"] = grace_s
    container: dict[str, Any] = {"name": "c", "ports": [{"containerPort": 9000}]}
    if pre_stop_s is not None:
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": pre_stop_s}}}
    return {
        "metadata": meta,
        "spec": {"nodeName": "gpu-node-0", "containers": [container]},
        "status": {"podIP": ip} if ip else {},
    }


async def test_pod_runner_follows_the_pod_lifecycle(tmp_path: Path) -> None:
    marker = tmp_path / "args"
    script = (
        f"import sys, time; open({str(marker)!r}, 'w').write(' '.join(sys.argv[1:])); "
        "time.sleep(60)"
    )
    runner = podrunner.PodRunner(
        None, {"sleep": [sys.executable, "-c", script, "{ip}", "{port}", "{name}"]}
    )
    await runner.on_event("ADDED", _pod(ip=None))
    assert runner.running == {}
    await runner.on_event("MODIFIED", _pod(ip="127.9.0.7"))
    first = runner.running["ns/p"].process
    for _ in range(100):
        if marker.exists() and marker.read_text():
            break
        await asyncio.sleep(0.05)
    assert marker.read_text() == "127.9.0.7 9000 p"
    await runner.on_event("MODIFIED", _pod(ip="127.9.0.7"))
    assert runner.running["ns/p"].process is first
    await runner.on_event("MODIFIED", _pod(ip="127.9.0.8", uid="u2"))
    assert first.returncode is not None
    second = runner.running["ns/p"].process
    await runner.on_event("MODIFIED", _pod(ip="127.9.0.8", uid="u2", deleting=True, grace_s=5))
    assert runner.running == {}
    await asyncio.wait_for(asyncio.gather(*runner.draining.values()), 20)
    assert second.returncode is not None
    await runner.on_event("ADDED", _pod(ip="127.9.0.9", profile="unknown"))
    assert runner.running == {}


async def test_pod_runner_announces_a_pod_only_once_its_process_listens(tmp_path: Path) -> None:
    go = tmp_path / "go"
    # Binds only once the test creates the file: the runner must not announce before.
    server = (
        "import os, socket, sys, time\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "s = socket.create_server((sys.argv[1], int(sys.argv[2])))\n"
        "time.sleep(60)\n"
    )
    runner = podrunner.PodRunner(
        None,
        {"serve": [sys.executable, "-c", server, "{ip}", "{port}"], "crash": ["false"]},
        listen_timeout_s=30,
    )
    try:
        await runner.on_event("ADDED", _pod(ip="127.9.0.10", profile="serve"))
        entry = runner.running["ns/p"]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(entry.listening.wait(), 0.5)
        go.write_text("")
        await asyncio.wait_for(entry.listening.wait(), 20)
        await runner.on_event("DELETED", _pod(ip="127.9.0.10", profile="serve"))
        # A process that exits without listening is never announced.
        await runner.on_event("ADDED", _pod(ip="127.9.0.11", uid="u3", profile="crash"))
        crashed = runner.running["ns/p"]
        assert crashed.probe is not None
        await asyncio.wait_for(crashed.probe, 20)
        assert not crashed.listening.is_set()
    finally:
        await runner.on_event("DELETED", _pod(ip="127.9.0.11", uid="u3"))


class _RecordingKube:
    """Stands in for the API server: records the runner's pod deletions, and whether the
    pod's process had exited by then."""

    def __init__(self) -> None:
        self.deleted: list[tuple[str, Any]] = []
        self.process: asyncio.subprocess.Process | None = None

    async def delete(self, path: str, params: Any = None, body: Any = None) -> None:
        exited = None if self.process is None else self.process.returncode
        self.deleted.append((path, {**body, "exited": exited}))


async def test_pod_runner_stops_a_terminating_pod_as_a_kubelet_does(tmp_path: Path) -> None:
    """preStop sleep first (the process serves on), then SIGTERM, SIGKILL once the grace
    runs out; the pod object is removed (grace 0, on its UID) only after the exit."""
    log = tmp_path / "log"
    graceful = (
        "import signal, sys, time\n"
        f"log = open({str(log)!r}, 'a', buffering=1)\n"
        "def term(*_):\n"
        "    log.write(f'term {time.time()}\\n'); time.sleep(0.3); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "log.write('up\\n')\n"
        "while True: time.sleep(1)\n"
    )
    stubborn = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(sys.argv[1], 'w').write('up')\n"
        "time.sleep(60)\n"
    )
    ignoring = tmp_path / "ignoring"
    (tmp_path / "graceful.py").write_text(graceful)
    (tmp_path / "stubborn.py").write_text(stubborn)
    runner = podrunner.PodRunner(
        None,
        {
            "graceful": [sys.executable, str(tmp_path / "graceful.py")],
            "stubborn": [sys.executable, str(tmp_path / "stubborn.py"), str(ignoring)],
        },
    )
    kube = _RecordingKube()
    runner.kube = kube  # type: ignore[assignment]

    async def until(probe: Any) -> None:
        for _ in range(400):
            if probe():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {probe}")

    async def drained() -> None:
        await asyncio.wait_for(asyncio.gather(*runner.draining.values()), 30)

    # (Neither process listens, so the runner never announces them: no patch.)
    await runner.on_event("ADDED", _pod(ip="127.9.0.12", profile="graceful"))
    kube.process = runner.running["ns/p"].process
    await until(lambda: log.exists() and "up" in log.read_text())
    asked = time.time()
    await runner.on_event("MODIFIED", _pod("127.9.0.12", "u1", True, "graceful", 10, 1))
    await drained()
    term_at = float(log.read_text().split("term ")[1].split()[0])
    assert term_at - asked >= 1.0, "SIGTERM only after the preStop sleep"
    assert kube.process.returncode == 0, "it finished on its own within its grace"
    path, options = kube.deleted[0]
    assert path == "/api/v1/namespaces/ns/pods/p"
    assert options == {
        "apiVersion": "v1",
        "kind": "DeleteOptions",
        "gracePeriodSeconds": 0,
        "preconditions": {"uid": "u1"},
        "exited": 0,
    }

    # A process that ignores SIGTERM is killed when the grace period runs out.
    await runner.on_event("ADDED", _pod(ip="127.9.0.13", uid="u2", profile="stubborn"))
    kube.process = runner.running["ns/p"].process
    await until(ignoring.exists)
    await runner.on_event("MODIFIED", _pod("127.9.0.13", "u2", True, "stubborn", 1))
    await drained()
    assert kube.process.returncode == -signal.SIGKILL
    assert kube.deleted[1][1]["exited"] == -signal.SIGKILL

    # A terminating pod with nothing running (no IP yet) is removed at once; one of a
    # profile this runner does not serve is left alone.
    kube.process = None
    await runner.on_event("MODIFIED", _pod(None, "u3", True, "graceful", 30))
    await drained()
    assert kube.deleted[2][1]["preconditions"] == {"uid": "u3"}
    await runner.on_event("MODIFIED", _pod(None, "u4", True, "unknown", 30))
    await drained()
    assert len(kube.deleted) == 3


def test_two_clusters_never_claim_the_same_pod_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loopback, "RANGE_LOCKS", tmp_path)
    with loopback.claimed_pod_range(5) as first, loopback.claimed_pod_range(5) as second:
        assert (first, second) == ("127.5.0.0/16", "127.6.0.0/16")
    with loopback.claimed_pod_range(5) as again:
        assert again == "127.5.0.0/16", "released when the first cluster's claim ended"
