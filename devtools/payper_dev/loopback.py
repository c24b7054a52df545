"""Small loopback helpers shared by the local cluster, the test stack and the benchmarks.

Everything they start listens on 127.0.0.1: they need a free port to give a server, and
a short GET that says whether an endpoint answers yet (any error or non-2xx is "not yet").
A local cluster's pods get addresses from a loopback /16 of their own: two clusters on
one machine (two test runs, a test run and the demo) must never hand out the same pod
IP, or one's stand-in servers answer the other's requests. ``claimed_pod_range`` holds a
lock file per range for as long as the cluster lives.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

RANGE_LOCKS = Path(os.environ.get("TMPDIR", "/tmp")) / "payper-pod-ranges"
FIRST_RANGE, LAST_RANGE = 2, 250
"""Pod ranges are 127.N.0.0/16 for N in this span (127.0 and 127.1 are left alone)."""


@contextlib.contextmanager
def claimed_pod_range(preferred: int = FIRST_RANGE) -> Iterator[str]:
    """A loopback /16 no other live claimant holds (first free from ``preferred``),
    held until the ``with`` ends (or the process dies: the lock goes with it)."""
    RANGE_LOCKS.mkdir(parents=True, exist_ok=True)
    span = LAST_RANGE - FIRST_RANGE + 1
    for offset in range(span):
        n = FIRST_RANGE + (preferred - FIRST_RANGE + offset) % span
        handle = (RANGE_LOCKS / f"127.{n}.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield f"127.{n}.0.0/16"
        finally:
            handle.close()
        return
    raise RuntimeError(f"every loopback pod range 127.{FIRST_RANGE}-{LAST_RANGE} is claimed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get_text(url: str, cafile: Path | None = None, timeout_s: float = 1) -> str | None:
    """The body of a 2xx answer to GET ``url``; None if it failed or answered otherwise."""
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
            return str(response.read().decode())
    except OSError:
        return None


def http_ok(url: str, cafile: Path | None = None) -> bool:
    return get_text(url, cafile) is not None
