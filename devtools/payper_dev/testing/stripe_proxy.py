"""Stripe on loopback, for the export tests: Stripe's own mock server (``stripe-mock``,
which validates every request against Stripe's API definition and keeps no state) behind
a proxy of ours that keeps every meter event it forwarded, resends included, so a test
can count identifiers.

The proxy can be switched down (503, nothing forwarded: Stripe unreachable for the
operator, which must retry) or slow (Stripe has the event, the operator never hears
so), and it records stripe-mock's answer to each request: one
that stripe-mock rejects is a request Stripe would reject.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs

from payper_dev.loopback import free_port
from payper_dev.testing.threaded_server import ThreadedServer

MAX_BODY = 1024 * 1024
METER_EVENTS = "/v1/billing/meter_events"
JSON = "application/json"


def stripe_mock_binary() -> Path:
    """``make stripe-mock`` builds it and names it in ``PAYPER_STRIPE_MOCK``."""
    found = os.environ.get("PAYPER_STRIPE_MOCK")
    if not found or not Path(found).is_file():
        raise RuntimeError(
            "stripe-mock is not built: run the tests through `make test-integration` "
            "(its stripe-mock target builds it and sets PAYPER_STRIPE_MOCK)"
        )
    return Path(found)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class StripeMock:
    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StripeMock:
        with self.log.open("wb") as out:
            self._process = subprocess.Popen(
                [str(stripe_mock_binary()), "-http-addr", f"127.0.0.1:{self.port}"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not _listening(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"stripe-mock did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)


@dataclass(frozen=True)
class MeterEvent:
    """One meter event request as the proxy forwarded it, and stripe-mock's answer."""

    identifier: str
    event_name: str
    timestamp: int
    customer: str
    value: str
    idempotency_key: str | None
    status: int
    at: float
    """When it was forwarded (``time.monotonic``)."""

    @property
    def content(self) -> tuple[str, int, str, str]:
        return (self.event_name, self.timestamp, self.customer, self.value)


class StripeProxy(ThreadedServer):
    def __init__(self, upstream: StripeMock) -> None:
        super().__init__()
        self.upstream = upstream
        self.mode = "up"
        """up; down (503, nothing forwarded); slow (forwarded, answered only after
        ``slow_s``: past the operator's timeout, so it resends what Stripe has)."""
        self.slow_s = 0.0
        self.meter_events: list[MeterEvent] = []
        self.other_requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.base_url

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(min(length, MAX_BODY))
        with self._lock:
            mode = self.mode
        if mode == "down":
            down = b'{"error": {"type": "api_error", "message": "down"}}'
            self.answer(request, 503, down, JSON)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream.port, timeout=10)
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in {"host", "connection"}
        }
        upstream.request(request.command, request.path, body=body or None, headers=headers)
        answer = upstream.getresponse()
        payload = answer.read()
        upstream.close()
        with self._lock:
            if request.command == "POST" and request.path == METER_EVENTS:
                form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
                self.meter_events.append(
                    MeterEvent(
                        identifier=form.get("identifier", ""),
                        event_name=form.get("event_name", ""),
                        timestamp=int(form.get("timestamp", "0")),
                        customer=form.get("payload[stripe_customer_id]", ""),
                        value=form.get("payload[value]", ""),
                        idempotency_key=request.headers.get("Idempotency-Key"),
                        status=answer.status,
                        at=time.monotonic(),
                    )
                )
            else:
                self.other_requests.append((request.command, request.path, answer.status))
        if mode == "slow":
            time.sleep(self.slow_s)
        self.answer(request, answer.status, payload, JSON)

    def events(self) -> list[MeterEvent]:
        with self._lock:
            return list(self.meter_events)
