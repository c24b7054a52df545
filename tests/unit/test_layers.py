"""The import contracts in .importlinter catch what they promise to catch.

``make lint`` runs them over the tree; here each runs over a copy of the tree with one
deliberate violation, and must fail naming it (and pass on the unmodified copy, which
shows that the copy, not the installed tree, is what was analysed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("operator", "gpu-agent", "devtools")


def _lint_copy(tmp_path: Path, module: str | None = None, line: str = "") -> tuple[int, str]:
    for directory in PACKAGE_DIRS:
        shutil.copytree(
            REPO / directory, tmp_path / directory, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    if module is not None:
        path = tmp_path / module
        path.write_text(path.read_text() + f"\n{line}  # deliberate violation\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(tmp_path / d) for d in PACKAGE_DIRS),
    }
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_the_unmodified_tree_keeps_every_contract(tmp_path: Path) -> None:
    code, output = _lint_copy(tmp_path)
    assert code == 0, output
    assert "0 broken" in output


@pytest.mark.parametrize(
    ("module", "line", "message"),
    [
        (
            "operator/payper/billing/ledger.py",
            "from payper.operator import state as _state",
            "payper.billing is not allowed to import payper.operator",
        ),
        (
            "operator/payper/gateway/proxy.py",
            "from payper.operator import autoscaler as _autoscaler",
            "payper.gateway is not allowed to import payper.operator",
        ),
        (
            "operator/payper/operator/main.py",
            "import payper_dev.loopback as _loopback",
            "payper.operator is not allowed to import payper_dev",
        ),
        (
            "operator/payper/operator/controller.py",
            "import kubernetes as _kubernetes",
            "payper.operator.controller -> kubernetes",
        ),
        (
            "gpu-agent/payper_agent/meter.py",
            "import aiohttp as _aiohttp",
            "payper_agent.meter is not allowed to import aiohttp",
        ),
    ],
    ids=[
        "billing-imports-operator",
        "gateway-imports-operator",
        "service-imports-dev",
        "kubernetes-outside-kube",
        "pure-meter-does-io",
    ],
)
def test_a_deliberate_violation_fails_the_build(
    tmp_path: Path, module: str, line: str, message: str
) -> None:
    code, output = _lint_copy(tmp_path, module, line)
    assert code != 0, output
    assert message in " ".join(output.split()), output


MAX_MONEY_PATH_LINES = 500


def test_no_module_of_the_money_path_outgrows_one_job() -> None:
    """The ledger was one 979-line class; its parts stay small enough to read whole."""
    sizes = {
        path.name: len(path.read_text().splitlines())
        for path in (REPO / "operator" / "payper" / "billing").glob("*.py")
    }
    assert sizes and max(sizes.values()) <= MAX_MONEY_PATH_LINES, {
        name: lines for name, lines in sizes.items() if lines > MAX_MONEY_PATH_LINES
    }
