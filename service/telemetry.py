"""Prometheus metrics: requests counted by a middleware, job figures read at scrape time.

Request counters live in the process-wide :data:`REGISTRY`. Job figures belong to an
app: :func:`job_registry` makes a registry reading one job store, which
:func:`service.app.create_app` keeps in ``app.state``; ``/metrics`` writes both. Two
apps in one process (tests, an embedded server) each report their own jobs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import JobState, JobStore

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "omnet_http_requests_total",
    "HTTP requests answered",
    ["method", "route", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "omnet_http_request_seconds", "Time to answer a request", ["method", "route"], registry=REGISTRY
)
DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class JobCollector:
    """Jobs by state, queue depth and job durations, from one job store."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        counts = self.store.counts()
        states = GaugeMetricFamily("omnet_jobs", "Job records by state", labels=["state"])
        for state, n in counts.items():
            states.add_metric([state], n)
        yield states
        yield GaugeMetricFamily(
            "omnet_queue_depth", "Jobs waiting for a worker", value=counts[JobState.QUEUED]
        )
        durations = self.store.durations()
        buckets, acc = [], 0
        for bound in DURATION_BUCKETS:
            acc = sum(1 for d in durations if d <= bound)
            buckets.append((str(bound), acc))
        buckets.append(("+Inf", len(durations)))
        hist = HistogramMetricFamily(
            "omnet_job_duration_seconds",
            "Seconds from submission to result of recent succeeded jobs",
            buckets=buckets,
            sum_value=sum(durations),
        )
        yield hist


def job_registry(store: JobStore) -> CollectorRegistry:
    """A registry holding the job figures of ``store`` (read at each scrape)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(JobCollector(store))
    return registry


class RequestMetrics:
    """ASGI middleware counting requests by method, route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            REQUESTS.labels(scope["method"], path, str(status)).inc()
            REQUEST_SECONDS.labels(scope["method"], path).observe(time.perf_counter() - start)
