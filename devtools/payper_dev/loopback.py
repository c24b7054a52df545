"""Small loopback helpers shared by the local cluster, the test stack and the benchmarks.

Everything they start listens on 127.0.0.1: they need a free port to give a server, and
a short GET that says whether an endpoint answers yet (any error or non-2xx is "not yet").
"""

from __future__ import annotations

import socket
import ssl
import urllib.request
from pathlib import Path


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
