"""Build (once) and locate the control-plane binaries of the local cluster.

There is no Docker here and no download site for release binaries, only the Go module
proxy. So etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok and
helm are compiled from pinned module versions, with version ldflags so that each binary
reports the version it is (tools misbehave when they see ``v0.0.0``). The result is cached
outside the repository under ``~/.cache/payper/bin/<versions>/``; a second build is a
no-op. Users with release binaries point ``PAYPER_K8S_BIN`` at them (or put them on PATH)
and skip the build entirely.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KUBERNETES_VERSION = "v1.37.2"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"
KUBE_SCORE_VERSION = "v1.20.0"
"""The chart tests' policy check; built into the same directory."""

KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
ALL_BINARIES = (*KUBE_BINARIES, "etcd", "kwok", "helm", "kube-score")

ETCD_WRAPPER = """\
// Built by payper: etcd's server module has no installable main package.
package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""


class BuildError(RuntimeError):
    """A binary could not be built; the message says which step failed and why."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "payper"


def versions_tag() -> str:
    return f"k8s-{KUBERNETES_VERSION}_etcd-{ETCD_VERSION}_kwok-{KWOK_VERSION}_helm-{HELM_VERSION}"


def cached_bin_dir() -> Path:
    return cache_root() / "bin" / versions_tag()


def _dir_has_all(directory: Path, names: tuple[str, ...]) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in names)


def find_bin_dir() -> Path | None:
    """The one directory that holds every binary: PAYPER_K8S_BIN, the build cache, or the
    directory on PATH that has them all; None when they still need building."""
    override = os.environ.get("PAYPER_K8S_BIN")
    if override:
        directory = Path(override)
        missing = [n for n in ALL_BINARIES if not os.access(directory / n, os.X_OK)]
        if missing:
            raise BuildError(f"PAYPER_K8S_BIN={override} lacks: {', '.join(missing)}")
        return directory
    cached = cached_bin_dir()
    if _dir_has_all(cached, ALL_BINARIES):
        return cached
    apiserver = shutil.which("kube-apiserver")
    if apiserver is not None and _dir_has_all(Path(apiserver).parent, ALL_BINARIES):
        return Path(apiserver).parent
    return None


def binary(name: str) -> str:
    """Absolute path of one cluster binary; raises BuildError if none is built yet."""
    directory = find_bin_dir()
    if directory is None:
        raise BuildError(
            f"{name} is not built yet: run `payper-dev cluster build` (or `make binaries`) "
            "once, or set PAYPER_K8S_BIN to a directory with release binaries"
        )
    return str(directory / name)


@dataclass
class _Progress:
    """Prints one line every few seconds while `go` compiles, so a long build shows life."""

    label: str
    started: float = field(default_factory=time.monotonic)
    packages: int = 0
    last: str = ""

    def line(self, text: str) -> None:
        text = text.strip()
        if text and not text.startswith(("go: ", "#")):
            self.packages += 1
            self.last = text

    def report(self) -> None:
        elapsed = int(time.monotonic() - self.started)
        print(
            f"  [{self.label}] {elapsed:>4d}s  {self.packages} packages compiled  {self.last}",
            file=sys.stderr,
            flush=True,
        )


def _go_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    # No DWARF: the binaries are stripped anyway (-s -w), and the compiler does less.
    env.setdefault("GOFLAGS", "-mod=mod -gcflags=all=-dwarf=false")
    env["CGO_ENABLED"] = "0"
    env["GOWORK"] = "off"
    env.setdefault("GOTOOLCHAIN", "local")
    return env


def _run(
    cmd: list[str],
    work: Path,
    label: str,
    verbose_build: bool = False,
    env: dict[str, str] | None = None,
) -> None:
    progress = _Progress(label)
    proc = subprocess.Popen(
        cmd,
        cwd=work,
        env={**_go_env(work), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tail: list[str] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(15):
            progress.report()

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    assert proc.stdout is not None
    for raw in proc.stdout:
        tail = [*tail[-39:], raw.rstrip()]
        if verbose_build:
            progress.line(raw)
    code = proc.wait()
    stop.set()
    thread.join()
    if code != 0:
        raise BuildError(
            f"[{label}] `{' '.join(cmd)}` failed with exit code {code}:\n" + "\n".join(tail)
        )


def _write_module(work: Path, module: str, body: str) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(f"module {module}\n\ngo 1.26.0\n{body}")
    (work / "go.sum").unlink(missing_ok=True)


def _module_gomod(work: Path, module_at_version: str) -> str:
    out = subprocess.run(
        ["go", "mod", "download", "-json", module_at_version],
        cwd=work,
        env=_go_env(work),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise BuildError(f"cannot download {module_at_version}: {out.stdout}{out.stderr}")
    info = json.loads(out.stdout)
    return Path(info["GoMod"]).read_text()


def _staging_modules(kubernetes_gomod: str) -> list[str]:
    """The k8s.io/* modules that k8s.io/kubernetes replaces with ./staging/src paths."""
    names = []
    for line in kubernetes_gomod.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("./staging/"):
            names.append(parts[0])
    if not names:
        raise BuildError("found no staging replace lines in k8s.io/kubernetes go.mod")
    return names


def _build_kube(out: Path, work: Path) -> None:
    build_kubernetes(out, work, KUBE_BINARIES, "kube")


def build_kubernetes(out: Path, work: Path, names: tuple[str, ...], label: str) -> None:
    """Build ``k8s.io/kubernetes/cmd/<name>`` for each name, with the module recipe that
    every Kubernetes binary here shares: a wrapper module requiring k8s.io/kubernetes, its
    staging modules replaced by their published versions, and version ldflags."""
    _write_module(work, "payper.local/build/kube", "")
    gomod = _module_gomod(work, f"k8s.io/kubernetes@{KUBERNETES_VERSION}")
    staging_version = "v0." + KUBERNETES_VERSION.split(".", 1)[1]
    replaces = "\n".join(f"\t{m} => {m} {staging_version}" for m in _staging_modules(gomod))
    _write_module(
        work,
        "payper.local/build/kube",
        f"\nrequire k8s.io/kubernetes {KUBERNETES_VERSION}\n\nreplace (\n{replaces}\n)\n",
    )
    packages = [f"k8s.io/kubernetes/cmd/{name}" for name in names]
    _run(["go", "get", *[f"{p}@{KUBERNETES_VERSION}" for p in packages]], work, f"{label} get")
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    base = "k8s.io/component-base/version"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ldflags = " ".join(
        [
            "-s -w",
            f"-X {base}.gitVersion={KUBERNETES_VERSION}",
            f"-X {base}.gitMajor={major}",
            f"-X {base}.gitMinor={minor}",
            f"-X {base}.gitTreeState=clean",
            f"-X {base}.buildDate={stamp}",
            f"-X k8s.io/client-go/pkg/version.gitVersion={KUBERNETES_VERSION}",
            f"-X k8s.io/client-go/pkg/version.gitMajor={major}",
            f"-X k8s.io/client-go/pkg/version.gitMinor={minor}",
        ]
    )
    cmd = ["go", "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out) + "/"]
    _run([*cmd, *packages], work, f"{label} build", verbose_build=True)


def _build_etcd(out: Path, work: Path) -> None:
    _write_module(work, "payper.local/build/etcd", "")
    (work / "main.go").write_text(ETCD_WRAPPER)
    _run(["go", "get", f"go.etcd.io/etcd/server/v3@{ETCD_VERSION}"], work, "etcd get")
    _run(["go", "mod", "tidy"], work, "etcd tidy")
    ldflags = "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=payper-build"
    cmd = ["go", "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out / "etcd"), "."]
    _run(cmd, work, "etcd build", verbose_build=True)


def _build_kwok(out: Path, work: Path) -> None:
    _write_module(work, "payper.local/build/kwok", "")
    _run(["go", "get", f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}"], work, "kwok get")
    ldflags = f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}"
    cmd = ["go", "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out / "kwok")]
    _run([*cmd, "sigs.k8s.io/kwok/cmd/kwok"], work, "kwok build", verbose_build=True)


def _build_helm(out: Path, work: Path) -> None:
    _write_module(work, "payper.local/build/helm", "")
    _run(["go", "get", f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"], work, "helm get")
    _, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    ldflags = " ".join(
        [
            "-s -w",
            f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
            "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1",
            f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={minor}",
            "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1",
            f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={minor}",
        ]
    )
    cmd = ["go", "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out / "helm")]
    _run([*cmd, "helm.sh/helm/v3/cmd/helm"], work, "helm build", verbose_build=True)


def _build_kube_score(out: Path, work: Path) -> None:
    _write_module(work, "payper.local/build/kube-score", "")
    package = "github.com/zegl/kube-score/cmd/kube-score"
    _run(["go", "get", f"{package}@{KUBE_SCORE_VERSION}"], work, "kube-score get")
    ldflags = f"-s -w -X main.version={KUBE_SCORE_VERSION}"
    cmd = ["go", "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out / "kube-score")]
    _run([*cmd, package], work, "kube-score build", verbose_build=True)


BUILDERS = {
    "etcd": (("etcd",), _build_etcd),
    "kwok": (("kwok",), _build_kwok),
    "helm": (("helm",), _build_helm),
    "kube-score": (("kube-score",), _build_kube_score),
    "kube": (KUBE_BINARIES, _build_kube),
}


def build(force: bool = False) -> Path:
    """Build every missing binary into the cache and return its directory."""
    existing = None if force else find_bin_dir()
    if existing is not None:
        print(f"cluster binaries ready in {existing}", file=sys.stderr)
        return existing
    if shutil.which("go") is None:
        raise BuildError("`go` is not on PATH; it is needed once to build the cluster binaries")
    out = cached_bin_dir()
    out.mkdir(parents=True, exist_ok=True)
    staging = out.parent / (out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    for label, (names, builder) in BUILDERS.items():
        if not force and _dir_has_all(out, names):
            continue
        started = time.monotonic()
        print(f"building {label} ({', '.join(names)}) ...", file=sys.stderr, flush=True)
        builder(staging, cache_root() / "build" / label)
        for name in names:
            os.replace(staging / name, out / name)
        print(f"built {label} in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    shutil.rmtree(staging, ignore_errors=True)
    return out
