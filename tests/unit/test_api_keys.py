"""API key Secrets checked by the operator: what is published, what is refused, and why.

Every kind of bad input the Secret can hold (no data, not base64, not UTF-8, spaces,
short keys, huge keys, thousands of keys) ends in a clear verdict, never an exception and
never a partial list of the wrong keys.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payper.api.inference_deployment import (
    MAX_API_KEYS,
    InferenceDeploymentSpec,
    InferenceDeploymentStatus,
)
from payper.billing.config import PlanChoice
from payper.operator import apikeys, status
from payper.operator.autoscaler import Policy
from payper.operator.state import Tracked

GOOD = "sk-" + "A1b2" * 10  # 43 characters
OTHER = "sk-" + "z9" * 20


def _b64(value: bytes | str) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode()


def _secret(data: Any, type_: str = "payper.dev/api-keys") -> dict[str, Any]:
    secret: dict[str, Any] = {"metadata": {"namespace": "ns", "name": "keys"}, "type": type_}
    if data is not None:
        secret["data"] = data
    return secret


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_every_acceptable_key_is_published_as_its_digest_only() -> None:
    check = apikeys.check_secret(
        _secret({"alice": _b64(GOOD), "bob": _b64(OTHER + "\n"), "again": _b64(GOOD)})
    )
    assert check.ok
    assert check.digests == tuple(sorted({_sha(GOOD), _sha(OTHER)}))
    ok, reason, message = apikeys.describe(check, "keys")
    assert (ok, reason) == (True, "Accepted")
    assert "2 keys are accepted" in message
    assert GOOD not in repr(check)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (_b64("short-key"), "shorter than 32 characters"),
        (_b64("x" * 31), "shorter than 32 characters"),
        (_b64(b"\xff\xfe" + b"a" * 40), "printable ASCII"),
        (_b64("caf\u00e9-" + "a" * 40), "printable ASCII"),
        (_b64("two words " + "a" * 40), "printable ASCII"),
        (_b64("a" * 20 + "\x00" + "a" * 20), "printable ASCII"),
        (_b64(""), "empty"),
        (_b64(" \n"), "empty"),
        ("%%% not base64 %%%", "not valid base64"),
        (12345, "not a base64 string"),
        (None, "not a base64 string"),
        (_b64("a" * 4097), "longer than 4096 bytes"),
        ("A" * (14 * 1024 * 1024), "longer than 4096 bytes"),  # a 10 MB key, encoded
    ],
)
def test_a_bad_entry_is_refused_by_name_and_the_others_still_work(value: Any, why: str) -> None:
    started = time.monotonic()
    check = apikeys.check_secret(_secret({"good": _b64(GOOD), "bad": value}))
    assert time.monotonic() - started < 0.5, "a huge value is refused without decoding it"
    assert check.digests == (_sha(GOOD),)
    assert len(check.refused) == 1
    assert check.refused[0][0] == "bad"
    assert why in check.refused[0][1]
    ok, reason, message = apikeys.describe(check, "keys")
    assert (ok, reason) == (False, "ApiKeysRefused")
    assert "'bad'" in message
    assert why in message
    assert "the other 1 accepted" in message


def test_only_short_keys_means_nothing_is_accepted() -> None:
    check = apikeys.check_secret(_secret({"a": _b64("key-alice-1"), "b": _b64("key-bob-1")}))
    assert check.digests == ()
    ok, reason, message = apikeys.describe(check, "keys")
    assert (ok, reason) == (False, "ApiKeysRefused")
    assert "no request is accepted" in message
    assert "'a'" in message
    assert "'b'" in message


@pytest.mark.parametrize(
    ("secret", "reason", "words"),
    [
        (_secret(None), "NoApiKeys", "no data entries"),
        (_secret({}), "NoApiKeys", "no data entries"),
        (_secret(["a", "b"]), "NoApiKeys", "not a map"),
        (
            _secret({f"k{i}": _b64(GOOD) for i in range(5000)}),
            "TooManyApiKeys",
            f"5000 entries, more than the {MAX_API_KEYS}",
        ),
        (_secret({"a": _b64(GOOD)}, type_="Opaque"), "ApiKeySecretNotFound", "no Secret keys"),
    ],
)
def test_a_secret_that_gives_no_key_refuses_everything(
    secret: dict[str, Any], reason: str, words: str
) -> None:
    check = apikeys.check_secret(secret)
    assert check.digests == ()
    assert check.problem is not None
    ok, got_reason, message = apikeys.describe(check, "keys")
    assert (ok, got_reason) == (False, reason)
    assert words in message
    assert "no request is accepted" in message


def test_the_bound_is_inclusive_and_many_refusals_are_counted_not_listed() -> None:
    at_bound = apikeys.check_secret(
        _secret({f"k{i:03}": _b64(f"{GOOD}-{i}") for i in range(MAX_API_KEYS)})
    )
    assert at_bound.ok
    assert len(at_bound.digests) == MAX_API_KEYS
    many_bad = apikeys.check_secret(_secret({f"k{i:03}": _b64("short") for i in range(20)}))
    message = apikeys.describe(many_bad, "keys")[2]
    assert "20 entries" in message
    assert "and 15 more" in message
    assert len(message) < 2000


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=20),
        st.one_of(st.binary(max_size=80).map(_b64), st.text(max_size=80), st.integers()),
        max_size=MAX_API_KEYS + 3,
    )
)
def test_any_secret_gives_a_verdict_and_only_good_keys(data: dict[str, Any]) -> None:
    check = apikeys.check_secret(_secret(data))
    message = apikeys.describe(check, "keys")[2]
    assert message
    if len(data) > MAX_API_KEYS:
        assert check.digests == ()
        return
    accepted = set()
    for value in data.values():
        try:
            key = base64.b64decode(value, validate=True).strip(b" \t\r\n")
        except Exception:
            continue
        if len(key) >= 32 and all(0x21 <= b <= 0x7E for b in key):
            accepted.add(hashlib.sha256(key).hexdigest())
    assert set(check.digests) == accepted
    assert len(check.refused) + len(check.digests) <= len(data)


# -- the status the operator publishes ---------------------------------------------------
GRANTED = PlanChoice("default", ("default",), True, None)


def _tracked(auth: str | None) -> Tracked:
    raw: dict[str, Any] = {
        "template": {
            "spec": {"containers": [{"name": "s", "image": "i", "ports": [{"containerPort": 80}]}]}
        }
    }
    if auth:
        raw["auth"] = {"secretName": auth}
    spec = InferenceDeploymentSpec.model_validate(raw)
    return Tracked(
        "ns", "llm", "uid", 1, spec=spec, policy=Policy.from_spec(spec.scaling), replicas=0
    )


def _conditions(result: InferenceDeploymentStatus) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in result.conditions}


def test_status_publishes_digests_with_the_secret_name() -> None:
    check = apikeys.check_secret(_secret({"a": _b64(GOOD)}))
    result = status.compute(_tracked("keys"), [], "u", 1_000, GRANTED, check)
    assert result.auth is not None
    assert result.to_wire()["auth"] == {"secretName": "keys", "keyDigests": [_sha(GOOD)]}
    conditions = _conditions(result)
    assert conditions["ApiKeysAccepted"][:2] == ("True", "Accepted")
    assert conditions["Degraded"][:2] == ("False", "AsExpected")
    # The status round-trips through the CRD's model (bounds included).
    assert InferenceDeploymentStatus.model_validate(result.to_wire()) == result


def test_status_of_a_missing_or_refused_secret_publishes_nothing_and_says_why() -> None:
    missing = status.compute(_tracked("keys"), [], "u", 1_000, GRANTED, None)
    assert missing.auth is not None
    assert missing.auth.key_digests == []
    conditions = _conditions(missing)
    assert conditions["ApiKeysAccepted"][:2] == ("False", "ApiKeySecretNotFound")
    assert conditions["Degraded"][:2] == ("True", "ApiKeySecretNotFound")
    assert conditions["Ready"][:2] == ("False", "ApiKeySecretNotFound")

    short = apikeys.check_secret(_secret({"a": _b64("key-alice-1")}))
    conditions = _conditions(status.compute(_tracked("keys"), [], "u", 1_000, GRANTED, short))
    assert conditions["ApiKeysAccepted"][:2] == ("False", "ApiKeysRefused")
    assert "shorter than 32 characters" in conditions["Degraded"][2]


def test_status_without_auth_has_no_key_condition_unless_the_platform_requires_keys() -> None:
    open_status = status.compute(_tracked(None), [], "u", 1_000, GRANTED)
    assert open_status.auth is None
    assert "ApiKeysAccepted" not in _conditions(open_status)
    required = status.compute(_tracked(None), [], "u", 1_000, GRANTED, None, keys_required=True)
    conditions = _conditions(required)
    assert conditions["ApiKeysAccepted"][:2] == ("False", "ApiKeysRequired")
    assert "spec.auth.secretName" in conditions["ApiKeysAccepted"][2]
    assert conditions["Degraded"][:2] == ("True", "ApiKeysRequired")
