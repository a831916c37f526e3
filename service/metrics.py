"""Prometheus metrics on a registry of the app's own (so many apps in one process never clash).

The API's middleware counts requests by route template, method and status and times them; the
batchers and the model cache report batches, queue depth and cache use through the same
``Metrics`` object, and the training side registers its collector of job gauges on its registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE"]

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
