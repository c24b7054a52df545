"""Shared building blocks of Payper's API types.

Every custom resource is a pydantic model first: the CRDs in ``crds/`` are generated
from these classes (``make crds``), and the operator, gateway and CLI parse objects with
the very same classes. So a constraint written here is enforced twice: by the API server
(from the generated OpenAPI schema) and by pydantic when Payper reads an object.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.alias_generators import to_camel

GROUP = "payper.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Non-negative decimal, as a string: money never travels as a float.
DECIMAL_PATTERN = r"^(0|[1-9][0-9]{0,17})(\.[0-9]{1,12})?$"
DecimalString = Annotated[str, StringConstraints(pattern=DECIMAL_PATTERN, max_length=32)]

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=63)]

DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DnsSubdomain = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]

# A label value: what `nvidia.com/gpu.product` carries on a node.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN, max_length=63)]

# Bounds that keep CEL rules within the API server's cost budget.
MAX_SHORT_STRING = 256
MAX_MESSAGE = 32768
ShortString = Annotated[str, StringConstraints(max_length=MAX_SHORT_STRING)]


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are an error."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict the Kubernetes API expects (aliases, no unset Nones)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


M = TypeVar("M", bound=ApiModel)


class OpenApiModel(ApiModel):
    """A slice of a Kubernetes core type: typed where Payper reads it, open elsewhere.

    Unknown fields are kept (``x-kubernetes-preserve-unknown-fields`` in the CRD), so a
    pod template may use every field a Deployment accepts.
    """

    model_config = ConfigDict(extra="allow")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """A Kubernetes API convention condition (metav1.Condition)."""

    type: Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=64)]
    status: ConditionStatus
    reason: Annotated[
        str, StringConstraints(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    ]
    message: Annotated[str, StringConstraints(max_length=MAX_MESSAGE)] = ""
    last_transition_time: datetime
    observed_generation: Annotated[int, Field(ge=0)] = 0


class ObjectMeta(OpenApiModel):
    """The parts of metadata Payper reads; everything else passes through."""

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


def field_errors(error: ValidationError, root: str = "(top level)") -> list[str]:
    """Each problem as ``path.to.field: message``; ``root`` names an empty path."""
    return [
        f"{'.'.join(str(part) for part in item['loc']) or root}: {item['msg']}"
        for item in error.errors()
    ]


def defaulted(model: type[M]) -> Any:
    """A nested object field that defaults to ``model()``, in Python and in the CRD.

    The CRD carries the fully defaulted object (not ``{}``), so CEL rules that read the
    nested fields hold for the default too.
    """
    return Field(default_factory=model, json_schema_extra={"default": model().to_wire()})


def cel_rules(*rules: dict[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` that becomes the CRD's ``x-kubernetes-validations``."""
    return {"x-kubernetes-validations": list(rules)}
