"""A handle on a running local cluster for tests, the demo and benchmarks.

Wraps the kubeconfig with the two ways tests talk to the cluster: ``kubectl`` (what users
type, so acceptance tests use it verbatim) and the async ``payper.kube`` client.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from payper.kube import Kube
from payper_dev.cluster import binaries
from payper_dev.cluster.local import ClusterConfig, LocalCluster
from payper_dev.cluster.node import RealNode

T = TypeVar("T")


@dataclass
class ClusterHandle:
    kubeconfig: Path
    pod_cidr: str
    cold_start_ms: int

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [binaries.binary("kubectl"), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    def get_json(self, *args: str) -> Any:
        """``kubectl get ARGS -o json``, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply_items(
        self, items: list[dict[str, Any]], *args: str, verb: str = "apply", timeout: float = 60
    ) -> None:
        """Send manifests in one ``kubectl VERB -f -`` call, as a List."""
        self.kubectl(
            verb,
            *args,
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
            timeout=timeout,
        )

    def install_crds(self, crds_dir: Path) -> None:
        """Apply Payper's CRDs and wait until the API server serves them."""
        self.kubectl("apply", "-f", str(crds_dir))
        self.kubectl(
            "wait",
            "--for=condition=Established",
            "crd",
            "-l",
            "app.kubernetes.io/part-of=payper",
            "--timeout=60s",
        )

    def kube(self) -> Kube:
        return Kube.connect(self.kubeconfig)

    def namespace(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        return name


@dataclass
class NodeCluster:
    """A local cluster with the real node, and the images pushed to the node's registry."""

    handle: ClusterHandle
    node: RealNode
    model_server_image: str
    payper_image: str


@contextmanager
def local_cluster(directory: Path, config: ClusterConfig) -> Iterator[ClusterHandle]:
    """A fresh local cluster in ``directory``, taken down on the way out."""
    local = LocalCluster(directory)
    kubeconfig = local.up(config)
    try:
        yield ClusterHandle(kubeconfig, config.pod_cidr, config.cold_start_ms)
    finally:
        local.down()


def eventually(
    probe: Callable[[], T | None], timeout_s: float, interval_s: float = 0.1, what: str = ""
) -> T:
    """Poll ``probe`` until it returns something truthy; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(
        f"timed out after {timeout_s}s waiting for {what or probe}; last: {last!r}"
    )
