"""What only a real node shows: a probe that gates readiness, a pod IP on the bridge, a
Service answered through kube-proxy, a Service name resolved by the cluster DNS, a
container's cgroup read by the agent's own parser, and a teardown that leaves nothing.

Every wait is on a condition (Ready, an EndpointSlice, an answer), never a timer.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.request
from pathlib import Path
from typing import Any

from payper.api.inference_deployment import GPU_PRODUCT_LABEL
from payper_agent.cgroups import parse_cgroup
from payper_dev.cluster import node as real_node
from payper_dev.testing.cluster import NodeCluster, eventually

POD_NET = ipaddress.ip_network(real_node.POD_SUBNET)


def _get(url: str) -> str | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return None


def test_the_node_is_a_tainted_gpu_node(node_cluster: NodeCluster) -> None:
    node = node_cluster.handle.get_json("node", real_node.NODE_NAME)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == str(real_node.GPUS)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(real_node.GPUS)
    assert GPU_PRODUCT_LABEL in node["metadata"]["labels"]
    assert real_node.REAL_NODE_TAINT in node["spec"]["taints"]
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == real_node.NODE_IP


def test_a_readiness_probe_makes_the_pod_ready_on_a_bridge_ip(
    node_cluster: NodeCluster, served_pod: dict[str, Any]
) -> None:
    status = served_pod["status"]
    assert served_pod["spec"]["nodeName"] == real_node.NODE_NAME
    assert ipaddress.ip_address(status["podIP"]) in POD_NET
    assert status["hostIP"] == real_node.NODE_IP
    assert _get(f"http://{status['podIP']}:8000/healthz") is not None


def test_a_service_answers_through_kube_proxy_and_by_name(
    node_cluster: NodeCluster, namespace: str, served_pod: dict[str, Any]
) -> None:
    handle = node_cluster.handle
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "model"},
        "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    handle.apply_items([service], "-n", namespace)
    cluster_ip = handle.get_json("-n", namespace, "service", "model")["spec"]["clusterIP"]

    def ready_slice() -> bool:
        slices = handle.get_json(
            "-n", namespace, "endpointslices", "-l", "kubernetes.io/service-name=model"
        )["items"]
        return any(
            e.get("conditions", {}).get("ready") and served_pod["status"]["podIP"] in e["addresses"]
            for s in slices
            for e in s.get("endpoints") or []
        )

    eventually(ready_slice, 60, what="an EndpointSlice with the ready pod")
    # From the host: kube-proxy's rules rewrite the ClusterIP to the pod.
    answer = eventually(
        lambda: _get(f"http://{cluster_ip}/healthz"), 60, what=f"{cluster_ip} to answer"
    )
    assert answer is not None
    # From inside a pod (kubectl exec through the kubelet): the Service name resolves
    # through the cluster DNS to the ClusterIP, and answers.
    script = (
        "import socket, urllib.request, json;"
        f"ip = socket.gethostbyname('model.{namespace}.svc.cluster.local');"
        "short = socket.gethostbyname('model');"
        "body = urllib.request.urlopen('http://model/healthz', timeout=5).read().decode();"
        "print(json.dumps([ip, short, body]))"
    )
    result = handle.kubectl("exec", "-n", namespace, "server", "--", "python", "-c", script)
    full, short, body = json.loads(result.stdout)
    assert full == short == cluster_ip
    assert body


def test_a_containers_cgroup_parses_to_its_pod_and_container(
    node_cluster: NodeCluster, served_pod: dict[str, Any]
) -> None:
    container_id = served_pod["status"]["containerStatuses"][0]["containerID"]
    runtime, _, bare_id = container_id.partition("://")
    assert runtime == "containerd"
    tasks = node_cluster.node.ctr("tasks", "ls")
    pid = next(int(line.split()[1]) for line in tasks.splitlines() if line.startswith(bare_id))
    text = Path(f"/proc/{pid}/cgroup").read_text()
    identity = parse_cgroup(text)
    assert identity is not None, text
    assert identity.pod_uid == served_pod["metadata"]["uid"]
    assert identity.container_id == bare_id
    # Under the node's own cgroup root, so teardown finds every pod cgroup.
    assert f"{real_node.CGROUP_ROOT}/kubepods/" in text
