"""ASGI middleware of the app: request counts and latencies by route template, method and status.

Pure ASGI (no per-request task or body copy). The route template comes from ``scope["route"]``,
which Starlette's router sets, and so does the inference fast path for its two routes.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..metrics import Metrics

__all__ = ["MetricsMiddleware"]


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
        status = 499  # the client went away before an answer started ("client closed request")

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if status == 499:  # the error answer is sent outside (a 500)
                status = 500
            raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(path, scope["method"], status,
                                         time.perf_counter() - start)
