"""Prometheus metrics on a registry of the app's own (so many apps in one process never clash).

The API's middleware counts requests by route template, method and status and times them; the
batchers and the model cache report batches, queue depth and cache use through the same
``Metrics`` object, and the training side registers its collector of job gauges on its registry.

Next to them, Triton's inference metrics under Triton's own names and meanings, labelled by
``model`` and ``version``, so that dashboards built for Triton work unchanged:
``nv_inference_request_success``/``_failure`` (requests), ``nv_inference_count`` (rows
inferred) and ``nv_inference_exec_count`` (forward passes: their ratio is the batch size), the
cumulative microseconds ``nv_inference_request_duration_us``, ``nv_inference_queue_duration_us``
and ``nv_inference_compute_infer_duration_us`` (per request: a batch's compute time counts once for
each request in it, as in Triton), and the gauge ``nv_inference_pending_request_count``. The
cumulative ones only ever grow; they are exposed with the gauge type because prometheus_client
renames a counter ``<name>_total``, and Triton's names have no suffix (PromQL's ``rate`` works the
same on either type).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

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
        self.dropped = Counter("nfserve_batcher_dropped_total",
                               "Queued requests dropped before their forward pass because their "
                               "caller had gone (timed out or disconnected).", ["model"],
                               registry=r)
        self.warmups = Counter("nfserve_model_warmups_total",
                               "Warm-up passes run when a model loaded.", ["model", "version"],
                               registry=r)
        self.warmup_seconds = Gauge("nfserve_model_warmup_seconds",
                                    "Duration of a model's last warm-up pass.",
                                    ["model", "version"], registry=r)
        # Triton's names and meanings (see the module docstring).
        mv = ["model", "version"]
        self.nv_success = Gauge("nv_inference_request_success",
                                "Number of successful inference requests, all batch sizes.", mv,
                                registry=r)
        self.nv_failure = Gauge("nv_inference_request_failure",
                                "Number of failed inference requests, all batch sizes.", mv,
                                registry=r)
        self.nv_count = Gauge("nv_inference_count",
                              "Number of inferences performed (rows; a request of N rows counts "
                              "N).", mv, registry=r)
        self.nv_exec_count = Gauge("nv_inference_exec_count",
                                   "Number of model executions performed (forward passes).", mv,
                                   registry=r)
        self.nv_request_us = Gauge("nv_inference_request_duration_us",
                                   "Cumulative inference request duration in microseconds.", mv,
                                   registry=r)
        self.nv_queue_us = Gauge("nv_inference_queue_duration_us",
                                 "Cumulative inference queuing duration in microseconds.", mv,
                                 registry=r)
        self.nv_compute_us = Gauge("nv_inference_compute_infer_duration_us",
                                   "Cumulative compute inference duration in microseconds.", mv,
                                   registry=r)
        self.nv_pending_count = Gauge("nv_inference_pending_request_count",
                                      "Instantaneous number of pending requests awaiting "
                                      "execution per model.", mv, registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its latency (``route`` is the route's template)."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    # ------------------------------------------------------------------ Triton's metrics
    @staticmethod
    def _mv(label: str) -> tuple[str, str]:
        """``(model, version)`` of a ``name:version`` label."""
        name, _, version = label.rpartition(":")
        return (name, version) if name else (label, "")

    def nv_pending(self, label: str) -> Gauge:
        return self.nv_pending_count.labels(*self._mv(label))

    def observe_queue(self, label: str, seconds: float) -> None:
        """Add the queue time of the requests of one batch (their sum)."""
        self.nv_queue_us.labels(*self._mv(label)).inc(seconds * 1e6)

    def observe_exec(self, label: str, rows: int, requests: int, seconds: float) -> None:
        """Count one forward pass of ``rows`` rows for ``requests`` requests."""
        mv = self._mv(label)
        self.nv_exec_count.labels(*mv).inc()
        self.nv_count.labels(*mv).inc(rows)
        self.nv_compute_us.labels(*mv).inc(seconds * 1e6 * requests)

    @contextmanager
    def track_request(self, label: str) -> Iterator[None]:
        """Count the request run inside as a success or a failure, and its duration."""
        mv = self._mv(label)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.nv_failure.labels(*mv).inc()
            raise
        self.nv_success.labels(*mv).inc()
        self.nv_request_us.labels(*mv).inc((time.perf_counter() - start) * 1e6)

    def render(self) -> bytes:
        return generate_latest(self.registry)
