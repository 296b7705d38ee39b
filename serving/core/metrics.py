"""The service's Prometheus metrics, correct with one worker or several.

With ``--workers N`` each worker is its own process; ``ranker serve`` then sets
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode): every worker writes its
values to files there and ``/metrics``, whichever worker answers, sums the counters and
histograms of all of them. ``ranker_model_info`` is then one series per worker (a ``pid``
label), so a rollout shows which worker serves which version.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
MEDIA_TYPE = CONTENT_TYPE_LATEST


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROCESS_DIR))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ranker_requests",
            "Requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ranker_request_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
        )
        self.candidates = Histogram(
            "ranker_candidates",
            "Candidates per rank request",
            registry=self.registry,
            buckets=(1, 10, 50, 100, 200, 500, 1000, 2000),
        )
        self.model = Gauge(
            "ranker_model_info",
            "The model being served (1; 0 for a version a worker replaced)",
            ["name", "version"],
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.shed = Counter(
            "ranker_requests_shed",
            "Rank requests answered without scoring: overload (503, over --max_in_flight) or "
            "deadline (504, could not start scoring in time)",
            ["reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ranker_requests_in_flight",
            "Rank requests held now, scoring or waiting to (summed over the workers)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.reloads = Counter(
            "ranker_model_reloads", "Model reloads by result", ["result"], registry=self.registry
        )

    def serving(self, name: str, version: str, replaced: tuple[str, str] | None) -> None:
        """Mark the version now served. A replaced one is set to 0 before it is dropped: in
        multiprocess mode its last value stays in the worker's file."""
        if replaced is not None and replaced != (name, version):
            self.model.labels(*replaced).set(0)
            self.model.remove(*replaced)
        self.model.labels(name, version).set(1)

    def exposition(self) -> bytes:
        """The text ``/metrics`` answers: this process's metrics, or every worker's."""
        if not multiprocess_mode():
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    @staticmethod
    def worker_exited() -> None:
        """Drop this worker's live gauges (its counters and histograms still count)."""
        if multiprocess_mode():
            multiprocess.mark_process_dead(os.getpid())
