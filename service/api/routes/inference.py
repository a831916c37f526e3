"""``POST /log_prob`` and ``POST /sample`` as FastAPI routes: thin adapters over the protocol layer.

Each reads the request into a ``Call`` (the body size-limited while streaming), hands it to the
``DataPlane`` (decode, check, batch, encode) and sends the answer back. The fast path
(``service.api.fastpath``) does the same from the ASGI scope; these routes document the API
(``/docs``) and serve when ``NFSERVE_FAST_PATH=false``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from ...inference import Call, DataPlane
from ...settings import Settings
from ...wire import LOG_PROB, OCTET_STREAM, SAMPLE
from ..deps import DataPlaneDep, ReadAccess, SettingsDep, read_body
from ..disconnect import ClientDisconnected, unless_disconnected
from ..schemas import (
    ErrorPublic,
    LogProbOptions,
    LogProbRequest,
    LogProbResponse,
    SampleOptions,
    SampleRequest,
    SampleResponse,
)

__all__ = ["router"]

router = APIRouter(tags=["inference"], dependencies=[ReadAccess])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorPublic, "description": text} for code, text in [
        (401, "Missing or invalid API key"), (403, "Key lacks the scope"),
        (404, "Unknown model or version"),
        (408, "The request's own timeout_ms passed; it was dropped before its forward pass"),
        (413, "Over the row, n or body-size limit"),
        (415, "Body neither JSON nor safetensors"),
        (422, "Bad JSON, shape, dimension, empty or non-finite input"),
        (503, "Overloaded: queue full or deadline passed; retry later")]}


def _query_doc(schema: type[BaseModel]) -> list[dict[str, Any]]:
    """The options of ``schema`` as documented query parameters (used by binary requests)."""
    props = schema.model_json_schema()["properties"]
    return [{"name": name, "in": "query", "required": False,
             "description": f"{prop.get('description', '')} (binary requests; a JSON body "
                            f"carries it instead)",
             "schema": {k: v for k, v in prop.items() if k not in ("description", "examples")},
             **({"example": prop["examples"][0]} if prop.get("examples") else {})}
            for name, prop in props.items()]


def _binary_doc(schema: type[BaseModel], options: type[BaseModel], tensors: str, *,
                required: bool) -> dict[str, Any]:
    return {"parameters": _query_doc(options), "requestBody": {"required": required, "content": {
        "application/json": {"schema": schema.model_json_schema()},
        OCTET_STREAM: {"schema": {"type": "string", "format": "binary",
                                  "description": f"safetensors file with tensors {tensors}; "
                                                 f"options in the query string"}}}}}


def _binary_answer(tensors: str) -> dict[str, Any]:
    return {"content": {OCTET_STREAM: {"schema": {
        "type": "string", "format": "binary",
        "description": f"safetensors file with tensors {tensors} (with Accept: "
                       f"application/octet-stream)"}}}}


async def _adapt(request: Request, plane: DataPlane, settings: Settings, route: str) -> Response:
    headers = request.headers
    call = Call(headers.get("content-type", ""), headers.get("accept", ""),
                dict(request.query_params), await read_body(request, settings.max_body_bytes))
    try:
        answer = await unless_disconnected(request.receive, plane.answer(route, call))
    except ClientDisconnected:  # nobody reads this answer; the queued work was dropped
        return Response(status_code=499)
    return Response(answer.body, media_type=answer.media_type)


def _endpoint(route: str, name: str, summary: str) -> Callable[..., Awaitable[Response]]:
    async def endpoint(request: Request, plane: DataPlaneDep, settings: SettingsDep) -> Response:
        return await _adapt(request, plane, settings, route)

    endpoint.__name__, endpoint.__doc__ = name, summary
    return endpoint


# (route, handler name, what it does, request body, its options, answer, tensors in and out)
_ROUTES = [
    (LOG_PROB, "score_points",
     "Log density of each row of x under a model (latest version unless version is given).",
     LogProbRequest, LogProbOptions, LogProbResponse, "x (rows, dim) and optionally context",
     "log_prob"),
    (SAMPLE, "draw_samples",
     "Draw n samples and their log densities; the same seed gives the same samples.",
     SampleRequest, SampleOptions, SampleResponse, "context (optional, conditional models)",
     "samples (n, dim) and log_prob (n,)"),
]
for route, name, summary, body, options, answer, given, returned in _ROUTES:
    router.add_api_route(
        route, _endpoint(route, name, summary), methods=["POST"], response_model=answer,
        responses={200: _binary_answer(returned), **_ERRORS},
        openapi_extra=_binary_doc(body, options, given, required=route == LOG_PROB))
