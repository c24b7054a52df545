"""The local cluster behaves like a real one where Payper depends on it."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from payper_dev.cluster import podrunner
from payper_dev.cluster.local import LocalCluster
from payper_dev.loopback import get_text
from payper_dev.testing.cluster import ClusterHandle, eventually

REPO = Path(__file__).resolve().parents[2]


def _deployment(
    name: str, gpus: int, replicas: int = 1, annotations: dict[str, str] | None = None
) -> str:
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}, "annotations": annotations or {}},
                    "spec": {
                        "tolerations": [
                            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                        ],
                        "containers": [
                            {
                                "name": "server",
                                "image": "example/model:1",
                                "ports": [{"containerPort": 8000}],
                                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                            }
                        ],
                    },
                },
            },
        }
    )


def _pods(cluster: ClusterHandle, namespace: str, app: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json("pods", "-n", namespace, "-l", f"app={app}")[
        "items"
    ]
    return items


def _condition_time(pod: dict[str, Any], type_: str) -> datetime | None:
    for condition in pod["status"].get("conditions", []):
        if condition["type"] == type_ and condition["status"] == "True":
            return datetime.fromisoformat(condition["lastTransitionTime"])
    return None


def test_fake_gpu_nodes_are_ready_and_labelled(cluster: ClusterHandle) -> None:
    nodes = cluster.get_json("nodes")["items"]
    gpu = [n for n in nodes if n["metadata"]["labels"].get("nvidia.com/gpu.present") == "true"]
    cpu = [n for n in nodes if n not in gpu]
    assert len(gpu) == 2 and len(cpu) == 1
    for node in gpu:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node[
            "spec"
        ]["taints"]
    for node in nodes:
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready[0]["status"] == "True"


def test_gpu_pods_schedule_on_gpu_nodes_and_become_ready_after_the_cold_start(
    cluster: ClusterHandle, namespace: str
) -> None:
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=_deployment("default-delay", gpus=1, replicas=2)
    )
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=_deployment("slow", gpus=1, annotations={"payper.dev/cold-start-delay": "4s"}),
    )

    def all_ready() -> list[dict[str, Any]] | None:
        pods = _pods(cluster, namespace, "default-delay") + _pods(cluster, namespace, "slow")
        ready = [p for p in pods if _condition_time(p, "Ready")]
        return ready if len(ready) == 3 else None

    ready = eventually(all_ready, timeout_s=30, what="3 Ready pods")
    for pod in ready:
        assert pod["spec"]["nodeName"].startswith("gpu-node-")
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(
            cluster.pod_cidr
        )
        scheduled = _condition_time(pod, "PodScheduled")
        became_ready = _condition_time(pod, "Ready")
        assert scheduled is not None and became_ready is not None
        delay = (became_ready - scheduled).total_seconds()
        expected = (
            4.0 if pod["metadata"]["labels"]["app"] == "slow" else cluster.cold_start_ms / 1000
        )
        # Condition times have one-second resolution.
        assert expected - 1.0 <= delay <= expected + 3.0, (pod["metadata"]["name"], delay)


def test_pods_that_want_more_gpus_than_any_node_has_stay_pending(
    cluster: ClusterHandle, namespace: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=_deployment("greedy", gpus=9))
    pod = eventually(lambda: _pods(cluster, namespace, "greedy"), timeout_s=20, what="the pod")[0]
    unschedulable = eventually(
        lambda: [
            c
            for c in _pods(cluster, namespace, "greedy")[0]["status"].get("conditions", [])
            if c["type"] == "PodScheduled" and c["status"] == "False"
        ],
        timeout_s=20,
        what="PodScheduled=False",
    )
    assert unschedulable[0]["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in unschedulable[0]["message"]
    time.sleep(2)
    pod = _pods(cluster, namespace, "greedy")[0]
    assert pod["status"]["phase"] == "Pending"
    assert "nodeName" not in pod["spec"]


def test_pod_runner_serves_on_the_pod_ip_and_stops_with_the_pod(
    cluster: ClusterHandle, namespace: str, tmp_path: Any
) -> None:
    server = [
        sys.executable,
        "-m",
        "http.server",
        "--bind",
        "{ip}",
        "{port}",
        "--directory",
        str(tmp_path),
    ]
    (tmp_path / "hello.txt").write_text("served from a pod IP")
    runner = podrunner.PodRunner(cluster.kubeconfig, {"static": server}, log_dir=tmp_path / "logs")
    with podrunner.running_in_background(runner):
        cluster.kubectl(
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
            input=_deployment("served", gpus=1, annotations={podrunner.ANNOTATION: "static"}),
        )
        pod = eventually(
            lambda: next(
                (p for p in _pods(cluster, namespace, "served") if p["status"].get("podIP")), None
            ),
            timeout_s=20,
            what="a pod IP",
        )
        url = f"http://{pod['status']['podIP']}:8000/hello.txt"
        assert eventually(lambda: get_text(url), timeout_s=20, what=url) == "served from a pod IP"
        entry = runner.running[f"{namespace}/{pod['metadata']['name']}"]
        cluster.kubectl("delete", "deployment", "served", "-n", namespace)
        eventually(lambda: entry.process.returncode is not None, timeout_s=20, what="process exit")
        assert get_text(url) is None
        # As a kubelet does, the runner removes the terminating pod once its process
        # stopped (kwok leaves runner pods to it until their grace runs out).
        eventually(lambda: not _pods(cluster, namespace, "served"), 20, what="pod removed")


def test_garbage_collection_removes_owned_objects(cluster: ClusterHandle, namespace: str) -> None:
    owner = json.loads(
        cluster.kubectl(
            "create", "configmap", "owner", "-n", namespace, "--from-literal=a=b", "-o", "json"
        ).stdout
    )
    owned = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "owned",
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "owner",
                    "uid": owner["metadata"]["uid"],
                }
            ],
        },
        "data": {"x": "y"},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(owned))
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    eventually(
        lambda: (
            cluster.kubectl("get", "configmap", "owned", "-n", namespace, check=False).returncode
            != 0
        ),
        timeout_s=30,
        what="the owned ConfigMap to be collected",
    )


def test_service_account_tokens_review_and_rbac(cluster: ClusterHandle, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "probe", "-n", namespace)
    token = cluster.kubectl(
        "create", "token", "probe", "-n", namespace, "--audience=payper-test"
    ).stdout.strip()
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": ["payper-test"]},
    }
    answer = json.loads(
        cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review)).stdout
    )
    assert answer["status"]["authenticated"] is True
    assert answer["status"]["user"]["username"] == f"system:serviceaccount:{namespace}:probe"
    forged = {**review, "spec": {"token": token[:-4] + "AAAA", "audiences": ["payper-test"]}}
    answer = json.loads(
        cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(forged)).stdout
    )
    assert not answer["status"].get("authenticated")
    # RBAC is on: a fresh ServiceAccount may not list pods.
    can = cluster.kubectl(
        "auth",
        "can-i",
        "list",
        "pods",
        "-n",
        namespace,
        f"--as=system:serviceaccount:{namespace}:probe",
        check=False,
    )
    assert can.stdout.strip() == "no"


def test_make_cluster_up_and_down_twice_leave_nothing_running(tmp_path: Any) -> None:
    directory = tmp_path / "cluster"
    args = [f"CLUSTER_DIR={directory}", "POD_CIDR=127.3.0.0/16"]
    try:
        for round_ in (1, 2):
            up = _make("cluster-up", *args, timeout=180)
            assert up.returncode == 0, up.stderr
            assert up.stdout.strip().splitlines()[-1] == str(directory / "kubeconfig")
            assert LocalCluster(directory).is_up()
            down = _make("cluster-down", *args, timeout=60)
            assert down.returncode == 0, down.stderr
            leftovers = subprocess.run(
                ["pgrep", "-f", str(directory)], capture_output=True, text=True, check=False
            )
            assert leftovers.stdout.strip() == "", (
                f"round {round_}: stray processes {leftovers.stdout}"
            )
    finally:
        LocalCluster(directory).down()


def _make(target: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", target, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
