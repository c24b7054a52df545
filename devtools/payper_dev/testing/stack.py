"""Payper's processes on a local cluster: operator, gateway, pod runner (model servers).

End-to-end tests, the demo and the benchmarks all start the stack through this module, so
they run the real console scripts as separate processes, with the same flags a
deployment would use, against the real local control plane. Components authenticate to
each other with real ServiceAccount tokens minted by the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from payper.api.billing_record import GRANULARITY_MS
from payper.api.inference_deployment import POD_LABEL
from payper.clock import now_ms
from payper.identity import DEFAULT_AUDIENCE
from payper.kube import WARNINGS_ENV
from payper_dev.cluster import binaries, pki, podrunner
from payper_dev.loopback import free_port, get_text, http_ok
from payper_dev.testing.cluster import ClusterHandle, eventually

SYSTEM_NAMESPACE = "payper-system"
CHART = Path(__file__).resolve().parents[3] / "charts" / "payper"
RBAC_TEMPLATES = (
    "operator-serviceaccount.yaml",
    "operator-clusterrole.yaml",
    "operator-clusterrolebinding.yaml",
    "operator-role.yaml",
    "operator-rolebinding.yaml",
    "gateway-serviceaccount.yaml",
    "gateway-clusterrole.yaml",
    "gateway-clusterrolebinding.yaml",
    "agent-serviceaccount.yaml",
    "agent-clusterrole.yaml",
    "agent-clusterrolebinding.yaml",
)
MODEL_PROFILE = "model"
AGENT_POLL_MS = 1000


def scraped_sum(url: str, sample: str, labels: dict[str, str] | None = None) -> float:
    """The sum of a sample's values over its series (those with ``labels``) at a /metrics
    URL; 0 if absent or unreachable: counters a test waits on only grow."""
    metrics = get_text(url) or ""
    wanted = (labels or {}).items()
    return sum(
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == sample and wanted <= s.labels.items()
    )


@dataclass
class Process:
    name: str
    command: list[str]
    log: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode

    def tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _add_truth(total: dict[str, int], more: dict[str, int]) -> None:
    for name, value in more.items():
        total[name] = total.get(name, 0) + value


@dataclass
class StackOptions:
    stable_window_s: int = 10
    panic_window_s: int = 2
    max_queue: int = 100
    gateway_workers: int = 1
    """The gateway's ``--workers`` (more than 1: processes sharing its port)."""
    domain: str = "payper.local"
    operator_extra: dict[str, Any] = field(default_factory=dict)
    model_server_args: list[str] = field(default_factory=list)
    model_server_env: dict[str, str] = field(default_factory=dict)
    agents: bool = False
    """One simulated payper-agent per GPU node, metering the model servers."""
    gpu_nodes: tuple[str, ...] = ("gpu-node-0", "gpu-node-1")
    report_interval_s: int = 5
    runner_process: bool = False
    """Run the pod runner as a process of its own (outlives this one), not a thread."""
    tls: bool = False
    """Serve the operator's API over TLS (a fresh CA), as the chart does."""
    python: str = sys.executable
    """The interpreter of the operator (another virtualenv's, to compare two builds)."""
    accept_simulated_reports: bool = True
    """The operator's ``billing.acceptSimulatedReports`` (its default, off, refuses them)."""
    source: Path | None = None
    """Another Payper tree to run instead of this one (a released version, to test an
    upgrade from it): the operator, the gateway and the agents import its ``operator/``
    and ``gpu-agent/`` ahead of the installed packages (the dependencies must be this
    environment's), and the RBAC comes from its chart. The test tooling (pod runner,
    model servers) is always this tree's. None: this tree."""
    require_auth: bool = False
    """The chart's ``gateway.requireAuth``: the gateway's flag and the operator's setting."""


class Stack:
    def __init__(
        self, cluster: ClusterHandle, workdir: Path, options: StackOptions | None = None
    ) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.options = options or StackOptions()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.api_port = free_port()
        self.metrics_port = free_port()
        self.gateway_port = free_port()
        self.gateway_admin_port = free_port()
        self.operator: Process | None = None
        self.gateway: Process | None = None
        self.agents: dict[str, Process] = {}
        self.agent_ports: dict[str, int] = {}
        self.sim_dir = self.workdir / "sim-gpu"
        self.agent_namespace = SYSTEM_NAMESPACE
        """Where the chart puts the agents' ServiceAccount (found by ``ensure_system``)."""
        self.runner: podrunner.PodRunner | None = None
        self.runner_process: Process | None = None
        self._runner_context: Any = None

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def operator_url(self) -> str:
        scheme = "https" if self.options.tls else "http"
        return f"{scheme}://127.0.0.1:{self.api_port}"

    def tls_files(self) -> tuple[Path, Path, Path]:
        """(ca.crt, tls.crt, tls.key) for the operator's API, made once per stack."""
        directory = self.workdir / "tls"
        if not (directory / "tls.key").exists():
            pki.serving_certificate(directory, "payper-operator")
        return (directory / "ca.crt", directory / "tls.crt", directory / "tls.key")

    def _ca(self) -> Path | None:
        return self.tls_files()[0] if self.options.tls else None

    def ca_args(self) -> list[str]:
        return ["--operator-ca", str(self.tls_files()[0])] if self.options.tls else []

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def env(self) -> dict[str, str]:
        # An API server warning (an unknown field, a deprecated API) fails loudly here.
        return {**self.cluster.env(), "PYTHONUNBUFFERED": "1", WARNINGS_ENV: "error"}

    def payper_env(self) -> dict[str, str]:
        """The environment of Payper's own processes: ``options.source``'s code first."""
        env = self.env()
        source = self.options.source
        if source is not None:
            paths = [str(source / "operator"), str(source / "gpu-agent")]
            env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
        return env

    @property
    def chart(self) -> Path:
        return CHART if self.options.source is None else self.options.source / "charts" / "payper"

    # -- deployments -------------------------------------------------------------------
    def gateway_gauge(self, name: str, namespace: str) -> dict[str, int]:
        """A per-deployment gauge of the gateway, per InferenceDeployment of a namespace."""
        metrics = get_text(f"http://127.0.0.1:{self.gateway_admin_port}/metrics") or ""
        return {
            sample.labels["inference_deployment"]: int(sample.value)
            for family in text_string_to_metric_families(metrics)
            if family.name == name
            for sample in family.samples
            if sample.labels.get("namespace") == namespace
        }

    def gateway_endpoints(self, namespace: str) -> dict[str, int]:
        """Ready endpoints per InferenceDeployment of a namespace that the gateway routes
        (its series exist exactly while it routes the deployment)."""
        return self.gateway_gauge("payper_gateway_ready_endpoints", namespace)

    def routed(self, namespace: str) -> set[str]:
        """The InferenceDeployments of a namespace the gateway routes."""
        return set(self.gateway_endpoints(namespace))

    def deploy(self, namespace: str, *manifests: dict[str, Any]) -> None:
        """Apply manifests; return once the gateway routes every InferenceDeployment in
        them, so a request sent next cannot race the gateway's watch into a 404."""
        self.cluster.apply_items(list(manifests), "-n", namespace)
        names = {m["metadata"]["name"] for m in manifests if m["kind"] == "InferenceDeployment"}
        eventually(lambda: names <= self.routed(namespace), 20, 0.05, f"routes to {names}")

    # -- identities --------------------------------------------------------------------
    def ensure_system(self) -> None:
        """The system namespace, and the chart's own ServiceAccounts and RBAC for the
        operator, the gateway and the agents (rendered by helm, as a user installs them;
        ``options.source``'s chart when set): the stack's components run as those
        accounts, so the chart's roles are what every end-to-end test exercises."""
        namespace = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": SYSTEM_NAMESPACE},
        }
        # The roles follow the operator's billing settings where the chart's do (deleting
        # records is granted with a record retention only, or with export sinks).
        billing = self.options.operator_extra.get("billing", {})
        retention = billing.get("recordRetentionDays")
        sinks = (billing.get("export") or {}).get("sinks")
        rendered = subprocess.run(
            [
                binaries.binary("helm"),
                "template",
                "payper",
                str(self.chart),
                "-n",
                SYSTEM_NAMESPACE,
                "--set",
                "fullnameOverride=payper",
                *(
                    ["--set", f"operator.billing.recordRetentionDays={retention}"]
                    if retention
                    else []
                ),
                *(
                    ["--set-json", f"operator.billing.export.sinks={json.dumps(sinks)}"]
                    if sinks
                    else []
                ),
                *(f"--show-only=templates/{name}" for name in RBAC_TEMPLATES),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        documents = [doc for doc in yaml.safe_load_all(rendered) if doc]
        # The agents' namespace is the chart's (its own since the restricted-namespace
        # split; the release namespace in a chart from before it).
        self.agent_namespace = next(
            d["metadata"]["namespace"]
            for d in documents
            if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "payper-agent"
        )
        namespaces = {SYSTEM_NAMESPACE, self.agent_namespace}
        self.cluster.apply_items(
            [{**namespace, "metadata": {"name": name}} for name in sorted(namespaces)]
        )
        self.cluster.apply_items(documents)

    def namespace_of(self, service_account: str) -> str:
        """The namespace of one of the chart's ServiceAccounts."""
        return self.agent_namespace if service_account == "payper-agent" else SYSTEM_NAMESPACE

    def kubeconfig_of(self, service_account: str) -> Path:
        """A kubeconfig that authenticates as one of the chart's ServiceAccounts."""
        config = yaml.safe_load(self.cluster.kubeconfig.read_text())
        token = self.token(service_account, audience=None)
        config["users"] = [{"name": service_account, "user": {"token": token}}]
        for context in config["contexts"]:
            context["context"]["user"] = service_account
        path = self.workdir / f"{service_account}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def token(
        self,
        service_account: str,
        namespace: str | None = None,
        audience: str | None = DEFAULT_AUDIENCE,
        bound_pod: str | None = None,
    ) -> str:
        """A token of ``service_account`` (of the chart's, by default): for ``audience``
        (None: the API server's own)."""
        namespace = namespace or self.namespace_of(service_account)
        bound = ["--bound-object-kind=Pod", f"--bound-object-name={bound_pod}"] if bound_pod else []
        audiences = [f"--audience={audience}"] if audience else []
        return self.cluster.kubectl(
            "create",
            "token",
            service_account,
            "-n",
            namespace,
            *audiences,
            *bound,
            "--duration=24h",
        ).stdout.strip()

    def token_file(self, service_account: str) -> Path:
        path = self.workdir / f"{service_account}.token"
        path.write_text(self.token(service_account))
        return path

    # -- processes ---------------------------------------------------------------------
    def operator_config(self) -> Path:
        listen: dict[str, Any] = {
            "api": f"127.0.0.1:{self.api_port}",
            "metrics": f"127.0.0.1:{self.metrics_port}",
        }
        if self.options.tls:
            _, cert, key = self.tls_files()
            listen |= {"tlsCertFile": str(cert), "tlsKeyFile": str(key)}
        config = {
            "domain": self.options.domain,
            "listen": listen,
            "autoscaler": {
                "tickSeconds": 1,
                "stableWindowSeconds": self.options.stable_window_s,
                "panicWindowSeconds": self.options.panic_window_s,
            },
            "leaderElection": {"namespace": SYSTEM_NAMESPACE, "leaseDurationSeconds": 15},
            **self.options.operator_extra,
        }
        # The agents' identity where the chart puts them (a released tree's default
        # otherwise, which matches its chart).
        if self.agent_namespace != SYSTEM_NAMESPACE:
            config["identity"] = {
                "agentServiceAccounts": [f"{self.agent_namespace}:payper-agent"],
                **config.get("identity", {}),
            }
        if self.options.source is None:  # (a released tree may not know these settings)
            config["apiKeys"] = {"required": self.options.require_auth}
            # The stack's agents run the simulated backend: a development cluster's
            # operator is the only one that accepts their reports.
            config["billing"] = {
                "acceptSimulatedReports": self.options.accept_simulated_reports,
                **config.get("billing", {}),
            }
        path = self.workdir / "operator.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start_operator(self, identity: str = "operator-0", lead: bool = True) -> Process:
        """Start payper-operator; with ``lead``, wait until it holds the Lease."""
        process = Process(
            "operator",
            [
                self.options.python,
                "-m",
                "payper.operator.main",
                "--config",
                str(self.operator_config()),
                "--kubeconfig",
                str(self.kubeconfig_of("payper-operator")),
                "--identity",
                identity,
            ],
            self.workdir / "operator.log",
            self.payper_env(),
        )
        process.start()
        self.operator = process
        probe = "readyz" if lead else "healthz"
        eventually(
            lambda: (
                http_ok(f"{self.operator_url}/{probe}", self._ca())
                or (not process.alive() and "dead")
            ),
            timeout_s=60,
            what="the operator to lead" if lead else "the operator to answer",
        )
        if not process.alive():
            raise RuntimeError(f"payper-operator exited:\n{process.tail()}")
        return process

    def start_gateway(self) -> Process:
        process = Process(
            "gateway",
            [
                sys.executable,
                "-m",
                "payper.gateway.main",
                "--listen",
                f"127.0.0.1:{self.gateway_port}",
                "--admin-listen",
                f"127.0.0.1:{self.gateway_admin_port}",
                "--domain",
                self.options.domain,
                "--operator-url",
                self.operator_url,
                *self.ca_args(),
                "--token-file",
                str(self.token_file("payper-gateway")),
                "--max-queue",
                str(self.options.max_queue),
                *(["--require-auth"] if self.options.require_auth else []),
                "--kubeconfig",
                str(self.kubeconfig_of("payper-gateway")),
                "--gateway-id",
                "gateway-0",
                # (only when asked: a release from before the flag runs here too)
                *(
                    ["--workers", str(self.options.gateway_workers)]
                    if self.options.gateway_workers > 1
                    else []
                ),
            ],
            self.workdir / "gateway.log",
            self.payper_env(),
        )
        process.start()
        self.gateway = process
        eventually(
            lambda: (
                http_ok(f"http://127.0.0.1:{self.gateway_admin_port}/readyz")
                or (not process.alive() and "dead")
            ),
            timeout_s=30,
            what="the gateway to sync",
        )
        if not process.alive():
            raise RuntimeError(f"payper-gateway exited:\n{process.tail()}")
        return process

    def start_runner(self) -> None:
        command = [
            sys.executable,
            "-m",
            "payper_dev.testing.model_server",
            "--host",
            "{ip}",
            "--port",
            "{port}",
            *self.options.model_server_args,
        ]
        env = {"PAYPER_SIM_GPU_DIR": str(self.sim_dir), **self.options.model_server_env}
        if self.options.runner_process:
            self.runner_process = Process(
                "pod-runner",
                [
                    sys.executable,
                    "-m",
                    "payper_dev.cluster.podrunner",
                    "--kubeconfig",
                    str(self.cluster.kubeconfig),
                    "--profile",
                    f"{MODEL_PROFILE}={shlex.join(command)}",
                    "--log-dir",
                    str(self.workdir / "pods"),
                    *(f"--env={key}={value}" for key, value in env.items()),
                ],
                self.workdir / "pod-runner.log",
                self.env(),
            )
            self.runner_process.start()
            return
        self.runner = podrunner.PodRunner(
            self.cluster.kubeconfig, {MODEL_PROFILE: command}, self.workdir / "pods", env
        )
        self._runner_context = podrunner.running_in_background(self.runner)
        self._runner_context.__enter__()

    def agent_pod(self, node: str) -> str:
        """The agent's pod on ``node`` (kwok runs nothing): its token is bound to it."""
        name = f"payper-agent-{node}"
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.agent_namespace,
                "labels": {"app": "payper-agent"},
            },
            "spec": {
                "nodeName": node,
                "serviceAccountName": "payper-agent",
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "agent", "image": "payper/agent:local"}],
            },
        }
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        eventually(
            lambda: (
                self.cluster.kubectl(
                    "get", "pod", name, "-n", self.agent_namespace, "-o", "jsonpath={.status.phase}"
                ).stdout
                == "Running"
            ),
            30,
            what=f"{name} running",
        )
        return name

    def agent_token_file(self, node: str) -> Path:
        path = self.workdir / f"agent-{node}.token"
        path.write_text(self.token("payper-agent", bound_pod=self.agent_pod(node)))
        return path

    def agent_state_dir(self, node: str) -> Path:
        return self.workdir / f"agent-state-{node}"

    def start_agent(self, node: str) -> Process:
        port = self.agent_ports.setdefault(node, free_port())
        process = Process(
            f"agent-{node}",
            [
                sys.executable,
                "-m",
                "payper_agent.main",
                "run",
                "--node",
                node,
                "--backend",
                "simulated",
                "--sim-dir",
                str(self.sim_dir),
                "--state-dir",
                str(self.agent_state_dir(node)),
                "--operator-url",
                self.operator_url,
                *self.ca_args(),
                "--token-file",
                str(self.agent_token_file(node)),
                "--kubeconfig",
                str(self.kubeconfig_of("payper-agent")),
                "--listen",
                f"127.0.0.1:{port}",
                "--report-interval",
                str(self.options.report_interval_s),
                "--poll-interval",
                str(AGENT_POLL_MS / 1000),
            ],
            self.workdir / f"agent-{node}.log",
            self.payper_env(),
        )
        process.start()
        self.agents[node] = process
        return process

    def scrape_targets(self) -> dict[str, list[str]]:
        """Prometheus jobs for every running component: job -> host:port list."""
        return {
            "payper-operator": [f"127.0.0.1:{self.metrics_port}"],
            "payper-gateway": [f"127.0.0.1:{self.gateway_admin_port}"],
            "payper-agent": [f"127.0.0.1:{port}" for port in self.agent_ports.values()],
        }

    def agent_truth(self) -> dict[tuple[str, str], dict[str, int]]:
        """What the agents measured and reported, per (namespace, deployment): exact integers.

        Read from their checkpoints, so it covers every report ever cut, acknowledged or
        not; a test compares it with the BillingRecords once the agents have no backlog.
        The deployment is the one the pod's label named when the agent saw it.
        """
        truth: dict[tuple[str, str], dict[str, int]] = {}
        for identity, total in self._series_truth():
            deployment = identity.get("inference_deployment")
            if deployment is not None:
                _add_truth(truth.setdefault((identity["namespace"], deployment), {}), total)
        return truth

    def pod_truth(self) -> dict[str, dict[str, int]]:
        """The same, per pod UID (whatever its labels said)."""
        truth: dict[str, dict[str, int]] = {}
        for identity, total in self._series_truth():
            _add_truth(truth.setdefault(identity["pod_uid"], {}), total)
        return truth

    def _series_truth(self) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
        for node in self.agents:
            state = json.loads((self.agent_state_dir(node) / "state.json").read_text())
            for series in state["meter"].get("series", []):
                yield (
                    series["identity"],
                    {
                        "activeUs": series["reportedUs"],
                        **{g: series["reportedRoundedMs"][g] for g in GRANULARITY_MS},
                        "bursts": series["reportedBursts"],
                    },
                )

    def agent_backlog(self) -> int:
        """Reports written by the agents and not yet acknowledged by the operator."""
        return sum(
            len(list((self.agent_state_dir(node) / "reports").glob("*.json")))
            for node in self.agents
        )

    def flushes(self) -> int:
        """Ledger flushes the running operator has completed (its flush histogram's count)."""
        return int(scraped_sum(self.metrics_url, "payper_billing_flush_duration_seconds_count"))

    def agents_reported_since(self, since_ms: int) -> bool:
        """Every agent has cut its reports up to at least ``since_ms``."""
        for node in self.agents:
            path = self.agent_state_dir(node) / "state.json"
            try:
                end = json.loads(path.read_text()).get("lastReportEndMs")
            except (OSError, ValueError):  # not written yet, or replaced mid-read
                return False
            if end is None or end < since_ms:
                return False
        return True

    async def settle(self, limit_s: float = 60, idle_ms: int = 0) -> None:
        """Until the bursts closed, were reported, delivered and applied to the records.

        Conditions, not timers: each agent has cut a report after two polls that came
        after this call (so a 1 ms or 1 s burst still open then is closed and in a
        report; ``idle_ms`` later still for coarser units: a 1 min burst ends only after a
        minute of idleness); no report waits for acknowledgement (the operator
        acknowledges only what its records hold); and the ledger completed two flushes
        after that, the one that may have been running and one that also took the
        gateway's last demand snapshot.
        """
        since_ms = now_ms() + idle_ms + 2 * AGENT_POLL_MS

        def delivered() -> bool:
            return self.agents_reported_since(since_ms) and not self.agent_backlog()

        try:
            await asyncio.to_thread(eventually, delivered, limit_s, 0.2, "reports applied")
            flushes = self.flushes()
            await asyncio.to_thread(
                eventually, lambda: self.flushes() >= flushes + 2, limit_s, 0.2, "two flushes"
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from None

    def start(self) -> Stack:
        self.ensure_system()
        self.sim_dir.mkdir(parents=True, exist_ok=True)
        self.start_runner()
        self.start_operator()
        self.start_gateway()
        if self.options.agents:
            for node in self.options.gpu_nodes:
                self.start_agent(node)
        return self

    def processes(self) -> list[Process]:
        """Every process this stack started (for ``make demo --keep`` to stop later)."""
        found = [*self.agents.values(), self.gateway, self.operator, self.runner_process]
        return [p for p in found if p is not None]

    def stop(self) -> None:
        for process in self.processes():
            process.stop()
        if self._runner_context is not None:
            self._runner_context.__exit__(None, None, None)
            self._runner_context = None

    def logs(self) -> str:
        processes = (self.operator, self.gateway, *self.agents.values())
        parts = [f"--- {p.name} ---\n{p.tail()}" for p in processes if p]
        return "\n".join(parts)


@contextlib.contextmanager
def running(
    cluster: ClusterHandle, workdir: Path, options: StackOptions | None = None
) -> Iterator[Stack]:
    stack = Stack(cluster, workdir, options)
    try:
        yield stack.start()
    finally:
        stack.stop()


def deployment_pods(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    """An InferenceDeployment's pods by name, terminating ones included."""
    listed = cluster.get_json("pods", "-n", namespace, "-l", f"{POD_LABEL}={name}")
    return {p["metadata"]["name"]: p for p in listed["items"]}


def pod_ready(pod: dict[str, Any]) -> bool:
    """Ready, and not being deleted."""
    return pod["metadata"].get("deletionTimestamp") is None and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
    )


def spec_replicas(cluster: ClusterHandle, namespace: str, name: str) -> int | None:
    """The replicas the operator set on an InferenceDeployment's Deployment (None: none)."""
    found = cluster.kubectl("get", "deployment", name, "-n", namespace, "-o", "json", check=False)
    return (
        int(json.loads(found.stdout)["spec"].get("replicas", 0)) if found.returncode == 0 else None
    )


def inference_deployment(
    name: str,
    *,
    min_replicas: int = 0,
    max_replicas: int = 3,
    target_concurrency: int = 1,
    idle_timeout_s: int = 30,
    scale_down_delay_s: int = 5,
    cold_start_timeout_s: int = 60,
    cold_start: str | None = None,
    product: str | None = None,
    gpus: int = 1,
    auth_secret: str | None = None,
    runner: bool = True,
) -> dict[str, Any]:
    """An InferenceDeployment whose pods run the stand-in model server (via the pod runner)."""
    annotations = {}
    if runner:
        annotations[podrunner.ANNOTATION] = MODEL_PROFILE
    if cold_start is not None:
        annotations["payper.dev/cold-start-delay"] = cold_start
    gpu: dict[str, Any] = {"count": gpus}
    if product:
        gpu["product"] = product
    spec: dict[str, Any] = {
        "template": {
            "metadata": {"annotations": annotations},
            "spec": {
                "containers": [
                    {
                        "name": "server",
                        "image": "payper/model-server:test",
                        "ports": [{"containerPort": 8000}],
                    }
                ]
            },
        },
        "gpu": gpu,
        "scaling": {
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "targetConcurrency": target_concurrency,
            "idleTimeoutSeconds": idle_timeout_s,
            "scaleDownDelaySeconds": scale_down_delay_s,
            "coldStartTimeoutSeconds": cold_start_timeout_s,
        },
    }
    if auth_secret:
        spec["auth"] = {"secretName": auth_secret}
    return {
        "apiVersion": "payper.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }
