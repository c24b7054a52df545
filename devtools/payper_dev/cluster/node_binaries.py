"""Build (once) and locate what the real node of the local cluster runs.

The real node is a kubelet with containerd, runc and the CNI plugins, kube-proxy, a
cluster DNS and a registry on loopback. As with the control plane, no release binaries
can be downloaded here, so the Go parts come from the Go module proxy:

- kubelet and kube-proxy with the same Kubernetes version and module recipe as the
  control plane (:func:`payper_dev.cluster.binaries.build_kubernetes`);
- containerd 2.x (daemon, runc shim, ctr), static and without btrfs;
- CoreDNS from a small wrapper module that compiles in only the plugins a cluster DNS
  needs, as the etcd build wraps etcd's server, instead of every cloud plugin;
- the CNCF ``distribution`` registry, to serve images on loopback for the kubelet to
  pull as it would in a real cluster.

NetworkPolicy on the node is enforced by kube-router's network policy controller alone
(its firewall; no routing, no service proxy): iptables rules and ipsets on the bridge.
It is built from its module like the above, into a cache directory of its own keyed by
its version, so that adding or bumping it never rebuilds the other parts.

runc, ipset and the CNI plugins are Debian packages (``.ci/node-packages``). The sandbox
("pause") image is built here too: Kubernetes' own ``build/pause/linux/pause.c``, from
the same k8s.io/kubernetes module, compiled statically with the Debian C compiler and
packaged with buildah into an OCI archive.

Everything is cached under ``~/.cache/payper/bin/node-<versions>/``; a second build is
a no-op.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from payper_dev.cluster import binaries
from payper_dev.cluster.binaries import KUBERNETES_VERSION, BuildError

CONTAINERD_VERSION = "v2.2.9"
COREDNS_VERSION = "v1.15.0"
REGISTRY_VERSION = "v3.1.2"
PAUSE_VERSION = "3.10.2"
KUBE_ROUTER_VERSION = "v2.1.0"
"""The newest kube-router the Go module proxy serves here (later tags answer 403). The
alternative, sigs.k8s.io/kube-network-policies, cannot work on this kind of machine: it
hands packets to user space with the nftables ``queue`` statement, and the kernel is
built without it (``# CONFIG_NFT_QUEUE is not set``; ``nft add rule ... queue num 100``
fails with "No such file or directory"). kube-router needs only iptables matches the
kernel has (set, physdev, conntrack, comment, mark) and ipsets."""
"""The pause version Kubernetes ships with KUBERNETES_VERSION (build/pause/Makefile)."""
PAUSE_IMAGE = f"registry.k8s.io/pause:{PAUSE_VERSION}"
"""The name the sandbox image is imported under (never pulled: built here)."""

KUBE_NODE_BINARIES = ("kubelet", "kube-proxy")
CONTAINERD_BINARIES = ("containerd", "containerd-shim-runc-v2", "ctr")
NODE_BINARIES = (*KUBE_NODE_BINARIES, *CONTAINERD_BINARIES, "coredns", "registry")
PAUSE_ARCHIVE = f"pause-{PAUSE_VERSION}.oci.tar"

COREDNS_PLUGINS = (
    "bind",
    "cache",
    "errors",
    "forward",
    "health",
    "hosts",
    "kubernetes",
    "loadbalance",
    "log",
    "loop",
    "ready",
    "reload",
)
"""The plugins a cluster DNS uses (the Corefile kubeadm writes, plus bind and hosts)."""

DEBIAN_TOOLS = {
    "runc": "runc",
    "buildah": "buildah",
    "gcc": "gcc",
    "iptables": "iptables",
    "nft": "nftables",
    "conntrack": "conntrack",
    "ipset": "ipset",
}
CNI_PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
CNI_PLUGINS = ("bridge", "host-local", "portmap", "loopback")


def versions_tag() -> str:
    return (
        f"k8s-{KUBERNETES_VERSION}_containerd-{CONTAINERD_VERSION}_coredns-{COREDNS_VERSION}"
        f"_registry-{REGISTRY_VERSION}_pause-{PAUSE_VERSION}"
    )


def cached_dir() -> Path:
    return binaries.cache_root() / "bin" / f"node-{versions_tag()}"


def kube_router_dir() -> Path:
    """kube-router's own cache directory: its version alone is the key."""
    return binaries.cache_root() / "bin" / f"kube-router-{KUBE_ROUTER_VERSION}"


def find_kube_router() -> Path | None:
    """The kube-router binary, if built (``PAYPER_KUBE_ROUTER`` names another one)."""
    override = os.environ.get("PAYPER_KUBE_ROUTER")
    if override:
        if not os.access(override, os.X_OK):
            raise BuildError(f"PAYPER_KUBE_ROUTER={override} is not an executable")
        return Path(override)
    binary = kube_router_dir() / "kube-router"
    return binary if os.access(binary, os.X_OK) else None


def coredns_wrapper() -> str:
    imports = "\n".join(f'\t_ "github.com/coredns/coredns/plugin/{p}"' for p in COREDNS_PLUGINS)
    return f"""\
// Built by payper: CoreDNS with only the plugins a cluster DNS needs.
package main

import (
{imports}

\t"github.com/coredns/coredns/coremain"
)

func main() {{ coremain.Run() }}
"""


def missing_tools() -> list[str]:
    """Debian packages the node needs that are not installed (by their package names)."""
    missing = sorted({pkg for tool, pkg in DEBIAN_TOOLS.items() if shutil.which(tool) is None})
    if cni_dir() is None:
        missing.append("containernetworking-plugins")
    return missing


def cni_dir() -> Path | None:
    for directory in CNI_PLUGIN_DIRS:
        if all(os.access(Path(directory) / p, os.X_OK) for p in CNI_PLUGINS):
            return Path(directory)
    return None


def find_dir() -> Path | None:
    """The directory holding every node binary and the pause archive, if built."""
    override = os.environ.get("PAYPER_NODE_BIN")
    directory = Path(override) if override else cached_dir()
    ready = all(os.access(directory / n, os.X_OK) for n in NODE_BINARIES)
    if ready and (directory / PAUSE_ARCHIVE).is_file():
        return directory
    if override:
        raise BuildError(f"PAYPER_NODE_BIN={override} lacks some of {NODE_BINARIES}")
    return None


def _build_kube_node(out: Path, work: Path) -> None:
    binaries.build_kubernetes(out, work, KUBE_NODE_BINARIES, "kubelet")


def _build_containerd(out: Path, work: Path) -> None:
    binaries._write_module(work, "payper.local/build/containerd", "")
    module = "github.com/containerd/containerd/v2"
    packages = [f"{module}/cmd/{name}" for name in CONTAINERD_BINARIES]
    get = ["go", "get", *[f"{p}@{CONTAINERD_VERSION}" for p in packages]]
    binaries._run(get, work, "containerd get")
    ldflags = " ".join(
        [
            "-s -w",
            f"-X {module}/version.Version={CONTAINERD_VERSION}",
            f"-X {module}/version.Revision=payper-build",
            f"-X {module}/version.Package=github.com/containerd/containerd/v2",
        ]
    )
    cmd = ["go", "build", "-v", "-trimpath", "-tags", "no_btrfs", "-ldflags", ldflags]
    binaries._run(
        [*cmd, "-o", str(out) + "/", *packages], work, "containerd build", verbose_build=True
    )


def _build_coredns(out: Path, work: Path) -> None:
    binaries._write_module(work, "payper.local/build/coredns", "")
    (work / "main.go").write_text(coredns_wrapper())
    binaries._run(
        ["go", "get", f"github.com/coredns/coredns@{COREDNS_VERSION}"], work, "coredns get"
    )
    binaries._run(["go", "mod", "tidy"], work, "coredns tidy")
    ldflags = "-s -w -X github.com/coredns/coredns/coremain.GitCommit=payper-build"
    cmd = ["go", "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out / "coredns"), "."]
    binaries._run(cmd, work, "coredns build", verbose_build=True)


def _build_registry(out: Path, work: Path) -> None:
    binaries._write_module(work, "payper.local/build/registry", "")
    package = "github.com/distribution/distribution/v3/cmd/registry"
    binaries._run(["go", "get", f"{package}@{REGISTRY_VERSION}"], work, "registry get")
    version = "github.com/distribution/distribution/v3/version"
    ldflags = f"-s -w -X {version}.version={REGISTRY_VERSION} -X {version}.revision=payper-build"
    cmd = ["go", "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out / "registry")]
    binaries._run([*cmd, package], work, "registry build", verbose_build=True)


def _build_kube_router(out: Path, work: Path) -> None:
    binaries._write_module(work, "payper.local/build/kube-router", "")
    module = "github.com/cloudnativelabs/kube-router/v2"
    package = f"{module}/cmd/kube-router"
    binaries._run(["go", "get", f"{package}@{KUBE_ROUTER_VERSION}"], work, "kube-router get")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ldflags = (
        f"-s -w -X {module}/pkg/version.Version={KUBE_ROUTER_VERSION}"
        f" -X {module}/pkg/version.BuildDate={stamp}"
    )
    cmd = ["go", "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out / "kube-router")]
    binaries._run([*cmd, package], work, "kube-router build", verbose_build=True)


def build_kube_router(force: bool = False) -> Path:
    """Build kube-router once into its own cache directory; returns the binary."""
    existing = None if force else find_kube_router()
    if existing is not None:
        return existing
    if shutil.which("go") is None:
        raise BuildError("`go` is not on PATH; it is needed once to build kube-router")
    out = kube_router_dir()
    staging = out.parent / (out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.monotonic()
    print(f"building kube-router {KUBE_ROUTER_VERSION} ...", file=sys.stderr, flush=True)
    _build_kube_router(staging, binaries.cache_root() / "build" / "kube-router")
    out.mkdir(parents=True, exist_ok=True)
    os.replace(staging / "kube-router", out / "kube-router")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"built kube-router in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return out / "kube-router"


def _kubernetes_source(work: Path) -> Path:
    """The k8s.io/kubernetes module's files (for build/pause), from the module cache."""
    work.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
        cwd=work,
        env=binaries._go_env(work),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise BuildError(f"cannot download k8s.io/kubernetes: {out.stdout}{out.stderr}")
    return Path(json.loads(out.stdout)["Dir"])


def _build_pause(out: Path, work: Path) -> None:
    """Kubernetes' pause binary (static, as its Makefile builds it) and an OCI image of it."""
    if shutil.which("gcc") is None or shutil.which("buildah") is None:
        raise BuildError("the pause image needs gcc and buildah: run `make node-deps`")
    source = _kubernetes_source(work) / "build" / "pause" / "linux" / "pause.c"
    binary = work / "pause"
    flags = ["-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{PAUSE_VERSION}-payper"]
    _checked(["gcc", *flags, "-o", str(binary), str(source)], "pause compile")
    _checked(["strip", str(binary)], "pause strip")
    container = _checked(["buildah", "from", "scratch"], "pause image").strip()
    try:
        _checked(["buildah", "copy", "--chmod", "0755", container, str(binary), "/pause"], "copy")
        _checked(
            [
                "buildah",
                "config",
                "--entrypoint",
                '["/pause"]',
                "--user",
                "65535:65535",
                "--os",
                "linux",
                "--arch",
                "amd64",
                container,
            ],
            "pause config",
        )
        archive = out / PAUSE_ARCHIVE
        archive.unlink(missing_ok=True)
        _checked(
            ["buildah", "commit", "--rm", container, f"oci-archive:{archive}:{PAUSE_IMAGE}"],
            "pause commit",
        )
        container = ""
    finally:
        if container:
            subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


def _checked(cmd: list[str], label: str) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"[{label}] `{' '.join(cmd)}` failed:\n{result.stdout}{result.stderr}")
    return result.stdout


BUILDERS = {
    "kubelet": (KUBE_NODE_BINARIES, _build_kube_node),
    "containerd": (CONTAINERD_BINARIES, _build_containerd),
    "coredns": (("coredns",), _build_coredns),
    "registry": (("registry",), _build_registry),
    "pause": ((PAUSE_ARCHIVE,), _build_pause),
}


def build(force: bool = False) -> Path:
    """Build every missing node binary (and the pause image) into the cache, and
    kube-router into its own; returns the directory of the former."""
    directory = _build_parts(force)
    router = build_kube_router(force)
    print(f"kube-router ready at {router}", file=sys.stderr)
    return directory


def _build_parts(force: bool) -> Path:
    existing = None if force else find_dir()
    if existing is not None:
        print(f"node binaries ready in {existing}", file=sys.stderr)
        return existing
    if shutil.which("go") is None:
        raise BuildError("`go` is not on PATH; it is needed once to build the node binaries")
    out = cached_dir()
    out.mkdir(parents=True, exist_ok=True)
    staging = out.parent / (out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    for label, (names, builder) in BUILDERS.items():
        if not force and all((out / name).is_file() for name in names):
            continue
        started = time.monotonic()
        print(f"building {label} ({', '.join(names)}) ...", file=sys.stderr, flush=True)
        builder(staging, binaries.cache_root() / "build" / f"node-{label}")
        for name in names:
            os.replace(staging / name, out / name)
        print(f"built {label} in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    shutil.rmtree(staging, ignore_errors=True)
    return out
