"""A component's own identity: its projected ServiceAccount token, read from a file.

Kubernetes rotates projected tokens in place, so the file is re-read at most every
``refresh_s`` seconds rather than once at start.
"""

from __future__ import annotations

import time
from pathlib import Path

DEFAULT_AUDIENCE = "payper-operator"


class TokenFile:
    def __init__(self, path: str | Path, refresh_s: float = 30.0) -> None:
        self.path = Path(path)
        self.refresh_s = refresh_s
        self._token = ""
        self._read_at = float("-inf")

    def token(self) -> str:
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            self._token = self.path.read_text().strip()
            self._read_at = now
        return self._token

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}
