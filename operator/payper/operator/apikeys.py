"""API key Secrets, checked: which keys the gateway may accept, and what is wrong with the rest.

The gateway faces the internet and reads no Secrets; the operator reads each Secret of type
``payper.dev/api-keys`` and publishes only the SHA-256 digests of its acceptable keys in
the deployment's status. Pure: a Secret object (as the API server sends it) in, a
``KeyCheck`` out, so every kind of bad input is unit-tested without a cluster.

Rules, in order:

- More than ``MAX_API_KEYS`` entries: the whole Secret is refused (no subset would be a
  fair choice), checked before anything is decoded.
- Each entry on its own: base64 (as the API server stores it), surrounding whitespace
  stripped (a trailing newline from ``--from-file`` is common), then printable ASCII only
  (an HTTP header carries it), at least ``MIN_API_KEY_CHARS`` characters (unsalted digests
  of short keys can be brute-forced) and at most ``MAX_API_KEY_BYTES``. A refused entry
  is never accepted; the Secret's other keys still are, so one bad key added during a
  rotation does not lock every client out. The condition names each refused entry (by its
  data key, never its value).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from payper.api.inference_deployment import (
    API_KEY_SECRET_TYPE,
    MAX_API_KEY_BYTES,
    MAX_API_KEYS,
    MIN_API_KEY_CHARS,
    api_key_digest,
)

MAX_NAMED = 5
"""Refused entries named one by one in a condition; the rest are counted."""
_MAX_ENCODED = (MAX_API_KEY_BYTES + 2) // 3 * 4 + 64
"""A base64 value longer than this cannot hold an acceptable key (leeway for whitespace)."""

# Condition reasons (ApiKeysAccepted and Degraded).
ACCEPTED = "Accepted"
SECRET_NOT_FOUND = "ApiKeySecretNotFound"
NO_KEYS = "NoApiKeys"
TOO_MANY_KEYS = "TooManyApiKeys"
KEYS_REFUSED = "ApiKeysRefused"
KEYS_REQUIRED = "ApiKeysRequired"


@dataclass(frozen=True)
class KeyCheck:
    """The verdict on one Secret (or on its absence)."""

    digests: tuple[str, ...]
    """SHA-256 hex of each acceptable key, sorted and without duplicates."""
    refused: tuple[tuple[str, str], ...] = ()
    """(data key, why) of each refused entry, sorted by data key."""
    problem: tuple[str, str] | None = None
    """(reason, message) when the Secret as a whole gives no key."""

    @property
    def ok(self) -> bool:
        return self.problem is None and not self.refused


def missing() -> KeyCheck:
    return KeyCheck((), problem=(SECRET_NOT_FOUND, ""))


def _entry_problem(value: Any) -> tuple[str | None, bytes | None]:
    """(why it is refused, None) or (None, the key)."""
    if not isinstance(value, str):
        return "is not a base64 string", None
    if len(value) > _MAX_ENCODED:
        return f"is longer than {MAX_API_KEY_BYTES} bytes", None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "is not valid base64", None
    key = raw.strip(b" \t\r\n")
    if not key:
        return "is empty", None
    if any(byte < 0x21 or byte > 0x7E for byte in key):
        return "holds characters other than printable ASCII (not UTF-8, spaces or controls)", None
    if len(key) < MIN_API_KEY_CHARS:
        return (
            f"is shorter than {MIN_API_KEY_CHARS} characters (unsalted digests of short "
            "keys can be brute-forced)",
            None,
        )
    if len(key) > MAX_API_KEY_BYTES:
        return f"is longer than {MAX_API_KEY_BYTES} bytes", None
    return None, key


def check_secret(secret: Mapping[str, Any]) -> KeyCheck:
    """The verdict on a Secret object; never raises, whatever it holds."""
    if secret.get("type") != API_KEY_SECRET_TYPE:
        return missing()
    data = secret.get("data")
    if data is None or (isinstance(data, Mapping) and not data):
        return KeyCheck((), problem=(NO_KEYS, "it has no data entries"))
    if not isinstance(data, Mapping):
        return KeyCheck((), problem=(NO_KEYS, "its data is not a map of entries"))
    if len(data) > MAX_API_KEYS:
        return KeyCheck(
            (),
            problem=(
                TOO_MANY_KEYS,
                f"it has {len(data)} entries, more than the {MAX_API_KEYS} keys a deployment "
                "may have, so none of them is accepted",
            ),
        )
    digests: set[str] = set()
    refused: list[tuple[str, str]] = []
    for name, value in data.items():
        why, key = _entry_problem(value)
        if key is None:
            refused.append((str(name)[:253], why or "is refused"))
        else:
            digests.add(api_key_digest(key))
    return KeyCheck(tuple(sorted(digests)), tuple(sorted(refused)))


def describe(check: KeyCheck, secret_name: str) -> tuple[bool, str, str]:
    """The ApiKeysAccepted condition: (status, reason, message)."""
    where = f"Secret {secret_name} (type {API_KEY_SECRET_TYPE})"
    none = "no request is accepted (and none wakes the deployment)"
    if check.problem is not None:
        reason, detail = check.problem
        if reason == SECRET_NOT_FOUND:
            return (
                False,
                reason,
                f"there is no {where} in this namespace: {none}; create it, with one data "
                f"entry per key of at least {MIN_API_KEY_CHARS} characters",
            )
        return False, reason, f"{where}: {detail}: {none}"
    accepted = len(check.digests)
    if not check.refused:
        plural = "key is" if accepted == 1 else "keys are"
        return True, ACCEPTED, f"{accepted} {plural} accepted from {where}"
    named = "; ".join(f"entry {name!r} {why}" for name, why in check.refused[:MAX_NAMED])
    more = len(check.refused) - MAX_NAMED
    if more > 0:
        named += f"; and {more} more"
    outcome = f"the other {accepted} accepted" if accepted else none
    count = "1 entry" if len(check.refused) == 1 else f"{len(check.refused)} entries"
    verb = "is" if len(check.refused) == 1 else "are"
    return False, KEYS_REFUSED, f"{count} of {where} {verb} refused, {outcome}: {named}"


def required_but_unset() -> tuple[bool, str, str]:
    return (
        False,
        KEYS_REQUIRED,
        "the platform requires API keys for every deployment (gateway.requireAuth): set "
        f"spec.auth.secretName to a Secret of type {API_KEY_SECRET_TYPE}; until then no "
        "request is accepted",
    )
