"""A real Prometheus (Debian's package) on loopback, scraping the local stack.

The dashboard tests run every panel's query against it, and ``make demo --keep`` leaves
it running for a look. Prometheus listens on 127.0.0.1 only and keeps its data in the
given directory.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from payper_dev.loopback import free_port, http_ok
from payper_dev.testing.cluster import eventually
from payper_dev.testing.stack import Process


def _epoch_s(timestamp: str) -> float:
    """Prometheus's RFC 3339 times carry nanoseconds; datetime takes microseconds."""
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", timestamp).replace("Z", "+00:00")
    return datetime.fromisoformat(trimmed).timestamp()


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    def __init__(
        self, workdir: Path, targets: dict[str, list[str]], interval_s: float = 1.0
    ) -> None:
        self.workdir = workdir
        self.targets = targets
        self.interval_s = interval_s
        self.port = free_port()
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusError("prometheus is not installed (Debian package: prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        interval = f"{int(self.interval_s * 1000)}ms"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": hosts}]}
                for job, hosts in self.targets.items()
                if hosts
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = Process(
            "prometheus",
            [
                binary,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
            ],
            self.workdir / "prometheus.log",
            {},
        )
        self.process.start()
        eventually(lambda: http_ok(f"{self.url}/-/ready"), 30, 0.2, "Prometheus to start")
        # Ready is not scraping yet: wait for a first successful scrape of every target.
        eventually(self._all_scraped, 30, 0.2, "a first scrape of every target")
        return self

    def _all_scraped(self) -> bool:
        up = self.targets_up()
        expected = sum(len(hosts) for hosts in self.targets.values())
        return len(up) == expected and all(up.values())

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise PrometheusError(f"{expr}: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def _active_targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            active: list[dict[str, Any]] = json.loads(response.read())["data"]["activeTargets"]
        return active

    def targets_up(self) -> dict[str, bool]:
        return {t["scrapeUrl"]: t["health"] == "up" for t in self._active_targets()}

    def wait_for_scrapes_after(self, since_s: float, timeout_s: float = 30) -> None:
        """Until every target was scraped, successfully, at least one interval after
        ``since_s`` (epoch seconds): what queries see then includes the state at that time."""

        def scraped() -> bool:
            return all(
                t["health"] == "up" and _epoch_s(t["lastScrape"]) > since_s + self.interval_s
                for t in self._active_targets()
            )

        eventually(scraped, timeout_s, 0.2, f"scrapes after {since_s}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGTERM)


def check_metrics(text: str) -> list[str]:
    """promtool's lint of an exposition: the problems it finds (empty when clean)."""
    binary = shutil.which("promtool")
    if binary is None:
        raise PrometheusError("promtool is not installed (Debian package: prometheus)")
    result = subprocess.run(
        [binary, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
