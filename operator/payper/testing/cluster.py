"""A handle on a running local cluster for tests, the demo and benchmarks.

Wraps the kubeconfig with the two ways tests talk to the cluster: ``kubectl`` (what users
type, so acceptance tests use it verbatim) and the async ``payper.kube`` client.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from payper.cluster import binaries
from payper.kube import Kube

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

    def kube(self) -> Kube:
        return Kube.connect(self.kubeconfig)

    def namespace(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        return name


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
