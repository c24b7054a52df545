"""CRD generation from the models, and the drift check that keeps crds/ honest."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field

from payper.api.inference_deployment import InferenceDeploymentSpec, ScalingSpec
from payper_dev import crds

REPO = Path(__file__).resolve().parents[2]


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.items():
            found.extend(_walk(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_walk(value, f"{path}[{index}]"))
    return found


@pytest.mark.parametrize("definition", crds.KINDS, ids=lambda d: d.kind)
def test_generated_schema_is_structural(definition: crds.KindDefinition) -> None:
    schema = crds.crd(definition)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        if "properties" in node and not path.endswith(".properties"):
            assert node.get("type") == "object", path


@pytest.mark.parametrize("directory", ["crds", "charts/payper/crds"])
def test_checked_in_crds_match_the_models(directory: str) -> None:
    assert crds.drift(REPO / directory) == []


def test_drift_is_reported_when_a_model_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    crds.write(tmp_path)
    assert crds.drift(tmp_path) == []

    class ChangedScaling(ScalingSpec):
        max_burst: int = Field(default=2, ge=1)

    class ChangedSpec(InferenceDeploymentSpec):
        scaling: ChangedScaling = Field(default_factory=ChangedScaling)

    changed = dataclasses.replace(crds.KINDS[0], spec=ChangedSpec)
    monkeypatch.setattr(crds, "KINDS", (changed, *crds.KINDS[1:]))
    problems = crds.drift(tmp_path)
    assert len(problems) == 1
    assert "+                  maxBurst:" in problems[0]


def test_make_crds_check_fails_on_a_stale_file_and_passes_after_make_crds(tmp_path: Path) -> None:
    stale = tmp_path / "crds"
    shutil.copytree(REPO / "crds", stale)
    path = stale / "inferencedeployments.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["names"]["shortNames"] = ["old"]
    path.write_text(yaml.safe_dump(doc))

    def make(target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["make", "-s", target, f"CRDS_DIRS={stale}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    check = make("crds-check")
    assert check.returncode != 0
    assert "is stale: run `make crds`" in check.stderr
    assert make("crds").returncode == 0
    assert make("crds-check").returncode == 0


def test_defaults_are_complete_objects_so_cel_rules_hold() -> None:
    spec = crds.crd(crds.KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"
    ]["spec"]
    scaling = spec["properties"]["scaling"]
    scaling_default = scaling["default"]
    assert scaling_default["minReplicas"] <= scaling_default["maxReplicas"]
    # Only a field whose absence means something (maxQueue: the platform's cap) may be
    # left out of the default, and no rule may read it.
    left_out = set(scaling["properties"]) - set(scaling_default)
    assert left_out == {"maxQueue"}
    rules = " ".join(rule["rule"] for rule in scaling.get("x-kubernetes-validations", []))
    assert not any(name in rules for name in left_out)


def test_conditions_are_a_list_map_keyed_by_type() -> None:
    status = crds.crd(crds.KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"
    ]["status"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
