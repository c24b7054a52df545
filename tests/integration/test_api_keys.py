"""API keys end to end, with ``gateway.requireAuth`` on: the gateway reads no Secrets.

The operator checks each key Secret and publishes the SHA-256 digests of its acceptable
keys in the deployment's status; the gateway accepts what was published and nothing else.
One stack (operator and gateway as the chart's ServiceAccounts, with the chart's RBAC) for
the module, with requireAuth set on both; every test has its own namespace.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from payper_dev.testing.cluster import ClusterHandle, eventually
from payper_dev.testing.stack import SYSTEM_NAMESPACE, Stack, StackOptions, inference_deployment
from payper_dev.testing.stack import running as running_stack

ROTATION_LIMIT_S = 10.0
"""Key rotation takes effect within this long (watch, one autoscaler tick, watch)."""
KEY_A = "team-a-" + "0123456789abcdef" * 3
KEY_B = "team-b-" + "fedcba9876543210" * 3


@pytest.fixture(scope="module")
def stack(
    crds_installed: ClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    options = StackOptions(require_auth=True)
    with running_stack(crds_installed, tmp_path_factory.mktemp("keys"), options) as started:
        yield started


def _b64(value: str | bytes) -> str:
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()


def key_secret(name: str, **entries: str | bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "payper.dev/api-keys",
        "data": {entry: _b64(value) for entry, value in entries.items()},
    }


def apply(cluster: ClusterHandle, namespace: str, manifest: dict[str, Any]) -> None:
    """Server-side apply: a client-side apply would copy a large Secret into an annotation
    (at most 256 KiB), and entries left out of the next apply are removed."""
    cluster.kubectl(*SSA, "-n", namespace, "-f", "-", input=json.dumps(manifest))


SSA = ("apply", "--server-side", "--force-conflicts", "--field-manager=test")


def infd(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    return dict(cluster.get_json("infd", name, "-n", namespace))


def condition(
    cluster: ClusterHandle, namespace: str, name: str, type_: str, reason: str | None = None
) -> dict[str, Any] | None:
    for cond in infd(cluster, namespace, name).get("status", {}).get("conditions", []):
        if cond["type"] == type_ and reason in (None, cond["reason"]):
            return dict(cond)
    return None


def published(cluster: ClusterHandle, namespace: str, name: str) -> list[str]:
    auth = infd(cluster, namespace, name).get("status", {}).get("auth") or {}
    return list(auth.get("keyDigests", []))


def replicas(cluster: ClusterHandle, namespace: str, name: str) -> int:
    deployment = cluster.get_json("deployment", name, "-n", namespace)
    return int(deployment["spec"].get("replicas", 0))


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def call(
    http: aiohttp.ClientSession,
    stack: Stack,
    namespace: str,
    name: str,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    async with http.post(
        f"{stack.gateway_url}/{namespace}/{name}/v1/infer", json={"ms": 10}, headers=sent
    ) as response:
        return response.status, dict(response.headers), await response.read()


async def until_status(
    http: aiohttp.ClientSession,
    stack: Stack,
    namespace: str,
    name: str,
    key: str,
    wanted: int,
    limit_s: float,
) -> None:
    deadline = time.monotonic() + limit_s
    while (status := (await call(http, stack, namespace, name, key))[0]) != wanted:
        assert time.monotonic() < deadline, f"{key[:8]}…: {status}, not {wanted} in {limit_s}s"
        await asyncio.sleep(0.1)


def test_the_gateway_may_read_no_secret_and_the_operator_only_list_and_watch(
    stack: Stack,
) -> None:
    cluster = stack.cluster

    def can(account: str, verb: str, namespace: str | None = None) -> str:
        scope = ["-n", namespace] if namespace else ["-A"]
        return cluster.kubectl(
            "auth",
            "can-i",
            verb,
            "secrets",
            *scope,
            f"--as=system:serviceaccount:{SYSTEM_NAMESPACE}:{account}",
            check=False,
        ).stdout.strip()

    for verb in ("get", "list", "watch", "create", "update", "delete"):
        assert can("payper-gateway", verb) == "no", verb
        assert can("payper-gateway", verb, SYSTEM_NAMESPACE) == "no", verb
        assert can("payper-gateway", verb, "kube-system") == "no", verb
    for verb in ("list", "watch"):
        assert can("payper-operator", verb) == "yes", verb
    for verb in ("update", "patch", "delete"):
        assert can("payper-operator", verb) == "no", verb
    # And for real: the gateway's own credentials are refused.
    denied = cluster.kubectl(
        "--kubeconfig",
        str(stack.kubeconfig_of("payper-gateway")),
        "get",
        "secrets",
        "-A",
        check=False,
    )
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()


async def test_a_valid_key_works_and_a_rotation_takes_effect_within_seconds(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    apply(cluster, namespace, key_secret("keys", alice=KEY_A))
    stack.deploy(namespace, inference_deployment("llm", auth_secret="keys", idle_timeout_s=60))
    eventually(lambda: published(cluster, namespace, "llm") == [sha(KEY_A)], 20, what="A published")
    accepted = condition(cluster, namespace, "llm", "ApiKeysAccepted", "Accepted")
    assert accepted is not None
    assert accepted["status"] == "True"
    assert KEY_A not in json.dumps(infd(cluster, namespace, "llm"))
    await until_status(http, stack, namespace, "llm", KEY_A, 200, 20)
    assert (await call(http, stack, namespace, "llm", KEY_B))[0] == 401

    rotated_at = time.monotonic()
    apply(cluster, namespace, key_secret("keys", alice=KEY_B))
    await asyncio.to_thread(
        eventually,
        lambda: published(cluster, namespace, "llm") == [sha(KEY_B)],
        ROTATION_LIMIT_S,
        0.1,
        "B published",
    )
    left = ROTATION_LIMIT_S - (time.monotonic() - rotated_at)
    await until_status(http, stack, namespace, "llm", KEY_A, 401, left)
    await until_status(http, stack, namespace, "llm", KEY_B, 200, left)
    took = time.monotonic() - rotated_at
    assert took < ROTATION_LIMIT_S
    print(f"rotation took effect in {took:.2f}s")

    # Deleting the Secret revokes every key.
    cluster.kubectl("delete", "secret", "keys", "-n", namespace)
    await until_status(http, stack, namespace, "llm", KEY_B, 401, ROTATION_LIMIT_S)
    gone = eventually(
        lambda: condition(cluster, namespace, "llm", "Degraded", "ApiKeySecretNotFound"), 10
    )
    assert "no request is accepted" in gone["message"]


async def test_short_and_malformed_keys_are_refused_with_a_condition(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    apply(cluster, namespace, key_secret("keys", weak="key-alice-1"))
    stack.deploy(namespace, inference_deployment("weak", auth_secret="keys", idle_timeout_s=60))
    refused = eventually(
        lambda: condition(cluster, namespace, "weak", "Degraded", "ApiKeysRefused"),
        20,
        what="Degraded=ApiKeysRefused",
    )
    assert refused["status"] == "True"
    assert "'weak'" in refused["message"]
    assert "shorter than 32 characters" in refused["message"]
    assert "no request is accepted" in refused["message"]
    assert published(cluster, namespace, "weak") == []
    assert (await call(http, stack, namespace, "weak", "key-alice-1"))[0] == 401
    await asyncio.sleep(2.5)
    assert replicas(cluster, namespace, "weak") == 0, "a refused key wakes nothing"

    # A good key beside bad ones: the bad ones stay refused, by name; the good one works.
    apply(
        cluster,
        namespace,
        key_secret(
            "keys",
            weak="key-alice-1",
            latin1=b"\xe9t\xe9-" + b"x" * 40,
            huge="h" * 900_000,
            good=KEY_A,
        ),
    )
    mixed = eventually(
        lambda: (
            (c := condition(cluster, namespace, "weak", "ApiKeysAccepted", "ApiKeysRefused"))
            and "'huge'" in c["message"]
            and c
        ),
        ROTATION_LIMIT_S,
        what="three entries refused",
    )
    assert "3 entries" in mixed["message"]
    assert "printable ASCII" in mixed["message"]
    assert "longer than 4096 bytes" in mixed["message"]
    assert "the other 1 accepted" in mixed["message"]
    assert published(cluster, namespace, "weak") == [sha(KEY_A)]
    await until_status(http, stack, namespace, "weak", KEY_A, 200, 20)

    # Thousands of keys: the whole Secret is refused, never a partial list.
    apply(cluster, namespace, key_secret("keys", **{f"k{i}": f"{KEY_B}-{i}" for i in range(3000)}))
    many = eventually(
        lambda: condition(cluster, namespace, "weak", "Degraded", "TooManyApiKeys"),
        ROTATION_LIMIT_S,
        what="TooManyApiKeys",
    )
    assert "3000 entries" in many["message"]
    assert published(cluster, namespace, "weak") == []
    await until_status(http, stack, namespace, "weak", KEY_A, 401, ROTATION_LIMIT_S)

    # No data at all.
    cluster.kubectl("delete", "secret", "keys", "-n", namespace)
    empty = {**key_secret("keys"), "data": None}
    apply(cluster, namespace, empty)
    eventually(
        lambda: condition(cluster, namespace, "weak", "Degraded", "NoApiKeys"),
        ROTATION_LIMIT_S,
        what="NoApiKeys",
    )

    # A 10 MB key never gets past the API server (Secrets are at most 1 MiB): the
    # published state stays what it was.
    apply(cluster, namespace, key_secret("keys", good=KEY_A))
    await until_status(http, stack, namespace, "weak", KEY_A, 200, ROTATION_LIMIT_S)
    too_big = cluster.kubectl(
        *SSA,
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(key_secret("keys", good=KEY_A, huge="x" * 10_000_000)),
        check=False,
    )
    assert too_big.returncode != 0
    assert published(cluster, namespace, "weak") == [sha(KEY_A)]
    assert (await call(http, stack, namespace, "weak", KEY_A))[0] == 200
    assert stack.operator is not None
    assert stack.operator.alive(), stack.operator.tail()


async def test_require_auth_answers_alike_whether_or_not_a_deployment_exists(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    apply(cluster, namespace, key_secret("keys", alice=KEY_A))
    stack.deploy(
        namespace,
        inference_deployment("private", auth_secret="keys", idle_timeout_s=60),
        inference_deployment("open", idle_timeout_s=60),
    )
    eventually(lambda: published(cluster, namespace, "private") == [sha(KEY_A)], 20)
    required = eventually(
        lambda: condition(cluster, namespace, "open", "Degraded", "ApiKeysRequired"),
        20,
        what="ApiKeysRequired on the deployment without spec.auth",
    )
    assert "spec.auth.secretName" in required["message"]

    targets = [
        (namespace, "private"),
        (namespace, "open"),
        (namespace, "absent"),
        ("no-such-namespace", "private"),
    ]
    for credentials in (None, "wrong", KEY_B, sha(KEY_A)):
        answers = set()
        for ns, name in targets:
            status, headers, body = await call(http, stack, ns, name, credentials)
            assert status == 401, (ns, name, credentials)
            answers.add((status, tuple(sorted(headers.items())), body))
        assert len(answers) == 1, answers
    # Host routing answers alike too.
    by_host = set()
    for host in (f"private.{namespace}.payper.local", f"absent.{namespace}.payper.local"):
        async with http.get(f"{stack.gateway_url}/v1/models", headers={"Host": host}) as r:
            by_host.add((r.status, tuple(sorted(r.headers.items())), await r.read()))
    assert len(by_host) == 1
    assert next(iter(by_host))[0] == 401

    # Roughly the same time: no answer is measurably slower for an existing deployment.
    async def median_ms(name: str) -> float:
        times = []
        for _ in range(30):
            started = time.perf_counter()
            await call(http, stack, namespace, name, "wrong")
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    existing, missing = await median_ms("private"), await median_ms("absent")
    assert abs(existing - missing) < max(5.0, 0.5 * min(existing, missing)), (existing, missing)

    # With the key, the deployment answers; the key opens no other deployment.
    await until_status(http, stack, namespace, "private", KEY_A, 200, 20)
    assert (await call(http, stack, namespace, "open", KEY_A))[0] == 401
    await asyncio.sleep(2.5)
    assert replicas(cluster, namespace, "open") == 0


async def test_a_strangers_probes_learn_nothing_and_wake_nothing(
    stack: Stack, namespace: str, http: aiohttp.ClientSession
) -> None:
    cluster = stack.cluster
    apply(cluster, namespace, key_secret("keys", alice=KEY_A))
    stack.deploy(namespace, inference_deployment("target", auth_secret="keys", idle_timeout_s=60))
    eventually(lambda: published(cluster, namespace, "target") == [sha(KEY_A)], 20)
    _, _, reference = await call(http, stack, namespace, "target")
    probes: list[dict[str, str]] = [
        {"Authorization": f"Bearer {sha(KEY_A)}"},  # the published digest is not a key
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": f"Bearer {KEY_A[:-1]}"},
        {"Authorization": f"Bearer {KEY_A.upper()}"},
        {"Authorization": f"Bearer {KEY_A}{KEY_A}"},
        {"Authorization": "Bearer " + "A" * 30_000},
        {"Authorization": "Bearer"},
        {"X-Api-Key": KEY_A},
        {"Proxy-Authorization": f"Bearer {KEY_A}"},
    ]
    for headers in probes:
        status, _, body = await call(http, stack, namespace, "target", headers=headers)
        assert (status, body) == (401, reference), headers
    for path in (
        f"/{namespace}/target/../absent/v1",
        f"/{namespace}/target%2F..%2Fx",
        f"/{namespace.upper()}/target/v1",
    ):
        async with http.get(stack.gateway_url + path) as r:
            assert r.status in (401, 404), path
            assert namespace not in (await r.text()), path
    await asyncio.sleep(2.5)
    assert replicas(cluster, namespace, "target") == 0, "no probe woke the deployment"
