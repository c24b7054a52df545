"""Thin kopf handlers, one module per kind, registered on one registry.

They translate kopf's events into calls on ``payper.operator.controller.Controller``;
the decisions live there and in the pure modules it uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import kopf

from payper.operator.capacity import UnmeteredCapacity
from payper.operator.controller import Controller

registry = kopf.OperatorRegistry()


@dataclass
class Memo:
    """What kopf hands every handler (shallow-copied per object; the controller is shared)."""

    controller: Controller
    capacity: UnmeteredCapacity | None = None
    """Which GPU nodes run GPU pods but send no usage reports (``payper.operator.capacity``)."""


def load() -> kopf.OperatorRegistry:
    """Import the per-kind modules (which register on ``registry``) and return it."""
    from payper.operator.handlers import (  # noqa: F401
        gpu_pods,
        inference_deployment,
        login,
        namespaces,
        pods,
    )

    return registry
