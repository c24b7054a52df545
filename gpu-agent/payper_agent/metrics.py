"""payper-agent's Prometheus metrics (``payper_agent_`` prefix, base units)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ACTIVE_SECONDS = Counter(
    "payper_agent_active_seconds_total",
    "GPU time in which a container's kernels were executing, per container and GPU.",
    ("namespace", "pod", "container", "gpu"),
)
UNATTRIBUTED_SECONDS = Counter(
    "payper_agent_unattributed_seconds_total",
    "Active GPU time of processes that belong to no pod (reported, never billed).",
)
NVML_ERRORS = Counter(
    "payper_agent_nvml_errors_total", "NVML calls that failed, per GPU.", ("gpu",)
)
SANITISED_IDENTITIES = Counter(
    "payper_agent_sanitised_identities_total",
    "Pods whose payper.dev/inference-deployment label holds no valid name: metered, "
    "reported without a deployment instead of stopping the agent.",
)
POLL_FAILURES = Counter(
    "payper_agent_poll_failures_total",
    "Polls that failed (logged); the meter keeps what it had and the next poll goes on.",
)
DROPPED_SAMPLES = Counter(
    "payper_agent_dropped_samples_total",
    "Garbage NVML samples dropped (smUtil > 100, PID not running, stale timestamp).",
)
UNMETERED_GPUS = Gauge(
    "payper_agent_unmetered_gpu",
    "1 while a GPU cannot be metered per process (e.g. MIG without GPM).",
    ("gpu",),
)
POLL_DURATION = Histogram(
    "payper_agent_poll_duration_seconds",
    "Time one poll of every GPU takes.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
REPORT_BACKLOG = Gauge(
    "payper_agent_report_backlog", "Usage reports written but not yet acknowledged."
)
REPORTS_SENT = Counter(
    "payper_agent_reports_sent_total", "Usage reports sent, by result.", ("result",)
)
DROPPED_USAGE_SECONDS = Counter(
    "payper_agent_dropped_usage_seconds_total",
    "Active GPU time in reports that were dropped unsent, by reason.",
    ("reason",),
)
DROPPED_REPORTS = Counter(
    "payper_agent_dropped_reports_total", "Usage reports dropped unsent, by reason.", ("reason",)
)
