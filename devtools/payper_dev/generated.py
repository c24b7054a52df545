"""The drift check shared by every generated file: CRDs, dashboards, the values reference.

Generated files are written by ``make`` targets and never edited by hand; ``make test``
fails when one differs from what its generator renders now, showing the difference.
"""

from __future__ import annotations

import difflib
from pathlib import Path


def drift(path: Path, wanted: str) -> str:
    """A unified diff from ``path`` to what it should hold; empty when it already does."""
    actual = path.read_text() if path.exists() else ""
    if actual == wanted:
        return ""
    diff = difflib.unified_diff(
        actual.splitlines(keepends=True),
        wanted.splitlines(keepends=True),
        fromfile=str(path),
        tofile=f"{path} (generated)",
    )
    return "".join(diff) or f"{path} is missing"
