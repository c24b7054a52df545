"""One real node in the local cluster: kubelet, containerd, runc, CNI, kube-proxy, DNS,
and NetworkPolicy enforcement.

kwok's pods are timers and loopback processes; nothing about them checks Payper's
images, its chart's pod specs (securityContext, hostPID, hostPath, probes) or the agent's
PID → cgroup → pod resolution. ``payper-dev node up`` adds one real node, ``payper-node``,
to a local cluster started with ``--real-node``; ``payper-dev node down`` removes every
trace of it. It needs root, cgroup v1 or v2 with the cgroupfs driver, overlayfs, network
namespaces and nftables; one node per machine, since some of what it touches is
machine-wide (below).

Network: pods live on the bridge ``payper0``, 198.18.0.0/24 from the range reserved for
network tests (RFC 2544), which the node makes first and whose gateway address
(198.18.0.1) is the node's IP. Pods get routes to that range and to the Service range
only, and an nftables table of the node's own drops anything that would leave the
bridge for another interface, and any packet for the Service range that kube-proxy did
not rewrite: no test can ever address a private or public network. Everything else the
node starts listens on loopback or on 198.18.0.1: the kubelet (its API, for the API
server's logs/exec), CoreDNS (53, behind the kube-dns Service at 10.96.0.10), the
registry (loopback), containerd (a unix socket; its streaming server on loopback).

NetworkPolicy: kube-router's network policy controller, alone (no routing, no service
proxy, no health or metrics listener), enforces policies on the bridge with iptables
rules (``-m physdev --physdev-is-bridged``, so the bridge must pass its frames through
iptables: ``net.bridge.bridge-nf-call-iptables=1``) and ipsets. It reads its own Node
object when it starts, so it starts once the node has registered.

Machine-wide state, recorded at ``up`` and undone at ``down``:

- sysctls the kubelet and the CNI bridge set (``vm.overcommit_memory``, ``kernel.panic``,
  ``kernel.panic_on_oops``, ``net.ipv4.ip_forward``, ...): saved, then restored;
- fixed paths: ``/var/lib/kubelet/device-plugins``, ``/var/log/containers``,
  ``/var/lib/cni``, ``/run/containerd/{s,runc}``, ``/run/netns``: removed when they did
  not exist before;
- pod cgroups, nested under ``/payper-node`` (``cgroupRoot``) in every hierarchy;
- mounts under the node directory (the kubelet's rshared bind mount of its root
  survives its exit), network namespaces, the bridge, the kubelet's iptables chains and
  kube-proxy's nftables tables (``kube-proxy --cleanup``), kube-router's iptables
  chains (``KUBE-ROUTER-*``, ``KUBE-POD-FW-*``, ``KUBE-NWPLCY-*``) and its ipsets.

Pods are deleted (and the node tainted NoExecute, so no controller puts them back)
before the kubelet stops: a restarted kubelet would adopt them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from payper.api.inference_deployment import GPU_PRODUCT_LABEL
from payper.kube import ApiError, Kube, resource_path
from payper_dev.cluster import node_binaries, pki
from payper_dev.cluster.local import (
    GPU_PRESENT_LABEL,
    ClusterError,
    LocalCluster,
    _condition,
    _pid_alive,
    _signal,
    _stop,
    _wait_gone,
)
from payper_dev.loopback import free_port, get_text

NODE_NAME = pki.REAL_NODE_NAME
NODE_IP = pki.REAL_NODE_IP
POD_SUBNET = "198.18.0.0/24"
TEST_NET = "198.18.0.0/15"
BRIDGE = "payper0"
CGROUP_ROOT = "/payper-node"
CLUSTER_DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
NFT_TABLE = "payper-node"
REAL_NODE_LABEL = "payper.dev/real-node"
REAL_NODE_TAINT = {"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}
DOWN_TAINT = {"key": "payper.dev/node-going-down", "value": "true", "effect": "NoExecute"}
LOCK_FILE = Path("/run/payper-node.lock")
GPUS = 1
SERVICE_CIDR = "10.96.0.0/16"
COMPONENTS = (
    "registry",
    "apiserver-proxy",
    "containerd",
    "coredns",
    "kubelet",
    "kube-proxy",
    "kube-router",
)
AFTER_REGISTRATION = frozenset({"kube-router"})
"""Components that read the node's Node object at start: started once it is Ready."""
KUBE_ROUTER_CHAINS = ("KUBE-ROUTER-INPUT", "KUBE-ROUTER-FORWARD", "KUBE-ROUTER-OUTPUT")
IPSET_PREFIXES = ("KUBE-SRC-", "KUBE-DST-", "inet6:KUBE-SRC-", "inet6:KUBE-DST-")
"""kube-router's ipsets: a policy's source and destination pods (IPv4, IPv6)."""
KUBE_ROUTER_TMP_IPSET = re.compile(r"^TMP-[A-Z2-7]{16}$")
"""The swap set of kube-router's ``ipset restore``, left only by a crash mid-restore."""

SYSCTLS = (
    "net.ipv4.ip_forward",
    "vm.overcommit_memory",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)
"""What the kubelet, kube-proxy and the CNI bridge may change; each restored at ``down``."""

SIM_DIR = "/var/lib/payper-sim"
"""Where stand-in model servers on the node publish their busy time for the agent's
simulated backend (the chart's ``agent.simulatedBackend.hostPath``)."""

FIXED_PATHS = (
    "/var/lib/kubelet",
    "/var/lib/payper-agent",
    SIM_DIR,
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
    "/run/netns",
    "/etc/cni",
    "/opt/cni",
)
"""Paths outside the node directory that the kubelet, containerd, CNI or the chart's
hostPath volumes (the agent's state) write to at fixed places; each one that did not
exist before ``up`` is removed at ``down``."""


class NodeError(ClusterError):
    """The real node could not be started or stopped; the message says why."""


@dataclass
class NodeState:
    cluster_dir: str
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    absent_paths: list[str] = field(default_factory=list)
    absent_netns: list[str] = field(default_factory=list)
    nft_tables_before: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    @classmethod
    def load(cls, path: Path) -> NodeState:
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)


def cannot_run() -> str | None:
    """Why this machine cannot run the real node, or None if it can."""
    if os.geteuid() != 0:
        return "the real node needs root (containers, cgroups, network namespaces, nftables)"
    missing = node_binaries.missing_tools()
    if missing:
        return f"missing Debian packages: {' '.join(missing)} (run `make node-deps`)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    if (
        not Path("/sys/fs/cgroup/cpu").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    ):
        return "no cgroup hierarchy found under /sys/fs/cgroup"
    return None


def _sh(*cmd: str, check: bool = True, input: str | None = None, timeout_s: float = 300.0) -> str:
    """Run a command, killed past ``timeout_s``; its stdout. With ``check`` a failure or
    a timeout raises NodeError; without, a timed-out command's output is empty (teardown
    goes on, and its final leftovers check reports what stayed)."""
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, input=input, check=False, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as error:
        if not check:
            return ""
        raise NodeError(f"`{' '.join(cmd)}` did not finish in {timeout_s:.0f}s") from error
    if check and result.returncode != 0:
        raise NodeError(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    values = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = _sysctl_path(name).read_text().strip()
    return values


def cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy's mount point (v1 controllers, named, v2)."""
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2"):
            mounts.append(Path(parts[1]))
    return mounts


def node_cgroups() -> list[Path]:
    """The node's cgroup directories (``/payper-node`` and below) in every hierarchy."""
    found: list[Path] = []
    for mount in cgroup_mounts():
        top = mount / CGROUP_ROOT.lstrip("/")
        if top.is_dir():
            found.extend(p for p in top.rglob("*") if p.is_dir())
            found.append(top)
    return found


def mounts_under(*prefixes: str) -> list[str]:
    """Mount points at or below any prefix, deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def nft_tables() -> list[str]:
    """``family name`` of every nftables table."""
    out = _sh("nft", "list", "tables", check=False)
    return [line.removeprefix("table ").strip() for line in out.splitlines() if line.strip()]


def iptables_kube_chains() -> list[str]:
    """``tool table chain`` for each Kubernetes chain in the iptables tables."""
    chains = []
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            out = _sh(tool, "-w", "-t", table, "-S", check=False)
            for line in out.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "-N" and parts[1].startswith("KUBE-"):
                    chains.append(f"{tool} {table} {parts[1]}")
    return chains


def node_ipsets() -> list[str]:
    """kube-router's ipsets on this machine (none without the ``ipset`` tool)."""
    if shutil.which("ipset") is None:
        return []
    out = _sh("ipset", "list", "-n", check=False)
    return [
        name
        for name in out.split()
        if name.startswith(IPSET_PREFIXES) or KUBE_ROUTER_TMP_IPSET.match(name)
    ]


def bridge_exists() -> bool:
    return Path(f"/sys/class/net/{BRIDGE}").exists()


def leftovers(node_dir: Path | None = None) -> list[str]:
    """Everything of a real node still on this machine (empty after a clean ``down``)."""
    found = []
    if bridge_exists():
        found.append(f"bridge {BRIDGE}")
    found += [f"cgroup {p}" for p in node_cgroups()]
    found += [f"nft table {t}" for t in nft_tables() if "kube-proxy" in t or NFT_TABLE in t]
    found += [f"iptables chain {c}" for c in iptables_kube_chains()]
    found += [f"ipset {s}" for s in node_ipsets()]
    prefixes = ["/var/lib/kubelet", "/run/containerd", "/run/netns"]
    if node_dir is not None:
        prefixes.append(str(node_dir))
    found += [f"mount {m}" for m in mounts_under(*prefixes)]
    found += [
        f"path {p}"
        for p in (
            "/var/lib/kubelet/device-plugins",
            "/var/log/pods",
            "/var/log/containers",
            "/var/lib/cni/results",
            "/run/containerd/s",
            "/run/containerd/runc",
        )
        if Path(p).exists()
    ]
    found += [f"netns {n.name}" for n in _netns() if n.name.startswith("cni-")]
    found += [f"process {pid}" for pid in _pids_in_cgroups()]
    if LOCK_FILE.exists():
        found.append(f"lock {LOCK_FILE}")
    return found


def _netns() -> list[Path]:
    directory = Path("/run/netns")
    return sorted(directory.iterdir()) if directory.is_dir() else []


def _pids_in_cgroups() -> set[int]:
    pids: set[int] = set()
    for directory in node_cgroups():
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
    return pids


class RealNode:
    """The real node of the local cluster in ``cluster_dir`` (its files in ``node/``)."""

    def __init__(self, cluster_dir: Path | str = "build/cluster") -> None:
        self.cluster = LocalCluster(cluster_dir)
        self.directory = self.cluster.directory / "node"
        self.state_file = self.directory / "state.json"
        self.log_dir = self.directory / "logs"
        self.socket = self.directory / "containerd" / "containerd.sock"
        self.timings: dict[str, float] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- queries -------------------------------------------------------------------
    def state(self) -> NodeState | None:
        if not self.state_file.exists():
            return None
        try:
            return NodeState.load(self.state_file)
        except (ValueError, TypeError) as error:
            raise NodeError(f"{self.state_file} is unreadable ({error}); run `down`") from error

    def running(self) -> dict[str, bool]:
        state = self.state()
        if state is None:
            return {}
        return {n: _pid_alive(pid, str(self.directory)) for n, pid in state.pids.items()}

    def is_up(self) -> bool:
        running = self.running()
        return set(running) == set(COMPONENTS) and all(running.values())

    def registry(self) -> str:
        """``127.0.0.1:<port>`` of the node's registry (images: ``<registry>/payper/...``)."""
        state = self.state()
        if state is None or "registry" not in state.ports:
            raise NodeError("the real node is not up")
        return f"127.0.0.1:{state.ports['registry']}"

    # -- start ---------------------------------------------------------------------
    def up(self, timeout_s: float = 180.0) -> None:
        """Start the node, or return at once if it runs."""
        reason = cannot_run()
        if reason:
            raise NodeError(f"this machine cannot run the real node: {reason}")
        cluster_state = self.cluster.state()
        if cluster_state is None or not self.cluster.is_up():
            raise NodeError(f"no local cluster runs in {self.cluster.directory}")
        if not cluster_state.config.real_node:
            raise NodeError(
                "the cluster was started without --real-node (its EndpointSlice controller "
                "is off): restart it with `payper-dev cluster up --real-node`"
            )
        if self.is_up():
            return
        self._refuse_if_another_node_runs()
        if self.state_file.exists() or leftovers(self.directory):
            self.down()
        bin_dir = node_binaries.find_dir() or node_binaries.build()
        node_binaries.find_kube_router() or node_binaries.build_kube_router()
        started = time.monotonic()
        deadline = started + timeout_s
        shutil.rmtree(self.directory, ignore_errors=True)
        self.log_dir.mkdir(parents=True)
        state = NodeState(
            cluster_dir=str(self.cluster.directory),
            sysctls=read_sysctls(),
            absent_paths=[p for p in FIXED_PATHS if not os.path.lexists(p)],
            absent_netns=[],
            nft_tables_before=nft_tables(),
        )
        self._save(state)
        try:
            self._network()
            self.timings["network"] = time.monotonic() - started
            state.ports = {
                "registry": free_port(),
                "kubelet-healthz": free_port(),
                "proxy-healthz": free_port(),
                "proxy-metrics": free_port(),
                "dns-health": free_port(),
                "dns-ready": free_port(),
                "containerd-stream": free_port(),
            }
            _make_cgroup_root()
            # Shared by the stand-in model servers (any user) and the agent (root).
            os.makedirs(SIM_DIR, exist_ok=True)
            os.chmod(SIM_DIR, 0o1777)
            self._write_configs(bin_dir, state)
            asyncio.run(
                self._apply_objects(
                    [
                        *cluster_dns_objects(),
                        *kube_router_objects(),
                        apiserver_slice(self._apiserver_port()),
                    ]
                )
            )
            registered = False
            for name in COMPONENTS:
                if name in AFTER_REGISTRATION and not registered:
                    asyncio.run(self._after_registration(deadline))
                    registered = True
                    self.timings["node ready"] = time.monotonic() - started
                state.pids[name] = self._spawn(name, self._command(name, bin_dir))
                self._save(state)
                self._wait_component(name, state, deadline)
                self.timings[name] = time.monotonic() - started
                if name == "containerd":
                    self._import_pause(bin_dir)
            if not registered:
                asyncio.run(self._after_registration(deadline))
            self.timings["ready"] = time.monotonic() - started
        except BaseException:
            self.down()
            raise

    def _save(self, state: NodeState) -> None:
        """The node directory's state, and the same record machine-wide in LOCK_FILE: it
        marks the one node of this machine, and lets a later ``down`` restore what this
        run changed even if the node directory is gone."""
        state.save(self.state_file)
        state.save(LOCK_FILE)

    def _refuse_if_another_node_runs(self) -> None:
        """One real node per machine: refuse while another one's processes run."""
        other = _lock_record()
        if other is None:
            return
        owner = str(Path(other.cluster_dir) / "node")
        if owner != str(self.directory) and any(
            _pid_alive(pid, owner) for pid in other.pids.values()
        ):
            raise NodeError(
                f"another real node runs on this machine ({owner}): run "
                f"`payper-dev node down --dir {other.cluster_dir}` first"
            )

    def _network(self) -> None:
        """The bridge (gateway address = node IP) and the fence that keeps pods inside it."""
        if not bridge_exists():
            _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "replace", f"{NODE_IP}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        service_cidr = SERVICE_CIDR
        # The host's own connections to Services leave from the node IP, into the bridge
        # (kube-proxy rewrites them to a pod there); gone with the bridge.
        _sh("ip", "route", "replace", service_cidr, "dev", BRIDGE, "src", NODE_IP)
        fence = f"""\
table inet {NFT_TABLE} {{
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname "{BRIDGE}" oifname != "{BRIDGE}" drop
    oifname "{BRIDGE}" iifname != "{BRIDGE}" drop
  }}
  chain output {{
    type filter hook output priority filter - 10; policy accept;
    ip daddr {{ {service_cidr}, {TEST_NET} }} oifname != {{ "{BRIDGE}", "lo" }} drop
  }}
}}
"""
        _sh("nft", "-f", "-", input=fence)
        # kube-router's policy rules match bridged frames (physdev): the bridge must hand
        # them to iptables. Restored at `down` with the other sysctls.
        bridge_nf = _sysctl_path("net.bridge.bridge-nf-call-iptables")
        if not bridge_nf.exists():
            raise NodeError(f"{bridge_nf} is missing: the kernel lacks bridge netfilter")
        bridge_nf.write_text("1")

    def _write_configs(self, bin_dir: Path, state: NodeState) -> None:
        d, p = self.directory, self.cluster.pki_dir
        api = f"https://127.0.0.1:{self._apiserver_port()}"
        for stem in ("node", "kube-proxy", "coredns", "kube-router"):
            _kubeconfig(d / f"{stem}.kubeconfig", api, p, stem)
        cni_dir = node_binaries.cni_dir()
        (d / "cni" / "net.d").mkdir(parents=True)
        (d / "cni" / "net.d" / "10-payper.conflist").write_text(
            json.dumps(cni_config(d / "cni" / "ipam"), indent=2)
        )
        certs = d / "containerd" / "certs.d" / f"127.0.0.1:{state.ports['registry']}"
        certs.mkdir(parents=True)
        (certs / "hosts.toml").write_text(
            f'server = "http://127.0.0.1:{state.ports["registry"]}"\n\n'
            f'[host."http://127.0.0.1:{state.ports["registry"]}"]\n'
            '  capabilities = ["pull", "resolve", "push"]\n  skip_verify = true\n'
        )
        (d / "containerd" / "config.toml").write_text(
            containerd_config(d, self.socket, str(cni_dir), state.ports["containerd-stream"])
        )
        (d / "kubelet.yaml").write_text(
            yaml.safe_dump(kubelet_config(d, p, self.socket, state.ports["kubelet-healthz"]))
        )
        (d / "kube-proxy.yaml").write_text(
            yaml.safe_dump(
                kube_proxy_config(
                    d / "kube-proxy.kubeconfig",
                    state.ports["proxy-healthz"],
                    state.ports["proxy-metrics"],
                )
            )
        )
        (d / "Corefile").write_text(
            corefile(d / "coredns.kubeconfig", state.ports["dns-health"], state.ports["dns-ready"])
        )
        (d / "registry.yaml").write_text(
            yaml.safe_dump(registry_config(d / "registry-data", state.ports["registry"]))
        )

    def _command(self, name: str, bin_dir: Path) -> list[str]:
        d = self.directory
        if name == "registry":
            return [str(bin_dir / "registry"), "serve", str(d / "registry.yaml")]
        if name == "apiserver-proxy":
            port = self._apiserver_port()
            return [
                sys.executable,
                "-m",
                "payper_dev.cluster.tcpproxy",
                f"--listen={NODE_IP}:{port}",
                f"--to=127.0.0.1:{port}",
                f"--owner={d}",
            ]
        if name == "containerd":
            return [str(bin_dir / "containerd"), "--config", str(d / "containerd" / "config.toml")]
        if name == "coredns":
            return [str(bin_dir / "coredns"), "-conf", str(d / "Corefile")]
        if name == "kubelet":
            return [
                str(bin_dir / "kubelet"),
                f"--config={d / 'kubelet.yaml'}",
                f"--kubeconfig={d / 'node.kubeconfig'}",
                f"--root-dir={d / 'kubelet'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={REAL_NODE_LABEL}=true",
                "--v=1",
            ]
        if name == "kube-proxy":
            return [str(bin_dir / "kube-proxy"), f"--config={d / 'kube-proxy.yaml'}", "--v=1"]
        if name == "kube-router":
            router = node_binaries.find_kube_router()
            if router is None:
                raise NodeError("kube-router is not built: run `payper-dev node build`")
            return kube_router_command(router, d / "kube-router.kubeconfig")
        raise NodeError(f"unknown component {name}")

    def _spawn(self, name: str, command: list[str]) -> int:
        log = (self.log_dir / f"{name}.log").open("ab")
        env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"}
        try:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.directory,
                env=env,
            )
        finally:
            log.close()
        self._children[name] = process
        return process.pid

    def _log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_component(self, name: str, state: NodeState, deadline: float) -> None:
        ports = state.ports
        probes: dict[str, Callable[[], bool]] = {
            "registry": lambda: get_text(f"http://127.0.0.1:{ports['registry']}/v2/") is not None,
            "apiserver-proxy": lambda: _connects(NODE_IP, self._apiserver_port()),
            "containerd": self.socket.exists,
            "coredns": lambda: get_text(f"http://127.0.0.1:{ports['dns-ready']}/ready") == "OK",
            "kubelet": lambda: (
                get_text(f"http://127.0.0.1:{ports['kubelet-healthz']}/healthz") == "ok"
            ),
            "kube-proxy": lambda: (
                get_text(f"http://127.0.0.1:{ports['proxy-healthz']}/healthz") is not None
            ),
            # No health listener (it would bind every interface): its top-level chains,
            # which it makes before its first policy sync.
            "kube-router": kube_router_chains_ready,
        }
        while not probes[name]():
            child = self._children[name]
            if child.poll() is not None:
                raise NodeError(
                    f"{name} exited during start-up; its log ends:\n" + self._log_tail(name)
                )
            if time.monotonic() > deadline:
                raise NodeError(f"{name} not ready in time; its log ends:\n" + self._log_tail(name))
            time.sleep(0.1)

    def _apiserver_port(self) -> int:
        state = self.cluster.state()
        if state is None:
            raise NodeError(f"no local cluster in {self.cluster.directory}")
        return state.ports["apiserver"]

    def ctr(self, *args: str, bin_dir: Path | None = None) -> str:
        directory = bin_dir or node_binaries.find_dir()
        if directory is None:
            raise NodeError("node binaries are not built")
        return _sh(str(directory / "ctr"), "--address", str(self.socket), "-n", "k8s.io", *args)

    def _import_pause(self, bin_dir: Path) -> None:
        archive = bin_dir / node_binaries.PAUSE_ARCHIVE
        self.ctr("images", "import", "--local", str(archive), bin_dir=bin_dir)

    def push(self, archive: Path, name: str) -> str:
        """Push an OCI archive into the node's registry as ``<registry>/<name>``, as CI
        pushes to a real registry; returns the image reference pods use."""
        registry = self.registry()
        image_id = _sh("buildah", "pull", "--quiet", f"oci-archive:{archive}").strip()
        _sh(
            "buildah",
            "push",
            "--quiet",
            "--tls-verify=false",
            image_id.splitlines()[-1],
            f"docker://{registry}/{name}",
        )
        return f"{registry}/{name}"

    async def _apply_objects(self, documents: list[dict[str, Any]]) -> None:
        async with Kube.connect(self.cluster.kubeconfig) as kube:
            for document in documents:
                await _apply(kube, document)

    async def _after_registration(self, deadline: float) -> None:
        """Wait for the node to be Ready, then make it a GPU node."""
        async with Kube.connect(self.cluster.kubeconfig) as kube:
            node_path = resource_path("v1", "nodes", name=NODE_NAME)
            while True:
                node = await kube.get_or_none(node_path)
                if node is not None and _condition(node, "Ready") == "True":
                    break
                for name, child in self._children.items():
                    if child.poll() is not None:
                        raise NodeError(f"{name} exited; its log ends:\n" + self._log_tail(name))
                if time.monotonic() > deadline:
                    raise NodeError(
                        "the node did not become Ready in time; kubelet log:\n"
                        + self._log_tail("kubelet")
                    )
                await asyncio.sleep(0.2)
            # Extended resources are advertised by a status patch (as a device plugin
            # would); the kubelet keeps what it does not manage itself.
            gpus = {"nvidia.com/gpu": str(GPUS)}
            await kube.patch(
                f"{node_path}/status",
                {"status": {"capacity": gpus, "allocatable": gpus}},
            )
            await kube.patch(
                node_path,
                {
                    "metadata": {
                        "labels": {
                            GPU_PRESENT_LABEL: "true",
                            GPU_PRODUCT_LABEL: "NVIDIA-Real-Node-Simulated",
                            "nvidia.com/gpu.count": str(GPUS),
                        }
                    }
                },
            )

    # -- stop ----------------------------------------------------------------------
    def down(self, grace_s: float = 10.0) -> list[str]:
        """Remove the node and everything it left on the machine; returns what remains
        (empty unless something could not be removed, which raises NodeError)."""
        self._refuse_if_another_node_runs()
        # This directory's record or, if it is gone (a crashed run), the machine's.
        state = self.state() or _lock_record()
        marker = str(self.directory)
        if state is not None and self.cluster.is_up():
            with contextlib.suppress(Exception):
                asyncio.run(self._drain(timeout_s=60.0))
        pids = dict(state.pids) if state else {}
        for name in ("kube-router", "kube-proxy", "kubelet", "coredns", "apiserver-proxy"):
            if name in pids:
                _stop(pids[name], marker, grace_s)
        self._kill_pods()
        for name in ("containerd", "registry"):
            if name in pids:
                _stop(pids[name], marker, grace_s)
        # A crashed run's processes (its shims outlive containerd) and mounts are under
        # its own directory, which the machine-wide record names.
        recorded = Path(state.cluster_dir) / "node" if state is not None else self.directory
        directories = sorted({self.directory, recorded})
        for directory in directories:
            self._kill_strays(str(directory))
        bin_dir = node_binaries.find_dir()
        if bin_dir is not None:
            _sh(str(bin_dir / "kube-proxy"), "--cleanup", check=False)
        self._remove_network_state(state)
        self._unmount(directories)
        self._remove_cgroups()
        if state is not None:
            self._remove_paths(state)
            self._restore_sysctls(state)
        self.state_file.unlink(missing_ok=True)
        LOCK_FILE.unlink(missing_ok=True)
        remaining = [item for d in directories for item in leftovers(d)]
        if remaining:
            raise NodeError("the real node left behind: " + "; ".join(remaining))
        return remaining

    async def _drain(self, timeout_s: float) -> None:
        """Taint NoExecute, delete every pod on the node and wait until the kubelet has
        removed them, so no container outlives the kubelet that would adopt it again."""
        async with Kube.connect(self.cluster.kubeconfig) as kube:
            node_path = resource_path("v1", "nodes", name=NODE_NAME)
            node = await kube.get_or_none(node_path)
            if node is None:
                return
            taints = [t for t in node["spec"].get("taints", []) if t["key"] != DOWN_TAINT["key"]]
            await kube.patch(
                node_path,
                {"spec": {"taints": [*taints, DOWN_TAINT]}},
            )
            deadline = time.monotonic() + timeout_s
            selector = f"spec.nodeName={NODE_NAME}"
            while time.monotonic() < deadline:
                pods = (await kube.list(resource_path("v1", "pods"), {"fieldSelector": selector}))[
                    "items"
                ]
                if not pods:
                    break
                for pod in pods:
                    meta = pod["metadata"]
                    path = resource_path("v1", "pods", meta["namespace"], meta["name"])
                    with contextlib.suppress(ApiError):
                        await kube.delete(path, {"gracePeriodSeconds": "1"})
                await asyncio.sleep(0.5)
            with contextlib.suppress(ApiError):
                await kube.delete(node_path)
            slice_path = resource_path(
                "discovery.k8s.io/v1", "endpointslices", "default", "kubernetes-real-node"
            )
            with contextlib.suppress(ApiError):
                await kube.delete(slice_path)

    def _kill_pods(self) -> None:
        """SIGKILL every process still in the node's pod cgroups (after the kubelet)."""
        for _ in range(50):
            pids = _pids_in_cgroups()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def _kill_strays(self, marker: str) -> None:
        """Shims and anything else whose command line names the node directory."""
        skip = {os.getpid(), os.getppid()}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) not in skip:
                pid = int(entry.name)
                if _pid_alive(pid, marker):
                    _signal(pid, signal.SIGKILL)
                    _wait_gone(pid, marker, 5.0)

    def _remove_network_state(self, state: NodeState | None) -> None:
        for netns in _netns():
            if netns.name.startswith("cni-"):
                for point in mounts_under(str(netns)):
                    subprocess.run(["umount", "-l", point], capture_output=True, check=False)
                netns.unlink(missing_ok=True)
        if bridge_exists():
            _sh("ip", "link", "del", BRIDGE, check=False)
        for chain in iptables_kube_chains():
            tool, table, name = chain.split()
            _sh(tool, "-w", "-t", table, "-F", name, check=False)
        for table_chain in _kube_jumps():
            _sh(*table_chain, check=False)
        for chain in iptables_kube_chains():
            tool, table, name = chain.split()
            _sh(tool, "-w", "-t", table, "-X", name, check=False)
        # kube-router's sets, once no rule refers to them.
        for name in node_ipsets():
            _sh("ipset", "destroy", name, check=False)
        before = set(state.nft_tables_before) if state else set()
        for table in nft_tables():
            family, name = table.split(maxsplit=1)
            ours = name in (NFT_TABLE, "kube-proxy")
            emptied = table not in before and not _nft_has_rules(family, name)
            if ours or emptied:
                _sh("nft", "delete", "table", family, name, check=False)

    def _unmount(self, directories: list[Path]) -> None:
        prefixes = [*map(str, directories), "/var/lib/kubelet", "/run/containerd", "/run/netns"]
        for _ in range(3):
            points = mounts_under(*prefixes)
            if not points:
                return
            for point in points:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def _remove_cgroups(self) -> None:
        for _ in range(50):
            directories = sorted(node_cgroups(), key=lambda p: -len(p.parts))
            if not directories:
                return
            for directory in directories:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            time.sleep(0.1)

    def _remove_paths(self, state: NodeState) -> None:
        for path in state.absent_paths:
            if os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True)
        for path in ("/var/lib/kubelet/device-plugins", "/var/lib/cni/results"):
            shutil.rmtree(path, ignore_errors=True)
        for path in ("/run/containerd/s", "/run/containerd/runc"):
            shutil.rmtree(path, ignore_errors=True)
        for link in (
            Path("/var/log/containers").glob("*.log")
            if Path("/var/log/containers").is_dir()
            else []
        ):
            if str(os.readlink(link)).startswith(str(self.directory)):
                link.unlink()

    def _restore_sysctls(self, state: NodeState) -> None:
        now = read_sysctls()
        for name, value in state.sysctls.items():
            if now.get(name) != value:
                with contextlib.suppress(OSError):
                    _sysctl_path(name).write_text(value)


def _lock_record() -> NodeState | None:
    try:
        return NodeState.load(LOCK_FILE)
    except (OSError, ValueError, TypeError):
        return None


def _connects(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def apiserver_slice(port: int) -> dict[str, Any]:
    """The ``kubernetes`` Service's endpoint for pods: the forwarder on the node IP (the
    API server's own endpoint reconciler is off: it would publish 127.0.0.1)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes-real-node",
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "payper-dev",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    }


def _make_cgroup_root() -> None:
    """``cgroupRoot`` in every hierarchy (the kubelet makes only what is below it); a v1
    cpuset child starts with no CPUs or memory nodes, so it gets its parent's."""
    for mount in cgroup_mounts():
        directory = mount / CGROUP_ROOT.lstrip("/")
        directory.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (mount / name).exists() and not (directory / name).read_text().strip():
                (directory / name).write_text((mount / name).read_text())


def _nft_has_rules(family: str, name: str) -> bool:
    out = _sh("nft", "list", "table", family, name, check=False)
    return any(
        line.strip() and not line.strip().startswith(("table", "chain", "type", "}", "policy"))
        for line in out.splitlines()
    )


def _kube_jumps() -> list[tuple[str, ...]]:
    """``-D`` commands for rules in built-in chains that jump to a KUBE- chain (split as a
    shell would: kube-router's comments are quoted and have spaces)."""
    commands = []
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            out = _sh(tool, "-w", "-t", table, "-S", check=False)
            for line in out.splitlines():
                parts = shlex.split(line)
                if (
                    len(parts) > 2
                    and parts[0] == "-A"
                    and not parts[1].startswith("KUBE-")
                    and ("KUBE-" in line)
                ):
                    commands.append((tool, "-w", "-t", table, "-D", *parts[1:]))
    return commands


async def _apply(kube: Kube, document: dict[str, Any]) -> None:
    api = document["apiVersion"]
    plural = {
        "Service": "services",
        "EndpointSlice": "endpointslices",
        "ClusterRole": "clusterroles",
        "ClusterRoleBinding": "clusterrolebindings",
    }
    meta = document["metadata"]
    path = resource_path(api, plural[document["kind"]], meta.get("namespace"), meta["name"])
    await kube.apply(path, document, "payper-node")


def _kubeconfig(path: Path, server: str, pki_dir: Path, stem: str) -> None:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "payper-local",
                "cluster": {"server": server, "certificate-authority": str(pki_dir / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": stem,
                "user": {
                    "client-certificate": str(pki_dir / f"{stem}.crt"),
                    "client-key": str(pki_dir / f"{stem}.key"),
                },
            }
        ],
        "contexts": [
            {"name": "payper-local", "context": {"cluster": "payper-local", "user": stem}}
        ],
        "current-context": "payper-local",
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    path.chmod(0o600)


def cni_config(ipam_dir: Path) -> dict[str, Any]:
    """The pod network: the bridge made first, no masquerading, routes only to the test
    range and the Service range (no default route: a pod can address nothing else)."""
    return {
        "cniVersion": "1.0.0",
        "name": "payper",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [
                        [{"subnet": POD_SUBNET, "rangeStart": "198.18.0.10", "gateway": NODE_IP}]
                    ],
                    "routes": [{"dst": TEST_NET}, {"dst": "10.96.0.0/16"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def containerd_config(directory: Path, socket: Path, cni_bin: str, stream_port: int) -> str:
    c = directory / "containerd"
    return f"""\
version = 3
root = "{c / "root"}"
state = "{c / "state"}"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{c / "opt"}"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.image-verifier.v1.bindir"]
  bin_dir = "{c / "image-verifier"}"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "{stream_port}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{node_binaries.PAUSE_IMAGE}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{c / "certs.d"}"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{directory / "cni" / "net.d"}"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{shutil.which("runc") or "runc"}"
        Root = "{c / "runc"}"
        SystemdCgroup = false
"""


def kubelet_config(
    directory: Path, pki_dir: Path, socket: Path, healthz_port: int
) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki_dir / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki_dir / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki_dir / "kubelet-serving.key"),
        "containerRuntimeEndpoint": f"unix://{socket}",
        "imageServiceEndpoint": f"unix://{socket}",
        # cgroup v1 is deprecated; the pinned Kubernetes still runs on it when told to.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": CGROUP_ROOT,
        "failSwapOn": False,
        # Negative oom_score_adj is refused on this kind of VM.
        "oomScoreAdj": 0,
        "clusterDNS": [CLUSTER_DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        # No host resolver for pods: nothing outside the cluster is to be resolved.
        "resolvConf": "",
        "podLogsDir": str(directory / "pod-logs"),
        "registerWithTaints": [REAL_NODE_TAINT],
        "makeIPTablesUtilChains": False,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 99,
        "imageGCLowThresholdPercent": 98,
        "maxPods": 40,
        "serializeImagePulls": False,
        "shutdownGracePeriod": "0s",
        "nodeStatusReportFrequency": "10s",
    }


def kube_proxy_config(kubeconfig: Path, healthz_port: int, metrics_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": POD_SUBNET,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        # NodePorts only on the bridge address, never on the machine's own interfaces.
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # Leave the machine's conntrack settings alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


def corefile(kubeconfig: Path, health_port: int, ready_port: int) -> str:
    """Cluster names only: no ``forward``, so no query ever leaves the machine."""
    return f"""\
.:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} payper-local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    loop
    loadbalance
}}
"""


def registry_config(storage: Path, port: int) -> dict[str, Any]:
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "debug": {"addr": ""}},
    }


def kube_router_command(binary: Path, kubeconfig: Path) -> list[str]:
    """kube-router as the node's NetworkPolicy enforcer only."""
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={NODE_NAME}",
        "--run-firewall=true",
        "--run-router=false",
        "--run-service-proxy=false",
        "--run-loadbalancer=false",
        "--enable-ipv4=true",
        "--enable-ipv6=false",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # No listener on the machine's interfaces: health and metrics off.
        "--health-port=0",
        "--metrics-port=0",
        "--cache-sync-timeout=60s",
        "--iptables-sync-period=1m",
        "--v=1",
    ]


def kube_router_chains_ready() -> bool:
    """kube-router's top-level chains exist and the built-in chains jump to them."""
    rules = _sh("iptables", "-w", "-t", "filter", "-S", check=False).splitlines()
    return all(
        f"-N {chain}" in rules and any(r.endswith(f"-j {chain}") for r in rules)
        for chain in KUBE_ROUTER_CHAINS
    )


def user_read_access(user: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A ClusterRole of ``rules`` bound to the client-certificate user ``user`` (a node
    component's identity), both named after it."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": user},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": user},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": user,
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        },
    ]


def kube_router_objects() -> list[dict[str, Any]]:
    """kube-router's read access: the informers it starts (its policy controller uses
    pods, namespaces, policies and its Node; it starts the rest whatever it runs)."""
    return user_read_access(
        "payper:kube-router",
        [
            {
                "apiGroups": [""],
                "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": ["networking.k8s.io"],
                "resources": ["networkpolicies"],
                "verbs": ["list", "watch"],
            },
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            },
        ],
    )


def cluster_dns_objects() -> list[dict[str, Any]]:
    """CoreDNS's read access, and the kube-dns Service at CLUSTER_DNS_IP with a slice
    that points at CoreDNS on the node IP (it runs beside the kubelet, not in a pod)."""
    return [
        *user_read_access(
            "payper:coredns",
            [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        ),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "kube-dns",
                "namespace": "kube-system",
                "labels": {"k8s-app": "kube-dns"},
            },
            "spec": {
                "clusterIP": CLUSTER_DNS_IP,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-node",
                "namespace": "kube-system",
                "labels": {
                    "kubernetes.io/service-name": "kube-dns",
                    "endpointslice.kubernetes.io/managed-by": "payper-dev",
                },
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": [NODE_IP], "conditions": {"ready": True}, "nodeName": NODE_NAME}
            ],
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ],
        },
    ]
