"""Which InferenceDeployment a request is for: by Host, else by path prefix.

``summarizer.team-a.<domain>/v1/x`` and ``/team-a/summarizer/v1/x`` both reach
``team-a/summarizer`` with upstream path ``/v1/x`` (the path prefix is stripped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Route:
    namespace: str
    name: str
    path: str
    """Upstream path with query string."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def route(host: str | None, path_qs: str, domain: str) -> Route | None:
    if host:
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        hostname = hostname.lower().rstrip(".")
        suffix = "." + domain.lower()
        if hostname.endswith(suffix):
            parts = hostname[: -len(suffix)].split(".")
            if len(parts) == 2 and all(_LABEL.match(p) for p in parts):
                return Route(namespace=parts[1], name=parts[0], path=path_qs or "/")
            return None
    if not path_qs.startswith("/"):
        return None
    path, sep, query = path_qs.partition("?")
    segments = path.split("/", 3)
    if len(segments) < 3 or not _LABEL.match(segments[1]) or not _LABEL.match(segments[2]):
        return None
    rest = "/" + (segments[3] if len(segments) == 4 else "")
    return Route(namespace=segments[1], name=segments[2], path=rest + (sep + query if sep else ""))
