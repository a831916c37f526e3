"""Prometheus metrics on a registry of the app's own (so many apps in one process never clash).

``MetricsMiddleware`` counts requests by route template, method and status and times them; the
engine reports batches, queue depth and the model cache through the same ``Metrics`` object.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "MetricsMiddleware", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
_ROWS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


class Metrics:
    """All the service's metrics, on one ``CollectorRegistry``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("nfserve_requests_total", "HTTP requests by route and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("nfserve_request_duration_seconds",
                                 "HTTP request latency by route.", ["route", "method"],
                                 buckets=_LATENCY, registry=r)
        self.batch_rows = Histogram("nfserve_batch_rows", "Rows per batched forward pass.",
                                    ["model", "kind"], buckets=_ROWS, registry=r)
        self.batch_requests = Histogram("nfserve_batch_requests",
                                        "Requests coalesced into one forward pass.",
                                        ["model", "kind"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue_rows = Gauge("nfserve_batcher_queue_rows", "Rows waiting in a batcher.",
                                ["model"], registry=r)
        self.queue_requests = Gauge("nfserve_batcher_queue_requests",
                                    "Requests waiting in a batcher.", ["model"], registry=r)
        self.rejected = Counter("nfserve_batcher_rejected_total",
                                "Requests refused with 503 (queue full or deadline).",
                                ["model", "reason"], registry=r)
        self.cache_size = Gauge("nfserve_model_cache_size", "Models loaded in the LRU cache.",
                                registry=r)
        self.cache_hits = Counter("nfserve_model_cache_hits_total", "Model cache hits.",
                                  registry=r)
        self.cache_misses = Counter("nfserve_model_cache_misses_total",
                                    "Model cache misses (loads).", registry=r)
        self.cache_evictions = Counter("nfserve_model_cache_evictions_total",
                                       "Models evicted from the cache.", registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its latency (``route`` is the route's template)."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (no per-request task or body copy) recording count and latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(path, scope["method"], status,
                                         time.perf_counter() - start)
