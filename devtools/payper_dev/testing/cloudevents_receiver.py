"""A CloudEvents sink on loopback, for the export tests: every event is parsed with the
CloudEvents SDK (one it cannot read fails the request, and the operator must retry it),
and every delivery is kept, resends included, so a test can count ids.

It can be switched down (503), or slow: it keeps the events but answers only after the
operator's timeout, so the operator resends what the sink already has (the same ids).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from cloudevents.core.formats.json import JSONFormat

from payper_dev.testing.threaded_server import ThreadedServer

MAX_BODY = 8 * 1024 * 1024


@dataclass(frozen=True)
class Received:
    id: str
    type: str
    source: str
    subject: str | None
    time_ms: int
    data: dict[str, Any]


class CloudEventsReceiver(ThreadedServer):
    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.received: list[Received] = []
        self.mode = "up"
        """up; down (503); slow (keeps the events, answers after ``slow_s``)."""
        self.slow_s = 0.0
        self.requests = 0
        self.refused = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"{self.base_url}/events"

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests += 1
            mode = self.mode
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(min(length, MAX_BODY))
        if mode == "down":
            self.answer(request, 503)
            return
        try:
            if request.headers.get("Content-Type") != "application/cloudevents-batch+json":
                raise ValueError(f"content type {request.headers.get('Content-Type')}")
            events = [JSONFormat().read(None, json.dumps(item)) for item in json.loads(body)]
            parsed = []
            for event in events:
                data = event.get_data()
                when = event.get_time()
                if not isinstance(data, dict) or when is None:
                    raise ValueError(f"event {event.get_id()}: no JSON data or no time")
                parsed.append(
                    Received(
                        event.get_id(),
                        event.get_type(),
                        event.get_source(),
                        event.get_subject(),
                        int(when.timestamp() * 1000),
                        data,
                    )
                )
        except (ValueError, TypeError, KeyError) as error:
            with self._lock:
                self.refused += 1
            self.answer(request, 400, str(error).encode())
            return
        with self._lock:
            self.received.extend(parsed)
        if mode == "slow":
            time.sleep(self.slow_s)
        self.answer(request, 202)

    def events(self) -> list[Received]:
        with self._lock:
            return list(self.received)
