"""How kopf logs in: with the same credentials as ``payper.kube`` (one configuration)."""

from __future__ import annotations

from typing import Any

import kopf

from payper.operator.handlers import Memo, registry


@kopf.on.login(registry=registry)
def login(memo: Memo, **kwargs: Any) -> kopf.ConnectionInfo:
    cfg = memo.controller.kube.credentials.configuration
    authorization = memo.controller.kube.credentials.authorization()
    scheme, _sep, bearer = (authorization or "").partition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        scheme=scheme or None,
        token=bearer or None,
    )
