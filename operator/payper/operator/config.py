"""The operator's configuration file, validated before anything starts.

A typo or a bad value stops the operator at start-up with a message that names the key
(``autoscaler.tickSeconds: Input should be greater than or equal to 0.1``), instead of
surfacing later as odd scaling or wrong bills.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError, field_validator

from payper.api.common import ApiModel, ShortString, defaulted, field_errors
from payper.billing.config import BillingConfig
from payper.identity import DEFAULT_AUDIENCE


class ConfigError(ValueError):
    """The configuration is invalid; the message names every bad key."""


def _service_account(value: str) -> str:
    namespace, sep, name = value.partition(":")
    if not sep or not namespace or not name:
        raise ValueError(f"{value!r} must be <namespace>:<serviceaccount>")
    return value


class ListenConfig(ApiModel):
    api: ShortString = "0.0.0.0:8443"
    """Demand (gateways) and usage (agents) endpoints."""
    metrics: ShortString = "0.0.0.0:8081"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None


class IdentityConfig(ApiModel):
    audience: ShortString = DEFAULT_AUDIENCE
    """Audience the callers' projected tokens must carry (checked with TokenReview)."""
    gateway_service_accounts: list[ShortString] = Field(
        default_factory=lambda: ["payper-system:payper-gateway"]
    )
    agent_service_accounts: list[ShortString] = Field(
        default_factory=lambda: ["payper-system-agent:payper-agent"]
    )
    token_cache_seconds: Annotated[float, Field(ge=0, le=3600)] = 60.0

    @field_validator("gateway_service_accounts", "agent_service_accounts")
    @classmethod
    def _accounts(cls, values: list[str]) -> list[str]:
        return [_service_account(v) for v in values]


class AutoscalerConfig(ApiModel):
    tick_seconds: Annotated[float, Field(ge=0.1, le=10)] = 1.0
    stable_window_seconds: Annotated[int, Field(ge=1, le=3600)] = 60
    panic_window_seconds: Annotated[int, Field(ge=1, le=600)] = 6
    demand_expiry_seconds: Annotated[float, Field(ge=1, le=60)] = 5.0
    """A gateway's snapshot counts this long; a gateway that stops reporting stops counting."""


class LeaderElectionConfig(ApiModel):
    namespace: ShortString = "payper-system"
    name: ShortString = "payper-operator"
    lease_duration_seconds: Annotated[int, Field(ge=2, le=300)] = 15
    renew_seconds: Annotated[float, Field(ge=0.2, le=60)] = 2.0


class ApiKeysConfig(ApiModel):
    required: bool = False
    """The gateway requires API keys of every deployment (the chart's gateway.requireAuth):
    the operator says so in the condition of a deployment without spec.auth."""


class TenantFenceConfig(ApiModel):
    """Per InferenceDeployment, a NetworkPolicy that admits ingress to its pods only from
    the gateway (and what the platform lists): no tenant reaches another's pods or
    Service directly, around its API keys, on its bill."""

    enabled: bool = True
    gateway_namespace: ShortString = "payper-system"
    gateway_pod_labels: dict[ShortString, ShortString] = Field(
        default_factory=lambda: {"app.kubernetes.io/component": "gateway"}
    )
    allow_from: Annotated[list[dict[str, Any]], Field(max_length=32)] = Field(default_factory=list)
    """Further NetworkPolicy peers admitted to every port (a platform's Prometheus)."""


class OperatorConfig(ApiModel):
    domain: ShortString = "payper.local"
    url_template: ShortString = "http://{name}.{namespace}.{domain}/"
    listen: ListenConfig = defaulted(ListenConfig)
    identity: IdentityConfig = defaulted(IdentityConfig)
    autoscaler: AutoscalerConfig = defaulted(AutoscalerConfig)
    leader_election: LeaderElectionConfig = defaulted(LeaderElectionConfig)
    billing: BillingConfig = defaulted(BillingConfig)
    api_keys: ApiKeysConfig = defaulted(ApiKeysConfig)
    tenant_fence: TenantFenceConfig = defaulted(TenantFenceConfig)

    def url(self, namespace: str, name: str) -> str:
        return self.url_template.format(name=name, namespace=namespace, domain=self.domain)


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"  {line}" for line in field_errors(error)]
    return "\n".join([f"invalid operator configuration in {source}:", *lines])


def load(path: Path | None) -> OperatorConfig:
    """The configuration from ``path`` (YAML), or the defaults when no path is given."""
    if path is None:
        return OperatorConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read operator configuration {path}: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping, got {type(raw).__name__}")
    try:
        return OperatorConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, str(path))) from error
