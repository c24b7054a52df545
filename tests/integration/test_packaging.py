"""What ships: the payper wheel holds only what runs in a cluster and the user's CLI.

Built from the repository as a user or the image build would (``pip wheel .``), then
installed without extras into a fresh virtualenv, where every shipped command must
start. The development package (local cluster, test stack, demo, generators) and its
libraries never get in.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEV_ONLY = ("payper_dev", "payper/cluster", "payper/testing", "payper/demo", "payper/dashboards")
COMMANDS = (
    ["payper-operator", "--help"],
    ["payper-gateway", "--help"],
    ["payper-agent", "--help"],
    ["payper", "bill", "--help"],
)


def _run(*command: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_wheel_has_no_development_modules_and_its_commands_run(tmp_path: Path) -> None:
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO))
    (wheel,) = tmp_path.glob("payper-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("payper/operator/") for n in names)
    assert any(n.startswith("payper_agent/") for n in names)
    assert [n for n in names if n.startswith(DEV_ONLY)] == []
    metadata = next(n for n in names if n.endswith("/METADATA"))
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert not [r for r in requires if "matplotlib" in r or "grafana" in r], requires

    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    _run(str(environment / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel))
    for command in COMMANDS:
        assert "usage:" in _run(str(environment / "bin" / command[0]), *command[1:])
    # The development package is not importable there.
    probe = subprocess.run(
        [str(environment / "bin" / "python"), "-c", "import payper_dev"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode != 0 and "No module named 'payper_dev'" in probe.stderr
