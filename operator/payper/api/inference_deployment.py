"""InferenceDeployment: what a tenant writes to run a GPU model server that scales to zero.

The pod template has the shape of a Deployment's ``spec.template``. Only the parts
Payper reads are typed (containers, their names, images and ports); the rest of the
pod spec passes through unchanged and is validated by the API server when the operator
creates the Deployment.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints

from payper.api.common import (
    DNS_LABEL_PATTERN,
    ApiModel,
    Condition,
    DnsLabel,
    DnsSubdomain,
    LabelValue,
    ObjectMeta,
    OpenApiModel,
    ShortString,
    cel_rules,
    defaulted,
)

KIND = "InferenceDeployment"
PLURAL = "inferencedeployments"
SINGULAR = "inferencedeployment"
SHORT_NAMES = ("infd",)

# Every pod of an InferenceDeployment carries this label, with the deployment's name.
POD_LABEL = "payper.dev/inference-deployment"
# The node label (NVIDIA GPU feature discovery) that spec.gpu.product selects on.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

# Condition types written to status.
READY = "Ready"
SCALED_TO_ZERO = "ScaledToZero"
DEGRADED = "Degraded"
PLAN_GRANTED = "PlanGranted"
API_KEYS_ACCEPTED = "ApiKeysAccepted"

# API keys: a Secret of this type holds them, one per data entry. The operator reads it and
# publishes only the SHA-256 digests in status.auth, where the gateway (which reads no
# Secrets) finds them. Unsalted digests of short keys could be brute-forced from the
# status, so shorter keys are refused; the bounds keep status and the gateway's memory small.
API_KEY_SECRET_TYPE = "payper.dev/api-keys"
MIN_API_KEY_CHARS = 32
MAX_API_KEY_BYTES = 4096
MAX_API_KEYS = 64
"""Keys per deployment (per Secret): more and the whole Secret is refused."""
SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$"
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_HEX_PATTERN, max_length=64)]


def api_key_digest(key: bytes) -> str:
    """What status.auth.keyDigests holds for ``key``: its SHA-256, lower-case hex."""
    return hashlib.sha256(key).hexdigest()


MAX_CONTAINERS = 32
MAX_PORTS = 64
Port = Annotated[int, Field(ge=1, le=65535)]
ExtendedResourceName = Annotated[
    str,
    StringConstraints(
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        max_length=253,
    ),
]


class ContainerPort(OpenApiModel):
    container_port: Port
    name: (
        Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=15)]
        | None
    ) = None
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"


class Container(OpenApiModel):
    name: DnsLabel
    image: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    ports: Annotated[list[ContainerPort], Field(max_length=MAX_PORTS)] = Field(default_factory=list)


class PodSpec(OpenApiModel):
    containers: Annotated[list[Container], Field(min_length=1, max_length=MAX_CONTAINERS)]


class PodTemplateMeta(OpenApiModel):
    labels: dict[str, ShortString] | None = None
    annotations: dict[str, str] | None = None


class PodTemplate(ApiModel):
    """Same shape as a Deployment's ``spec.template``."""

    metadata: PodTemplateMeta = defaulted(PodTemplateMeta)
    spec: PodSpec


class GpuSpec(ApiModel):
    count: Annotated[int, Field(ge=1, le=64, description="GPUs per replica.")] = 1
    resource: Annotated[
        ExtendedResourceName, Field(description="Extended resource that schedules a GPU.")
    ] = "nvidia.com/gpu"
    product: Annotated[
        LabelValue | None,
        Field(description="Required value of the node label nvidia.com/gpu.product."),
    ] = None


class ScalingSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            {
                "rule": "self.minReplicas <= self.maxReplicas",
                "message": "minReplicas must not exceed maxReplicas",
                "fieldPath": ".minReplicas",
            }
        )
    )

    min_replicas: Annotated[int, Field(ge=0, le=1000, description="0 allows scale to zero.")] = 0
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 1
    target_concurrency: Annotated[
        int, Field(ge=1, le=10000, description="In-flight requests one replica should carry.")
    ] = 4
    idle_timeout_seconds: Annotated[
        int, Field(ge=0, le=7 * 86400, description="Time without requests before scaling to 0.")
    ] = 300
    scale_down_delay_seconds: Annotated[
        int, Field(ge=0, le=86400, description="Time at lower demand before removing replicas.")
    ] = 60
    cold_start_timeout_seconds: Annotated[
        int, Field(ge=1, le=3600, description="How long the gateway holds a request.")
    ] = 300
    stream_drain_seconds: Annotated[
        int,
        Field(
            ge=0,
            le=3600,
            description="How long a request may run on once its pod is told to stop (a "
            "scale-down): the pod's termination grace beyond the gateway's drain delay.",
        ),
    ] = 120
    container_concurrency: Annotated[
        int,
        Field(
            ge=0,
            le=10000,
            description="Requests one replica is sent at once (0: no cap); more wait in the "
            "gateway's bounded queue (LLM servers degrade past a few concurrent requests).",
        ),
    ] = 0
    max_queue: Annotated[
        int | None,
        Field(
            ge=0,
            le=100000,
            description="Requests each gateway replica holds for this deployment while no "
            "replica can take them (waking, or all at containerConcurrency); beyond, 503 "
            "or 429 with Retry-After (0: none held; a request still wakes it). At most the "
            "platform's gateway.maxQueue, which applies when unset or larger. Divided "
            "among a gateway replica's workers (at least 1 each, unless 0).",
        ),
    ] = None


class BillingSpec(ApiModel):
    plan: (
        Annotated[
            DnsLabel,
            Field(
                description="A pricing plan the platform grants this namespace; "
                "empty: the namespace's default plan."
            ),
        ]
        | None
    ) = None


class ServiceSpec(ApiModel):
    enabled: Annotated[
        bool,
        Field(
            description="A ClusterIP Service named like the deployment, for in-cluster "
            "clients (the gateway goes to pod IPs; with the tenant fence only the gateway "
            "and what the platform admits reach the pods). false: none, and the one the "
            "operator made before is deleted."
        ),
    ] = True


class AuthSpec(ApiModel):
    secret_name: Annotated[
        DnsSubdomain,
        Field(
            description=f"Secret of type {API_KEY_SECRET_TYPE} in the same namespace; every "
            f"data value is an API key of at least {MIN_API_KEY_CHARS} printable ASCII "
            f"characters (at most {MAX_API_KEYS} keys)."
        ),
    ]


class InferenceDeploymentSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            {
                "rule": "has(self.port) || self.template.spec.containers.exists(c, "
                "has(c.ports) && size(c.ports) > 0)",
                "message": "port is required when no container declares a containerPort",
                "fieldPath": ".port",
            }
        )
    )

    template: PodTemplate
    port: Annotated[
        Port | None,
        Field(description="Container port the gateway forwards to; default the first one."),
    ] = None
    gpu: GpuSpec = defaulted(GpuSpec)
    scaling: ScalingSpec = defaulted(ScalingSpec)
    billing: BillingSpec = defaulted(BillingSpec)
    service: ServiceSpec = defaulted(ServiceSpec)
    auth: AuthSpec | None = None

    def serving_port(self) -> int | None:
        if self.port is not None:
            return self.port
        for container in self.template.spec.containers:
            for port in container.ports:
                return port.container_port
        return None


class AuthStatus(ApiModel):
    """The API keys the gateway accepts, as the operator published them from the Secret."""

    secret_name: Annotated[
        DnsSubdomain, Field(description="The Secret the digests were read from.")
    ]
    key_digests: Annotated[
        list[Sha256Hex],
        Field(
            max_length=MAX_API_KEYS,
            description="SHA-256 (hex) of each accepted key; empty: no key is accepted.",
        ),
    ] = Field(default_factory=list)


PhaseMs = Annotated[int, Field(ge=0, le=86_400_000)] | None


class ColdStartPhases(ApiModel):
    """Milliseconds per phase of a cold start; null where it could not be measured
    (docs/architecture.md, "Cold starts in phases")."""

    create: Annotated[PhaseMs, Field(description="Request held -> pod created.")] = None
    schedule: Annotated[PhaseMs, Field(description="Pod created -> scheduled.")] = None
    image: Annotated[PhaseMs, Field(description="Image pull, as the kubelet measured it.")] = None
    start: Annotated[
        PhaseMs, Field(description="Scheduled -> every container running, less the pull.")
    ] = None
    ready: Annotated[PhaseMs, Field(description="Containers running -> Ready.")] = None
    forward: Annotated[
        PhaseMs, Field(description="Ready -> first byte forwarded by the gateway.")
    ] = None


class ColdStartStatus(ApiModel):
    pod: DnsSubdomain
    phases_ms: ColdStartPhases = Field(default_factory=ColdStartPhases)


class InferenceDeploymentStatus(ApiModel):
    conditions: Annotated[list[Condition], Field(max_length=16)] = Field(default_factory=list)
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    replicas: Annotated[int, Field(ge=0)] | None = None
    ready_replicas: Annotated[int, Field(ge=0)] | None = None
    desired_replicas: Annotated[int, Field(ge=0)] | None = None
    last_request_time: datetime | None = None
    last_cold_start_seconds: (
        Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]{1,3})?$", max_length=16)] | None
    ) = None
    last_cold_start: ColdStartStatus | None = None
    url: Annotated[str, StringConstraints(max_length=2048)] | None = None
    auth: AuthStatus | None = None

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class InferenceDeployment(ApiModel):
    """A whole object as read from the API server."""

    model_config = ConfigDict(extra="ignore")

    api_version: str
    kind: Literal["InferenceDeployment"]
    metadata: ObjectMeta
    spec: InferenceDeploymentSpec
    status: InferenceDeploymentStatus = Field(default_factory=InferenceDeploymentStatus)


NAME_RULE = {
    "rule": f"self.metadata.name.matches('{DNS_LABEL_PATTERN}') && "
    "self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z]')",
    "message": "metadata.name must be a DNS label that starts with a letter "
    "(it names the Service), at most 63 characters",
}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
    },
    {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
    {"name": "Current", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Ready-Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "URL", "type": "string", "jsonPath": ".status.url"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
