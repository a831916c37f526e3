"""A pure-ASGI path for ``POST /log_prob`` and ``POST /sample``, the routes that take the load.

FastAPI's router, dependency solver, request object and middleware stack cost more event-loop
time per small request than parsing, scoring and answering it (measured with py-spy: about half
the server's CPU for a 100-row /log_prob). With dynamic batching the forward pass is shared by many
requests, so that per-request HTTP work is what bounds throughput. ``FastPath`` answers those two
routes straight from the ASGI scope, with the very handlers the FastAPI routes use
(``service.routers.inference``): the same parsing, checks, API keys, messages and status codes,
and the same request metrics. The FastAPI routes stay registered, for ``/docs`` and for
``NFSERVE_FAST_PATH=false``; ``NFServeAPI`` puts the fast path in front of the FastAPI app.

Being in front, it also bypasses middleware added to the app (CORS, say) for those two routes:
a deployment that needs such middleware on them sets ``NFSERVE_FAST_PATH=false``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from .deps import bearer_token, check_key, collect_body
from .errors import describe
from .routers.inference import Call, log_prob_answer, sample_answer

__all__ = ["NFServeAPI"]

_HANDLERS: dict[str, Callable[..., Awaitable[tuple[bytes, str]]]] = {
    "/log_prob": log_prob_answer, "/sample": sample_answer}


class NFServeAPI(FastAPI):
    """FastAPI with the inference fast path in front of its middleware stack and router."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in _HANDLERS:
            state = self.state
            settings = getattr(state, "settings", None)
            engine = getattr(state, "engine", None)  # None until the lifespan has started
            if settings is not None and settings.fast_path and engine is not None:
                await _answer(scope, receive, send, settings, engine, state.metrics)
                return
        await super().__call__(scope, receive, send)


async def _answer(scope: Scope, receive: Receive, send: Send, settings, engine, metrics) -> None:
    start = time.perf_counter()
    path = scope["path"]
    try:
        headers = dict(scope["headers"])  # ASGI: lower-case names, bytes
        check_key(settings, bearer_token(headers.get(b"authorization", b"").decode("latin-1")),
                  write=False)
        declared = headers.get(b"content-length")
        body = await collect_body(_chunks(receive), None if declared is None
                                  else declared.decode("latin-1"), settings.max_body_bytes)
        qs = scope.get("query_string", b"")
        call = Call(headers.get(b"content-type", b"").decode("latin-1"),
                    headers.get(b"accept", b"").decode("latin-1"),
                    dict(parse_qsl(qs.decode("latin-1"), keep_blank_values=True)) if qs else {},
                    body)
        content, media_type = await _HANDLERS[path](engine, settings, call)
        status, extra = 200, None
    except _Disconnected:  # nobody to answer
        return
    except Exception as exc:  # every error becomes its status and {"detail": ...}
        status, detail, extra = describe(exc)
        content, media_type = orjson.dumps({"detail": detail}), "application/json"
    response_headers = [(b"content-type", media_type.encode()),
                        (b"content-length", str(len(content)).encode())]
    if extra:
        response_headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
    try:
        await send({"type": "http.response.start", "status": status,
                    "headers": response_headers})
        await send({"type": "http.response.body", "body": content})
    finally:
        metrics.observe_request(path, "POST", status, time.perf_counter() - start)


class _Disconnected(Exception):
    """The client went away before its body was read."""


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's chunks, as ASGI ``http.request`` messages deliver them."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return
