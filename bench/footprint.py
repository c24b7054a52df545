"""Benchmark: what ships, side by side with a baseline, in one run.

For the baseline (a git ref, by default the last commit before the structure work) and
the current tree: build the payper wheel (``pip wheel --no-deps``), install it without
extras into a fresh virtualenv, and measure
- the wheel's size and its files;
- the installed size (the whole site-packages, dependencies included, and payper's own);
- payper-operator's resident memory on the local cluster, leading, with N
  InferenceDeployments at zero reconciled (RSS now and peak, after a quiet period).

    .venv/bin/python bench/footprint.py [--baseline bf7e2dd] [--deployments 200]

Needs PyPI (or a warm pip cache) for the two virtualenvs.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

from payper.kube import Kube, resource_path
from payper_dev.cluster.local import ClusterConfig
from payper_dev.testing.cluster import ClusterHandle, eventually, local_cluster
from payper_dev.testing.stack import Stack, StackOptions, inference_deployment

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"
NAMESPACE = "bench-footprint"
BASELINE = "bf7e2dd"


@dataclass
class Build:
    name: str
    wheel_bytes: int
    wheel_files: int
    site_packages_bytes: int
    payper_bytes: int
    python: str
    rss_mib: float = 0.0
    rss_peak_mib: float = 0.0


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(name: str, source: Path, scratch: Path) -> Build:
    wheels = scratch / f"wheel-{name}"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        check=True,
    )
    (wheel,) = wheels.glob("payper-*.whl")
    environment = scratch / f"venv-{name}"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True)
    (site,) = environment.glob("lib/python*/site-packages")
    return Build(
        name=name,
        wheel_bytes=wheel.stat().st_size,
        wheel_files=len(zipfile.ZipFile(wheel).namelist()),
        site_packages_bytes=_tree_bytes(site),
        payper_bytes=_tree_bytes(site / "payper") + _tree_bytes(site / "payper_agent"),
        python=str(python),
    )


def source_of(ref: str | None, scratch: Path) -> Path:
    """A clean copy of the tree at ``ref`` (HEAD's files when None)."""
    target = scratch / f"src-{ref or 'HEAD'}"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref or "HEAD"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def _rss(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def _reconciled(kubeconfig: Path) -> bool:
    async with Kube.connect(kubeconfig) as kube:
        items = (
            await kube.list(resource_path("payper.dev/v1alpha1", "inferencedeployments", NAMESPACE))
        )["items"]
    return all(
        i.get("status", {}).get("observedGeneration") == i["metadata"]["generation"] for i in items
    )


def measure_operator(handle: ClusterHandle, item: Build, scratch: Path, quiet_s: float) -> None:
    stack = Stack(handle, scratch / f"stack-{item.name}", StackOptions(python=item.python))
    stack.ensure_system()
    operator = stack.start_operator(identity=f"bench-{item.name}")
    try:
        eventually(lambda: asyncio.run(_reconciled(handle.kubeconfig)), 300, 1, "reconciled")
        time.sleep(quiet_s)
        assert operator.popen is not None
        item.rss_mib, item.rss_peak_mib = _rss(operator.popen.pid)
    finally:
        operator.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default=BASELINE, help="git ref of the baseline")
    parser.add_argument("--deployments", type=int, default=200)
    parser.add_argument("--quiet-seconds", type=float, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="payper-bench-footprint-") as tmp:
        scratch = Path(tmp)
        builds = [
            build("baseline", source_of(args.baseline, scratch), scratch),
            build("current", source_of(None, scratch), scratch),
        ]
        config = ClusterConfig(pod_cidr="127.14.0.0/16", crds_dir=str(CRDS))
        with local_cluster(scratch / "cluster", config) as handle:
            handle.kubectl("create", "namespace", NAMESPACE)
            items = []
            for index in range(args.deployments):
                manifest = inference_deployment(f"d-{index:04d}", runner=False)
                manifest["metadata"]["namespace"] = NAMESPACE
                items.append(manifest)
            handle.apply_items(items, verb="create", timeout=300)
            for item in builds:  # one at a time: the Lease lets one lead
                measure_operator(handle, item, scratch, args.quiet_seconds)
    base, now = builds
    mib = 1024 * 1024
    print(f"baseline: {args.baseline}; current: HEAD; {args.deployments} deployments at zero")
    print(f"{'':34}{'baseline':>12}{'current':>12}{'ratio':>8}")
    rows = [
        ("wheel (KiB)", base.wheel_bytes / 1024, now.wheel_bytes / 1024),
        ("wheel files", base.wheel_files, now.wheel_files),
        (
            "installed site-packages (MiB)",
            base.site_packages_bytes / mib,
            now.site_packages_bytes / mib,
        ),
        ("installed payper itself (KiB)", base.payper_bytes / 1024, now.payper_bytes / 1024),
        ("operator RSS (MiB)", base.rss_mib, now.rss_mib),
        ("operator RSS peak (MiB)", base.rss_peak_mib, now.rss_peak_mib),
    ]
    for label, was, is_ in rows:
        print(f"{label:34}{was:>12.1f}{is_:>12.1f}{is_ / was:>8.2f}")


if __name__ == "__main__":
    main()
