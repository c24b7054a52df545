"""The operator's Prometheus metrics (``payper_`` prefix, base units, ``_total`` counters)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LABELS = ("namespace", "inference_deployment")

COLD_START_DURATION = Histogram(
    "payper_cold_start_duration_seconds",
    "Time from a scale-up-from-zero decision to the first ready endpoint.",
    LABELS,
    buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600),
)
COLD_START_PHASE = Histogram(
    "payper_cold_start_phase_seconds",
    "Each measured phase of a cold start (create, schedule, image, start, ready, forward).",
    (*LABELS, "phase"),
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 45, 90, 180, 600),
)
COLD_STARTS = Counter(
    "payper_cold_starts_total", "Scale-ups from zero that reached a ready endpoint.", LABELS
)
DESIRED_REPLICAS = Gauge("payper_desired_replicas", "Replicas the autoscaler asks for.", LABELS)
IN_FLIGHT = Gauge(
    "payper_autoscaler_in_flight_requests",
    "Requests in flight (summed over the gateways) as the autoscaler last saw them.",
    LABELS,
)
SCALE_EVENTS = Counter(
    "payper_scale_events_total",
    "Changes of a Deployment's replicas made by the autoscaler.",
    (*LABELS, "direction"),
)
TICK_DURATION = Histogram(
    "payper_autoscaler_tick_duration_seconds",
    "Time one autoscaler tick takes for all deployments.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
)
SCALE_FROM_ZERO_LATENCY = Histogram(
    "payper_scale_from_zero_decision_seconds",
    "Time from a gateway's poke arriving to the Deployment asking for a replica.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
API_REQUESTS = Counter(
    "payper_operator_api_requests_total",
    "Calls to the operator's API (demand, poke, usage), by endpoint and result.",
    ("endpoint", "result"),
)
SIMULATED_REFUSED = Counter(
    "payper_usage_simulated_refused_total",
    "Usage report batches refused because a simulated backend measured them "
    "(billing.acceptSimulatedReports is off, as it must be on a real cluster).",
)
SYNC_DEADLINE_PASSED = Counter(
    "payper_operator_watch_sync_deadline_passed_total",
    "Times the watches had not delivered every object listed when leadership began within "
    "the deadline (objects deleted meanwhile, or a stuck watch); billing then went on.",
)
