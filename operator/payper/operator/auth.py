"""Who is calling the operator: projected ServiceAccount tokens checked with TokenReview.

Demand moves GPUs and usage moves money, so both endpoints accept only the expected
ServiceAccounts, with tokens minted for the operator's audience. A pod-bound token also
names the node its pod runs on, which is how usage reports are tied to their node.
Results are cached by a hash of the token for a short while: a TokenReview per request
would put the API server on the request path.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from payper.kube import Kube

SA_PREFIX = "system:serviceaccount:"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
NEGATIVE_CACHE_S = 5.0


class Unauthenticated(Exception):  # noqa: N818 - maps to HTTP 401
    pass


class Forbidden(Exception):  # noqa: N818 - maps to HTTP 403
    pass


@dataclass(frozen=True)
class Caller:
    username: str
    node_name: str | None = None

    @property
    def service_account(self) -> str | None:
        """``namespace:name`` for a ServiceAccount, else None."""
        if not self.username.startswith(SA_PREFIX):
            return None
        return self.username[len(SA_PREFIX) :]

    def require(self, allowed: Collection[str]) -> None:
        if self.service_account not in allowed:
            raise Forbidden(f"{self.username} may not call this endpoint")


def bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing bearer token")
    return token.strip()


def _first(extra: dict[str, Any], key: str) -> str | None:
    values = extra.get(key) or []
    return str(values[0]) if values else None


class TokenVerifier:
    def __init__(self, kube: Kube, audience: str, cache_s: float = 60.0) -> None:
        self.kube = kube
        self.audience = audience
        self.cache_s = cache_s
        self._cache: dict[bytes, tuple[float, Caller | None]] = {}

    async def verify(self, token: str) -> Caller:
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            if cached[1] is None:
                raise Unauthenticated("token rejected")
            return cached[1]
        review = await self.kube.create(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]},
            },
        )
        status = review.get("status", {})
        if not status.get("authenticated") or self.audience not in (status.get("audiences") or []):
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[digest] = (now + NEGATIVE_CACHE_S, None)
            raise Unauthenticated(status.get("error") or "token rejected")
        user = status.get("user", {})
        extra = user.get("extra") or {}
        caller = Caller(
            username=user.get("username", ""),
            node_name=_first(extra, NODE_NAME_EXTRA),
        )
        self._cache[digest] = (now + self.cache_s, caller)
        return caller
