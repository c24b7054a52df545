"""The gateway's Prometheus metrics (``payper_gateway_`` prefix, base units)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LABELS = ("namespace", "inference_deployment")

REQUESTS = Counter(
    "payper_gateway_requests_total",
    "Requests answered by the gateway, by HTTP status code.",
    (*LABELS, "code"),
)
DURATION = Histogram(
    "payper_gateway_request_duration_seconds",
    "Time from a request's arrival to its last response byte, cold-start wait included.",
    LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
# With several workers (payper.gateway.workers) each process writes its own values: the
# counts of requests add up over the live workers, the endpoints each one sees do not.
IN_FLIGHT = Gauge(
    "payper_gateway_requests_in_flight",
    "Requests being served or held.",
    LABELS,
    multiprocess_mode="livesum",
)
QUEUED = Gauge(
    "payper_gateway_queued_requests",
    "Requests held while their deployment has no ready endpoint.",
    LABELS,
    multiprocess_mode="livesum",
)
READY_ENDPOINTS = Gauge(
    "payper_gateway_ready_endpoints",
    "Ready pods the gateway sends the deployment's requests to.",
    LABELS,
    multiprocess_mode="livemax",
)
QUEUE_WAIT = Histogram(
    "payper_gateway_queue_wait_seconds",
    "How long held requests waited for a ready endpoint (cold starts).",
    LABELS,
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
UPSTREAM_ERRORS = Counter(
    "payper_gateway_upstream_errors_total",
    "Requests whose upstream connection failed (answered 502 or cut).",
    LABELS,
)
UNROUTED = Counter(
    "payper_gateway_unrouted_requests_total",
    "Requests for no known InferenceDeployment (answered 404). Unlabelled: the names in "
    "them come from clients.",
)
POKES = Counter(
    "payper_gateway_pokes_total",
    "Scale-from-zero pokes sent to the operator, by result.",
    ("result",),
)


class TargetMeters:
    """The metric children of one deployment, resolved once (``labels()`` is not free).

    They exist from the moment the gateway routes the deployment (so ``increase()`` starts
    from zero) until it stops routing it.
    """

    def __init__(self, namespace: str, name: str) -> None:
        self.labels = (namespace, name)
        self.in_flight = IN_FLIGHT.labels(namespace, name)
        self.queued = QUEUED.labels(namespace, name)
        self.ready_endpoints = READY_ENDPOINTS.labels(namespace, name)
        self.duration = DURATION.labels(namespace, name)
        self.queue_wait = QUEUE_WAIT.labels(namespace, name)
        self.upstream_errors = UPSTREAM_ERRORS.labels(namespace, name)
        self._by_code: dict[int, Counter] = {}

    def answered(self, code: int) -> None:
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = REQUESTS.labels(*self.labels, str(code))
        counter.inc()

    def remove(self) -> None:
        for gauge in (self.in_flight, self.queued, self.ready_endpoints):
            gauge.set(0)  # a worker's values outlive remove() in multiprocess mode
        for metric in (IN_FLIGHT, QUEUED, READY_ENDPOINTS, DURATION, QUEUE_WAIT, UPSTREAM_ERRORS):
            metric.remove(*self.labels)
        for code in self._by_code:
            REQUESTS.remove(*self.labels, str(code))
