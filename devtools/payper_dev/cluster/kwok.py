"""kwok's configuration for the local cluster: fake nodes and simulated pod lifecycles.

kwok plays the kubelet. Its *stages* say how an object's status moves on: a pod gets an
IP from a loopback range as soon as it is bound to a node, then becomes Ready after a
delay that simulates a model server's cold start (default from the cluster's config,
overridden per pod by the ``payper.dev/cold-start-delay`` annotation, a Go duration such
as ``2500ms``). Pods on loopback IPs let a test bind a real process where the pod is.

A pod that the pod runner serves (annotated ``payper.dev/pod-runner``) is not Ready on a
timer: its delay starts only once the runner has seen its process accept connections and
annotated the pod, so nothing ever routes to a Ready pod whose server is still starting.
Such a pod is not deleted at once either: the runner stops its process as a kubelet
would (preStop, SIGTERM, grace) and then removes it; kwok removes it only once its grace
period has run out (``deletionTimestamp``), in case no runner serves it.
"""

from __future__ import annotations

from typing import Any

import yaml

from payper_dev.cluster.binaries import KUBERNETES_VERSION
from payper_dev.cluster.podrunner import ANNOTATION as POD_RUNNER_ANNOTATION
from payper_dev.cluster.podrunner import LISTENING_ANNOTATION

COLD_START_ANNOTATION = "payper.dev/cold-start-delay"
MANAGED_LABEL = "payper.dev/kwok-node"
NODE_LEASE_SECONDS = 40

_POD_STATUS_CREATED = """\
{{ $now := Now }}
conditions:
- lastProbeTime: null
  lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastProbeTime: null
  lastTransitionTime: {{ $now | Quote }}
  message: 'model server is starting'
  reason: ContainersNotReady
  status: "False"
  type: Ready
- lastProbeTime: null
  lastTransitionTime: {{ $now | Quote }}
  reason: ContainersNotReady
  status: "False"
  type: ContainersReady
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  restartCount: 0
  started: false
  state:
    waiting:
      reason: ContainerCreating
{{ end }}
hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) \
( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
phase: Pending
startTime: {{ $now | Quote }}
"""

_POD_STATUS_READY = """\
{{ $now := Now }}
conditions:
- lastProbeTime: null
  lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Ready
- lastProbeTime: null
  lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: ContainersReady
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  started: true
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
phase: Running
"""

_NODE_STATUS_TEMPLATE = """\
{{ $now := Now }}
{{ $lastTransitionTime := or .metadata.creationTimestamp $now }}
conditions:
{{ range NodeConditions }}
- lastHeartbeatTime: {{ $now | Quote }}
  lastTransitionTime: {{ $lastTransitionTime | Quote }}
  message: {{ .message | Quote }}
  reason: {{ .reason | Quote }}
  status: {{ .status | Quote }}
  type: {{ .type | Quote }}
{{ end }}
addresses:
{{ with NodeIP }}
- address: {{ . | Quote }}
  type: InternalIP
{{ end }}
{{ with NodeName }}
- address: {{ . | Quote }}
  type: Hostname
{{ end }}
nodeInfo:
  architecture: amd64
  containerRuntimeVersion: kwok
  kernelVersion: kwok
  kubeProxyVersion: {kube_version}
  kubeletVersion: {kube_version}
  operatingSystem: linux
  osImage: payper-local
phase: Running
"""


_NODE_STATUS = _NODE_STATUS_TEMPLATE.replace("{kube_version}", KUBERNETES_VERSION)


def _stage(
    name: str,
    kind: str,
    expressions: list[dict[str, Any]],
    next_: dict[str, Any],
    delay: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "resourceRef": {"apiGroup": "v1", "kind": kind},
        "selector": {"matchExpressions": expressions},
        "next": next_,
    }
    if delay is not None:
        spec["delay"] = delay
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": name},
        "spec": spec,
    }


def _absent(key: str) -> dict[str, Any]:
    return {"key": key, "operator": "DoesNotExist"}


def _in(key: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": "In", "values": list(values)}


def _annotation(key: str) -> str:
    return f'.metadata.annotations["{key}"]'


def stages(cold_start_ms: int) -> list[dict[str, Any]]:
    ready_condition = '.status.conditions.[] | select( .type == "Ready" ) | .status'
    becomes_ready = [
        _absent(".metadata.deletionTimestamp"),
        _in(".status.phase", "Pending"),
        _in('.status.conditions.[] | select( .type == "Initialized" ) | .status', "True"),
        _absent(".status.containerStatuses.[].state.running.startedAt"),
    ]
    deleting = [
        {"key": ".metadata.deletionTimestamp", "operator": "Exists"},
        _absent(".metadata.finalizers"),
    ]
    cold_start = {
        "durationMilliseconds": cold_start_ms,
        "durationFrom": {"expressionFrom": _annotation(COLD_START_ANNOTATION)},
    }
    return [
        _stage(
            "node-initialize",
            "Node",
            [{"key": ready_condition, "operator": "NotIn", "values": ["True"]}],
            {"statusTemplate": _NODE_STATUS},
        ),
        _stage(
            "node-heartbeat",
            "Node",
            [_in(".status.phase", "Running"), _in(ready_condition, "True")],
            {"statusTemplate": _NODE_STATUS},
            delay={"durationMilliseconds": 20_000, "jitterDurationMilliseconds": 25_000},
        ),
        _stage(
            "pod-create",
            "Pod",
            [_absent(".metadata.deletionTimestamp"), _absent(".status.podIP")],
            {"statusTemplate": _POD_STATUS_CREATED},
        ),
        # Pods with nothing behind them: Ready after the cold-start delay.
        _stage(
            "pod-ready",
            "Pod",
            [*becomes_ready, _absent(_annotation(POD_RUNNER_ANNOTATION))],
            {"statusTemplate": _POD_STATUS_READY},
            delay=cold_start,
        ),
        # Pods the pod runner serves: the delay starts once their process listens.
        _stage(
            "pod-ready-listening",
            "Pod",
            [*becomes_ready, _in(_annotation(LISTENING_ANNOTATION), "true")],
            {"statusTemplate": _POD_STATUS_READY},
            delay=cold_start,
        ),
        _stage(
            "pod-delete",
            "Pod",
            [*deleting, _absent(_annotation(POD_RUNNER_ANNOTATION))],
            {"delete": True},
        ),
        # Pods the pod runner serves: it removes them once their process has stopped;
        # this only removes one it does not (no runner), when its grace has run out.
        _stage(
            "pod-delete-overdue",
            "Pod",
            [*deleting, {"key": _annotation(POD_RUNNER_ANNOTATION), "operator": "Exists"}],
            {"delete": True},
            delay={
                "durationMilliseconds": 0,
                "durationFrom": {"expressionFrom": ".metadata.deletionTimestamp"},
            },
        ),
    ]


def configuration(pod_cidr: str, node_ip: str, cold_start_ms: int) -> str:
    options = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {
            "cidr": pod_cidr,
            "nodeIP": node_ip,
            "manageAllNodes": False,
            "manageNodesWithLabelSelector": f"{MANAGED_LABEL}=true",
            "nodeLeaseDurationSeconds": NODE_LEASE_SECONDS,
            "nodeLeaseParallelism": 4,
            "nodePlayStageParallelism": 4,
            "podPlayStageParallelism": 16,
            "podsOnNodeSyncParallelism": 4,
        },
    }
    return yaml.safe_dump_all([options, *stages(cold_start_ms)], sort_keys=False)
