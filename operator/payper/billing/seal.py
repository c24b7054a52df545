"""Seals: the ledger adopts only BillingRecords it created itself.

RBAC alone does not stop a tenant from pre-creating next hour's record at price 0 (tenant
admins often hold ``payper.dev/*``), and the chart's admission policy may be switched
off. So every record the ledger creates carries an HMAC of its namespace, name and spec
(``payper.dev/seal``), keyed by a secret only the operator reads (a Secret in its own
namespace, made at first start). A record found under the name the ledger wants, whose
seal does not verify, is foreign: the ledger leaves it alone and keeps the real record in
its own namespace instead (as for a deleted namespace: ``<namespace>.<name>``).

Records from before seals existed carry none: one is adopted only if its spec is exactly
what the ledger would create now (same plan, prices and product), and sealed from then on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any

from payper.kube import ApiError, Kube, resource_path

ANNOTATION = "payper.dev/seal"
SECRET_NAME = "payper-ledger-seal"
SECRET_KEY = "key"


def seal(key: bytes, namespace: str, name: str, spec: Mapping[str, Any]) -> str:
    message = json.dumps([namespace, name, spec], sort_keys=True, separators=(",", ":"))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def verify(key: bytes, record: Mapping[str, Any]) -> bool | None:
    """True: sealed by this key; False: a seal that does not verify; None: no seal."""
    meta = record["metadata"]
    found = (meta.get("annotations") or {}).get(ANNOTATION)
    if found is None:
        return None
    expected = seal(key, meta.get("namespace", ""), meta["name"], record.get("spec") or {})
    return hmac.compare_digest(found, expected)


async def load_key(kube: Kube, namespace: str) -> bytes:
    """The ledger's sealing key: read, or made once (a second operator racing to make it
    reads the winner's)."""
    path = resource_path("v1", "secrets", namespace, SECRET_NAME)
    found = await kube.get_or_none(path)
    if found is None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": SECRET_NAME,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/part-of": "payper"},
            },
            "data": {SECRET_KEY: base64.b64encode(secrets.token_bytes(32)).decode()},
        }
        try:
            found = await kube.create(resource_path("v1", "secrets", namespace), body)
        except ApiError as error:
            if not error.conflict:
                raise
            found = await kube.get(path)
    return base64.b64decode(found["data"][SECRET_KEY])
