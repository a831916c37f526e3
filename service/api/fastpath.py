"""The inference fast path: ASGI middleware that answers ``POST /log_prob`` and ``POST /sample``
straight from the scope, over the same protocol layer as the FastAPI routes.

FastAPI's router, dependency solver and request object cost more event-loop time per small request
than parsing, scoring and answering it (measured with py-spy: about half the server's CPU for a
100-row /log_prob). With dynamic batching the forward pass is shared by many requests, so that
per-request HTTP work is what bounds throughput. ``FastPath`` reads the request into a ``Call``
(the same API-key check and size-limited body as the routes), asks the ``DataPlane`` and sends the
answer or the error, with the same statuses, headers and messages. It passes every other request
on.

It is middleware added through Starlette's supported API (``app.add_middleware``), innermost of
the app's own, so the request metrics and any middleware added later (CORS, tracing) see the two
fast routes like every other. It marks the scope with the route it answers, as Starlette's router
does, so those middlewares see its path template too. ``NFSERVE_FAST_PATH=false`` leaves it out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qsl

from starlette.datastructures import State
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ..inference import Call, DataPlane
from ..settings import Settings
from ..wire import JSON
from .deps import bearer_token, check_key, collect_body
from .disconnect import ClientDisconnected, unless_disconnected
from .errors import describe, error_body

__all__ = ["FastPath"]


class FastPath:
    """Answers the inference routes ``routes`` (path -> the FastAPI route it stands for) from the
    app's ``state`` (its settings and data plane, once the lifespan has started)."""

    def __init__(self, app: ASGIApp, *, state: State, routes: dict[str, BaseRoute]):
        self.app = app
        self.state = state
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.routes:
            plane = getattr(self.state, "data_plane", None)  # None until the lifespan has started
            if plane is not None:
                scope["route"] = self.routes[scope["path"]]
                await _answer(scope, receive, send, self.state.settings, plane)
                return
        await self.app(scope, receive, send)


async def _answer(scope: Scope, receive: Receive, send: Send, settings: Settings,
                  plane: DataPlane) -> None:
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
        answer = await unless_disconnected(receive, plane.answer(scope["path"], call))
        status, content, media_type, extra = 200, answer.body, answer.media_type, None
    except (_Disconnected, ClientDisconnected):  # nobody to answer; queued work was dropped
        return
    except Exception as exc:  # every error becomes its status and {"detail": ...}
        status, detail, extra = describe(exc)
        content, media_type = error_body(detail), JSON
    response_headers = [(b"content-type", media_type.encode()),
                        (b"content-length", str(len(content)).encode())]
    if extra:
        response_headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": content})


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
