"""Request statistics of one server: what tests and benchmarks assert on.

Written by the server's event loop, read from any thread (tests run the server in a daemon
thread), so every access takes one short lock; readers always get copies.
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class Stats:
    """Counters: requests per endpoint name (all versions together), downloads per
    SeriesInstanceUID (getImage and getImageWithMD5Hash only), getSingleImage answers begun per
SOPInstanceUID (``instances``), body bytes sent by the download
    endpoints (ZIPs and getSingleImage; query answers are not counted), injected faults per kind,
    and the series ZIPs being sent now and at most at once (``downloads_in_flight``,
    ``downloads_in_flight_peak``: what a client's limit on connections in flight is checked by)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._downloads: Counter[str] = Counter()
        self._instances: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._bytes_sent = 0
        self._in_flight = 0       # series ZIPs being sent now
        self._in_flight_peak = 0  # ... and the most at once since the last reset
        self._bodies = 0          # download bodies being sent now
        self._bodies_peak = 0     # ... and the most at once since the last reset

    def download_began(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._in_flight_peak = max(self._in_flight_peak, self._in_flight)

    def download_ended(self) -> None:
        with self._lock:
            self._in_flight -= 1

    @property
    def downloads_in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def downloads_in_flight_peak(self) -> int:
        with self._lock:
            return self._in_flight_peak

    def body_started(self) -> None:
        with self._lock:
            self._bodies += 1
            self._bodies_peak = max(self._bodies_peak, self._bodies)

    def body_ended(self) -> None:
        with self._lock:
            self._bodies -= 1

    @property
    def bodies_peak(self) -> int:
        """The most download bodies (ZIPs, getSingleImage answers) sent at once since the last
        reset: the client's connections moving bytes, as the server saw them."""
        with self._lock:
            return self._bodies_peak

    def count_request(self, endpoint: str) -> None:
        with self._lock:
            self._requests[endpoint] += 1

    def count_download(self, series_uid: str) -> None:
        with self._lock:
            self._downloads[series_uid] += 1

    def count_instance(self, sop_uid: str) -> None:
        with self._lock:
            self._instances[sop_uid] += 1

    def count_fault(self, kind: str) -> None:
        with self._lock:
            self._faults[kind] += 1

    def add_bytes(self, nbytes: int) -> None:
        with self._lock:
            self._bytes_sent += nbytes

    @property
    def requests(self) -> dict[str, int]:
        with self._lock:
            return dict(self._requests)

    @property
    def downloads(self) -> dict[str, int]:
        with self._lock:
            return dict(self._downloads)

    @property
    def instances(self) -> dict[str, int]:
        with self._lock:
            return dict(self._instances)

    @property
    def faults(self) -> dict[str, int]:
        with self._lock:
            return dict(self._faults)

    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return self._bytes_sent

    def reset(self) -> None:
        """Forget everything counted so far."""
        with self._lock:
            self._requests.clear()
            self._downloads.clear()
            self._instances.clear()
            self._faults.clear()
            self._bytes_sent = 0
            self._in_flight_peak = self._in_flight
            self._bodies_peak = self._bodies

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: ``{"requests", "downloads", "instances", "bytes_sent", "faults"}``."""
        with self._lock:
            return {
                "requests": dict(self._requests),
                "downloads": dict(self._downloads),
                "instances": dict(self._instances),
                "bytes_sent": self._bytes_sent,
                "faults": dict(self._faults),
            }
