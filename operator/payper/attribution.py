"""Attribution: which InferenceDeployment a pod's GPU time belongs to, as the API server says.

A pod is billed to a deployment only through its owner chain as the API server holds it
(Pod -> ReplicaSet -> Deployment -> InferenceDeployment, each link checked by UID), never
through a label the tenant controls; a GPU pod outside any deployment is billed to its
namespace (``UNMANAGED``). The GPU product of a node is its product label, read once per
node. Both are cached, and bounded by what the operator currently sees.
"""

from __future__ import annotations

from collections.abc import Iterable

from payper.api.inference_deployment import GPU_PRODUCT_LABEL
from payper.api.inference_deployment import KIND as INFERENCE_DEPLOYMENT_KIND
from payper.kube import Kube, resource_path
from payper.observed import UNMANAGED, Key, Owner, PodView, controller_of


class Attribution:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._replica_sets: dict[str, Key | None] = {}
        """ReplicaSet UID -> the InferenceDeployment it belongs to (None: to none)."""
        self._node_labels: dict[str, str | None] = {}
        """Node -> its GPU product label (None: it has none)."""

    async def _controller(
        self, api_version: str, plural: str, namespace: str, owner: Owner
    ) -> Owner | None:
        """The controller of the object ``owner`` names, if it still is that object."""
        path = resource_path(api_version, plural, namespace, owner.name)
        found = await self.kube.get_or_none(path)
        if found is None or found["metadata"].get("uid") != owner.uid:
            return None
        return controller_of(found["metadata"])

    async def owner_key(self, pod: PodView) -> Key:
        """The InferenceDeployment a pod belongs to, else its namespace's UNMANAGED key."""
        owner = pod.owner
        if owner is None or owner.kind != "ReplicaSet":
            return (pod.namespace, UNMANAGED)
        if owner.uid not in self._replica_sets:
            key: Key | None = None
            deployment = await self._controller("apps/v1", "replicasets", pod.namespace, owner)
            if deployment is not None and deployment.kind == "Deployment":
                top = await self._controller("apps/v1", "deployments", pod.namespace, deployment)
                if top is not None and top.kind == INFERENCE_DEPLOYMENT_KIND:
                    key = (pod.namespace, top.name)
            self._replica_sets[owner.uid] = key
        return self._replica_sets[owner.uid] or (pod.namespace, UNMANAGED)

    def keep_only(self, live_owner_uids: set[str]) -> None:
        """Forget the ReplicaSets no pod the operator knows is owned by."""
        for uid in [uid for uid in self._replica_sets if uid not in live_owner_uids]:
            del self._replica_sets[uid]

    async def gpu_product_labels(self, nodes: Iterable[str]) -> dict[str, str | None]:
        """The GPU product label of each node (read once: a node's GPUs do not change
        while it runs); every node asked about so far."""
        for node in set(nodes) - set(self._node_labels):
            found = await self.kube.get_or_none(resource_path("v1", "nodes", name=node))
            labels = (found or {}).get("metadata", {}).get("labels") or {}
            self._node_labels[node] = labels.get(GPU_PRODUCT_LABEL)
        return self._node_labels
