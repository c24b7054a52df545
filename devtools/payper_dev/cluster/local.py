"""A real Kubernetes control plane on loopback, for tests, the demo and benchmarks.

``payper-dev cluster up`` starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok as detached processes of one *cluster directory* (default
``build/cluster``), registers fake GPU nodes, and waits until the API server is ready,
the nodes are Ready and the default ServiceAccount exists. ``payper-dev cluster down``
stops every process it started (checked by PID and command line, so a recycled PID is
never killed) and nothing is left running. The pytest session fixture uses the same
class, in a directory of its own, so tests never disturb a developer's cluster.

Everything listens on 127.0.0.1 with ports chosen at start; ``state.json`` in the
cluster directory records them with the PIDs.

CRDs given in the configuration are installed before the controller-manager starts: its
garbage collector discovers resource types at start and then only every 30 s, so owned
objects of a CRD installed later are not collected for up to that long. Installed first,
the collector knows them from its first discovery and deletion cascades at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from payper.api.inference_deployment import GPU_PRODUCT_LABEL
from payper.kube import ApiError, Kube, resource_path
from payper_dev.cluster import binaries, kwok, pki
from payper_dev.loopback import free_port, get_text

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class ClusterError(RuntimeError):
    """The local cluster could not be started or stopped; the message says what to look at."""


@dataclass
class ClusterConfig:
    gpu_nodes: int = 2
    gpus_per_node: int = 8
    gpu_product: str = DEFAULT_GPU_PRODUCT
    cpu_nodes: int = 1
    cold_start_ms: int = 3000
    pod_cidr: str = "127.1.0.0/16"
    crds_dir: str | None = None
    """CRD manifests (``*.yaml``) served before the controller-manager starts."""
    real_node: bool = False
    """Start the real node too (payper_dev.cluster.node), and with it the EndpointSlice
    controller, which real pods' Services need (kwok's loopback pod IPs make it log
    errors, so it is off otherwise)."""

    def validate(self) -> None:
        if not 0 <= self.gpu_nodes <= 100:
            raise ClusterError(f"gpu_nodes must be between 0 and 100, got {self.gpu_nodes}")
        if not 1 <= self.gpus_per_node <= 64:
            raise ClusterError(f"gpus_per_node must be between 1 and 64, got {self.gpus_per_node}")
        if not 0 <= self.cold_start_ms <= 600_000:
            raise ClusterError(f"cold_start_ms must be 0..600000, got {self.cold_start_ms}")
        if not self.pod_cidr.startswith("127."):
            raise ClusterError(f"pod_cidr must be a loopback range (127.x), got {self.pod_cidr}")
        if self.crds_dir is not None and not sorted(Path(self.crds_dir).glob("*.yaml")):
            raise ClusterError(f"crds_dir {self.crds_dir} holds no *.yaml manifests")


@dataclass
class ClusterState:
    config: ClusterConfig
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    @classmethod
    def load(cls, path: Path) -> ClusterState:
        raw = json.loads(path.read_text())
        return cls(
            config=ClusterConfig(**raw["config"]),
            ports={k: int(v) for k, v in raw["ports"].items()},
            pids={k: int(v) for k, v in raw["pids"].items()},
            started_at=float(raw["started_at"]),
        )

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _pid_alive(pid: int, marker: str) -> bool:
    """True if ``pid`` runs and its command line mentions ``marker`` (our cluster dir)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and marker in cmdline


class LocalCluster:
    """One local cluster, living in ``directory``."""

    def __init__(self, directory: Path | str = "build/cluster") -> None:
        self.directory = Path(directory).resolve()
        self.pki_dir = self.directory / "pki"
        self.log_dir = self.directory / "logs"
        self.state_file = self.directory / "state.json"
        self.kubeconfig = self.directory / "kubeconfig"
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self.timings: dict[str, float] = {}

    # -- queries -------------------------------------------------------------------
    def state(self) -> ClusterState | None:
        if not self.state_file.exists():
            return None
        try:
            return ClusterState.load(self.state_file)
        except (ValueError, KeyError, TypeError) as error:
            raise ClusterError(f"{self.state_file} is unreadable ({error}); run `down`") from error

    def running(self) -> dict[str, bool]:
        state = self.state()
        if state is None:
            return {}
        marker = str(self.directory)
        return {name: _pid_alive(pid, marker) for name, pid in state.pids.items()}

    def is_up(self) -> bool:
        running = self.running()
        return bool(running) and all(running.values()) and set(running) == set(COMPONENTS)

    # -- start ---------------------------------------------------------------------
    def up(self, config: ClusterConfig | None = None, timeout_s: float = 120.0) -> Path:
        """Start the cluster (or return at once if it already runs); returns the kubeconfig."""
        config = config or ClusterConfig()
        config.validate()
        if self.is_up():
            return self.kubeconfig
        if self.state_file.exists():
            self.down()
        bin_dir = binaries.find_bin_dir() or binaries.build()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        for stale in ("etcd-data", "pki"):
            shutil.rmtree(self.directory / stale, ignore_errors=True)
        started = time.monotonic()
        pki.generate(self.pki_dir, SERVICE_IP)
        ports = {"etcd": free_port(), "etcd-peer": free_port(), "apiserver": free_port()}
        state = ClusterState(config=config, ports=ports)
        self._write_kubeconfigs(ports["apiserver"])
        (self.directory / "kwok.yaml").write_text(
            kwok.configuration(config.pod_cidr, "127.0.0.1", config.cold_start_ms)
        )
        deadline = time.monotonic() + timeout_s
        try:
            for name in COMPONENTS:
                state.pids[name] = self._spawn(name, self._command(name, bin_dir, ports, config))
                state.save(self.state_file)
                if name == "etcd":
                    self._wait_etcd(ports["etcd"], deadline)
                    self.timings["etcd healthy"] = time.monotonic() - started
                elif name == "kube-apiserver":
                    asyncio.run(self._wait_apiserver(deadline))
                    self.timings["apiserver ready"] = time.monotonic() - started
                    if config.crds_dir is not None:
                        crds = _manifests(Path(config.crds_dir))
                        asyncio.run(self._install_crds(crds, deadline))
                        self.timings["crds served"] = time.monotonic() - started
            asyncio.run(self._register_nodes(config, deadline))
            self.timings["nodes ready"] = time.monotonic() - started
            if config.real_node:
                from payper_dev.cluster.node import RealNode

                node = RealNode(self.directory)
                node.up(timeout_s=120.0)
                self.timings["real node ready"] = time.monotonic() - started
        except BaseException:
            self.down()
            raise
        return self.kubeconfig

    def _command(
        self, name: str, bin_dir: Path, ports: dict[str, int], config: ClusterConfig
    ) -> list[str]:
        p, d = self.pki_dir, self.directory
        if name == "etcd":
            return [
                str(bin_dir / "etcd"),
                "--name=payper",
                f"--data-dir={d / 'etcd-data'}",
                f"--listen-client-urls=http://127.0.0.1:{ports['etcd']}",
                f"--advertise-client-urls=http://127.0.0.1:{ports['etcd']}",
                f"--listen-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
                f"--initial-cluster=payper=http://127.0.0.1:{ports['etcd-peer']}",
                "--unsafe-no-fsync",
                "--log-level=warn",
                "--quota-backend-bytes=4294967296",
            ]
        if name == "kube-apiserver":
            return [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports['apiserver']}",
                f"--cert-dir={p}",
                f"--tls-cert-file={p / 'apiserver.crt'}",
                f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                # Logs, exec and port-forward reach a kubelet by its node IP, never by a
                # name to resolve, and with a client certificate it trusts.
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--enable-priority-and-fairness=false",
                "--max-requests-inflight=2000",
                "--max-mutating-requests-inflight=1000",
                "--v=1",
            ]
        if name == "kube-controller-manager":
            kubeconfig = d / "controller-manager.kubeconfig"
            return [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={p / 'sa.key'}",
                f"--root-ca-file={p / 'ca.crt'}",
                f"--cluster-signing-cert-file={p / 'ca.crt'}",
                f"--cluster-signing-key-file={p / 'ca.key'}",
                # Pod IPs are loopback addresses, which Endpoints and EndpointSlices refuse:
                # those controllers would only log errors. Nothing in Payper reads them.
                # The real node's pods have real addresses, and kube-proxy needs slices.
                "--controllers=*,-node-ipam-controller,-endpoints-controller,"
                + ("" if config.real_node else "-endpointslice-controller,")
                + "-endpointslice-mirroring-controller",
                "--allocate-node-cidrs=false",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--concurrent-deployment-syncs=20",
                "--concurrent-replicaset-syncs=20",
                "--concurrent-gc-syncs=40",
                f"--cert-dir={d / 'controller-manager-certs'}",
                "--v=0",
            ]
        if name == "kube-scheduler":
            kubeconfig = d / "scheduler.kubeconfig"
            return [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--leader-elect=false",
                "--v=1",
            ]
        if name == "kwok":
            return [
                str(bin_dir / "kwok"),
                f"--kubeconfig={d / 'kwok.kubeconfig'}",
                f"--config={d / 'kwok.yaml'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-label-selector={kwok.MANAGED_LABEL}=true",
                "--server-address=",
            ]
        raise ClusterError(f"unknown component {name}")

    def _spawn(self, name: str, command: list[str]) -> int:
        log = (self.log_dir / f"{name}.log").open("ab")
        try:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.directory,
            )
        finally:
            log.close()
        self._children[name] = process
        return process.pid

    def _log_tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _check_alive(self, name: str) -> None:
        child = self._children.get(name)
        if child is None or child.poll() is not None:
            raise ClusterError(
                f"{name} exited during start-up; its log ends:\n{self._log_tail(name)}"
            )

    def _wait_etcd(self, port: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive("etcd")
            health = get_text(f"http://127.0.0.1:{port}/health")
            if health is not None and json.loads(health).get("health") == "true":
                return
            time.sleep(0.1)
        raise ClusterError("etcd did not become healthy in time:\n" + self._log_tail("etcd"))

    async def _wait_apiserver(self, deadline: float) -> None:
        async with Kube.connect(self.kubeconfig) as kube:
            while True:
                self._check_alive("kube-apiserver")
                try:
                    await kube.wait_ready(min(1.0, max(0.1, deadline - time.monotonic())))
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise ClusterError(
                            "kube-apiserver not ready in time:\n" + self._log_tail("kube-apiserver")
                        ) from None

    async def _install_crds(self, crds: list[dict[str, Any]], deadline: float) -> None:
        """Apply the CRDs and return once discovery serves every one of them."""
        crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        async with Kube.connect(self.kubeconfig) as kube:
            for crd in crds:
                await kube.apply(f"{crd_path}/{crd['metadata']['name']}", crd, "payper-cluster")
            for crd in crds:
                group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
                versions = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
                while True:
                    served = [
                        await kube.get_or_none(f"/apis/{group}/{version}") for version in versions
                    ]
                    if all(
                        doc and plural in {r["name"] for r in doc.get("resources", [])}
                        for doc in served
                    ):
                        break
                    if time.monotonic() > deadline:
                        raise ClusterError(f"CRD {crd['metadata']['name']} not served in time")
                    await asyncio.sleep(0.1)

    def node_manifests(self, config: ClusterConfig) -> list[dict[str, Any]]:
        nodes = []
        for index in range(config.gpu_nodes):
            nodes.append(gpu_node(f"gpu-node-{index}", config.gpu_product, config.gpus_per_node))
        for index in range(config.cpu_nodes):
            nodes.append(_node(f"cpu-node-{index}", labels={"payper.dev/node-pool": "system"}))
        return nodes

    async def _register_nodes(self, config: ClusterConfig, deadline: float) -> None:
        async with Kube.connect(self.kubeconfig) as kube:
            for node in self.node_manifests(config):
                try:
                    await kube.create(resource_path("v1", "nodes"), node)
                except ApiError as error:
                    if not error.conflict:
                        raise
            wanted = config.gpu_nodes + config.cpu_nodes
            while True:
                for name in COMPONENTS:
                    self._check_alive(name)
                nodes = (await kube.list(resource_path("v1", "nodes")))["items"]
                ready = [n for n in nodes if _condition(n, "Ready") == "True"]
                account = await kube.get_or_none(
                    resource_path("v1", "serviceaccounts", "default", "default")
                )
                if len(ready) >= wanted and account is not None:
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"{len(ready)}/{wanted} nodes Ready, default ServiceAccount "
                        f"{'present' if account else 'missing'} at the deadline; kwok log:\n"
                        + self._log_tail("kwok")
                    )
                await asyncio.sleep(0.2)

    def _write_kubeconfigs(self, port: int) -> None:
        ca = _b64(self.pki_dir / "ca.crt")
        files = {
            "kubeconfig": "admin",
            "controller-manager.kubeconfig": "controller-manager",
            "scheduler.kubeconfig": "scheduler",
            "kwok.kubeconfig": "kwok",
        }
        for file_name, stem in files.items():
            document = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "payper-local",
                        "cluster": {
                            "server": f"https://127.0.0.1:{port}",
                            "certificate-authority-data": ca,
                        },
                    }
                ],
                "users": [
                    {
                        "name": stem,
                        "user": {
                            "client-certificate-data": _b64(self.pki_dir / f"{stem}.crt"),
                            "client-key-data": _b64(self.pki_dir / f"{stem}.key"),
                        },
                    }
                ],
                "contexts": [
                    {"name": "payper-local", "context": {"cluster": "payper-local", "user": stem}}
                ],
                "current-context": "payper-local",
            }
            path = self.directory / file_name
            path.write_text(yaml.safe_dump(document, sort_keys=False))
            path.chmod(0o600)

    # -- stop ----------------------------------------------------------------------
    def down(self, grace_s: float = 10.0) -> list[str]:
        """Stop every process of this cluster; returns the names that had to be killed.

        Components stop one at a time in reverse start order (kwok first, etcd last), so
        the API server can still reach etcd while it shuts down gracefully.
        """
        if (self.directory / "node" / "state.json").exists():
            # The real node first, while the API server can still see its pods deleted.
            from payper_dev.cluster.node import RealNode

            RealNode(self.directory).down()
        state = self.state() if self.state_file.exists() else None
        marker = str(self.directory)
        pids = dict(state.pids) if state else {}
        known = set(pids.values())
        for extra in _pids_mentioning(marker):
            if extra not in known:
                pids[f"pid-{extra}"] = extra
        killed = [name for name in reversed(list(pids)) if not _stop(pids[name], marker, grace_s)]
        leftover = [p for p in pids.values() if _pid_alive(p, marker)]
        if leftover:
            raise ClusterError(f"processes still running after SIGKILL: {leftover}")
        self.state_file.unlink(missing_ok=True)
        return killed


def _stop(pid: int, marker: str, grace_s: float) -> bool:
    """SIGTERM, then SIGKILL after ``grace_s``; True if the process ended on SIGTERM."""
    if not _pid_alive(pid, marker):
        return True
    _signal(pid, signal.SIGTERM)
    if _wait_gone(pid, marker, grace_s):
        return True
    _signal(pid, signal.SIGKILL)
    if not _wait_gone(pid, marker, 5.0):
        raise ClusterError(f"process {pid} survived SIGKILL")
    return False


def _wait_gone(pid: int, marker: str, timeout_s: float) -> bool:
    until = time.monotonic() + timeout_s
    while _pid_alive(pid, marker):
        _reap(pid)
        if time.monotonic() > until:
            return False
        time.sleep(0.02)
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    """Signal a component and, when it leads its own session, everything it spawned."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _reap(pid: int) -> None:
    """Collect a child we started in this process, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _ancestors() -> set[int]:
    """This process and its parents: `make cluster-down CLUSTER_DIR=...` mentions the dir too."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line names the cluster directory (strays of a lost state file)."""
    skip = _ancestors()
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and int(entry.name) not in skip
        and _pid_alive(int(entry.name), marker)
    ]


def _manifests(directory: Path) -> list[dict[str, Any]]:
    return [
        document
        for path in sorted(directory.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def _condition(obj: dict[str, Any], type_: str) -> str | None:
    for condition in obj.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == type_:
            return str(condition.get("status"))
    return None


def gpu_node(name: str, product: str, gpus: int) -> dict[str, Any]:
    """A fake GPU node, tainted and labelled as GPU feature discovery does."""
    return _node(
        name,
        labels={
            GPU_PRESENT_LABEL: "true",
            GPU_PRODUCT_LABEL: product,
            "nvidia.com/gpu.count": str(gpus),
        },
        taints=[{"key": GPU_TAINT_KEY, "value": "present", "effect": "NoSchedule"}],
        extra_resources={"nvidia.com/gpu": str(gpus)},
    )


def _node(
    name: str,
    labels: dict[str, str],
    taints: list[dict[str, str]] | None = None,
    extra_resources: dict[str, str] | None = None,
) -> dict[str, Any]:
    resources = {
        "cpu": "32",
        "memory": "256Gi",
        "ephemeral-storage": "1Ti",
        "pods": "110",
        **(extra_resources or {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                kwok.MANAGED_LABEL: "true",
                **labels,
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
        },
        "spec": {"taints": taints or []},
        "status": {"allocatable": resources, "capacity": resources},
    }
