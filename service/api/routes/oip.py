"""The Open Inference Protocol v2 (KServe v2 / Triton HTTP) routes, beside the native API.

``GET /v2`` (server metadata), ``GET /v2/health/live`` and ``/v2/health/ready``,
``GET /v2/models/{name}[/versions/{version}]`` (model metadata), ``…/ready`` and
``POST …/infer``. The decoding, checks and encoding live in ``service.inference.oip``; scoring and
sampling go through the same ``DataPlane`` (limits, batcher, deadlines, metrics) as ``/log_prob``
and ``/sample``. Every error answers ``{"error": "<message>"}`` as the protocol says, with the
native API's status except that invalid input is a 400 (Triton's and KServe's code).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

import nfcore

from ...errors import ModelUnavailable, NotFound
from ...inference.oip import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    ModelMetadata,
    OipError,
    ServerMetadata,
    infer,
    model_metadata,
)
from ...inference.protocol import validation_message
from ...store import NAME_PATTERN, ModelStore
from ...wire import JSON, OCTET_STREAM
from ..deps import DataPlaneDep, ReadAccess, SettingsDep, StoreDep, read_body
from ..disconnect import ClientDisconnected, unless_disconnected
from ..errors import describe

__all__ = ["router"]


def _error(exc: Exception) -> Response:
    """``{"error": …}`` with the status of ``exc`` (invalid input: 400)."""
    if isinstance(exc, RequestValidationError):
        status, detail, headers = 400, validation_message(exc.errors()), None
    elif isinstance(exc, StarletteHTTPException):
        status, detail, headers = exc.status_code, str(exc.detail), exc.headers
    else:
        status, detail, headers = describe(exc)
        if status == 422:
            status = 400
    return Response(orjson.dumps({"error": detail}), status_code=status, headers=headers,
                    media_type=JSON)


class OipRoute(APIRoute):
    """A route whose every error, its dependencies' and validation's too, is ``{"error": …}``."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return _error(exc)

        return route


router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], route_class=OipRoute)

_E = {"model": OipError}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_E, "description": "Invalid request, path, input, shape or parameter"},
    401: {**_E, "description": "Missing or invalid API key"},
    403: {**_E, "description": "Key lacks the scope"},
    404: {**_E, "description": "Unknown model or version"},
    503: {**_E, "description": "The model cannot be loaded, or the server is overloaded"},
}
_INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    413: {**_E, "description": "Over the row, n or body-size limit"},
    408: {**_E, "description": "The request's own timeout passed before its result; if it "
                               "was still queued, it was dropped unrun"},
}

NamePath = Annotated[str, Path(description="Model name.", pattern=NAME_PATTERN,
                               examples=["two_moons"])]
VersionPath = Annotated[str, Path(description="Model version.", pattern=r"^[1-9][0-9]{0,8}$",
                                  examples=["1"])]


def _server_version() -> str:
    try:
        return package_version("nfserve")
    except PackageNotFoundError:
        return "0"


@router.get("", response_model=ServerMetadata)
async def read_server_metadata() -> ServerMetadata:
    """Server metadata: name, version and the protocol extensions it supports."""
    return ServerMetadata(name="nfserve", version=_server_version(),
                          extensions=["binary_tensor_data"])


@router.get("/health/live", responses={200: {"content": {JSON: {"example": {"live": True}}}}})
async def read_server_live() -> dict[str, bool]:
    """The server is live."""
    return {"live": True}


@router.get("/health/ready", responses={
    200: {"content": {JSON: {"example": {"ready": True}}}},
    503: {"description": "A readiness check failed", "content": {
        JSON: {"example": {"ready": False}}}}})
def read_server_ready(request: Request) -> Response:
    """Ready to serve: every check of ``GET /health/ready`` passes."""
    ok = True
    for check in request.app.state.readiness_checks:
        try:
            ok = ok and bool(check()[1])
        except Exception:  # a failing check is a failed check
            ok = False
    return Response(orjson.dumps({"ready": ok}), status_code=200 if ok else 503, media_type=JSON)


def _metadata(store: ModelStore, name: str, version: int | None) -> ModelMetadata:
    versions = store.versions(name)
    if not versions:
        raise NotFound(f"Unknown model {name!r}; GET /models lists the models")
    try:
        return model_metadata(store.info(name, store.resolve(name, version)), versions)
    except nfcore.NFCoreError as e:  # its file, or its stored target, is unreadable
        raise ModelUnavailable(f"Model {name!r} cannot be read: {e}") from None


@router.get("/models/{name}", response_model=ModelMetadata, responses=_ERRORS,
            dependencies=[ReadAccess])
def read_model_metadata(name: NamePath, store: StoreDep) -> ModelMetadata:
    """The latest version's metadata: its inputs (x, and context for a conditional model) and
    outputs (log_prob, samples) with datatypes and shapes."""
    return _metadata(store, name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata,
            responses=_ERRORS, dependencies=[ReadAccess])
def read_model_version_metadata(name: NamePath, version: VersionPath,
                                store: StoreDep) -> ModelMetadata:
    """One version's metadata."""
    return _metadata(store, name, int(version))


_READY = {200: {"content": {JSON: {"example": {"name": "two_moons", "ready": True}}}}, **_ERRORS}


async def _ready(plane: Any, name: str, version: int | None) -> dict[str, Any]:
    await plane.cache.get(name, version)  # loaded (and warmed up) once this returns
    return {"name": name, "ready": True}


@router.get("/models/{name}/ready", responses=_READY, dependencies=[ReadAccess])
async def read_model_ready(name: NamePath, plane: DataPlaneDep) -> dict[str, Any]:
    """The latest version is loaded and warmed up (this loads it if need be)."""
    return await _ready(plane, name, None)


@router.get("/models/{name}/versions/{version}/ready", responses=_READY,
            dependencies=[ReadAccess])
async def read_model_version_ready(name: NamePath, version: VersionPath,
                                   plane: DataPlaneDep) -> dict[str, Any]:
    """This version is loaded and warmed up (this loads it if need be)."""
    return await _ready(plane, name, int(version))


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with its ``#/$defs/…`` references replaced by their definitions (the request
    body is read raw, so its schema is not among FastAPI's components)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


_REQUEST_SCHEMA = InferRequest.model_json_schema()
_INFER_DOC = {"requestBody": {"required": True, "content": {
    JSON: {"schema": _inline(_REQUEST_SCHEMA, _REQUEST_SCHEMA.get("$defs", {}))},
    OCTET_STREAM: {"schema": {
        "type": "string", "format": "binary",
        "description": f"Triton's binary tensor data: the JSON request (its length in the "
                       f"{HEADER_LENGTH} header), then the raw bytes of each input whose "
                       f"parameters give binary_data_size, in order."}}}}}
_INFER_OK = {"description": "The outputs; with binary outputs, the JSON answer (its length in "
                            f"the {HEADER_LENGTH} header) followed by their raw bytes",
             "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}


async def _infer(request: Request, plane: Any, settings: Any, name: str,
                 version: int | None) -> Response:
    body = await read_body(request, settings.max_body_bytes)
    try:
        content, media_type, header_length = await unless_disconnected(
            request.receive, infer(plane, name, version, body, request.headers.get(HEADER_LENGTH)))
    except ClientDisconnected:  # nobody reads this answer; the queued work was dropped
        return Response(status_code=499)
    headers = {HEADER_LENGTH: str(header_length)} if header_length is not None else None
    return Response(content, media_type=media_type, headers=headers)


@router.post("/models/{name}/infer", response_model=InferResponse,
             responses={200: _INFER_OK, **_INFER_ERRORS}, openapi_extra=_INFER_DOC,
             dependencies=[ReadAccess])
async def infer_model(name: NamePath, request: Request, plane: DataPlaneDep,
                      settings: SettingsDep) -> Response:
    """Score (``{"op": "log_prob"}``, the default) or sample (``{"op": "sample", "n": …,
    "seed": …}``) with the latest version."""
    return await _infer(request, plane, settings, name, None)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse,
             responses={200: _INFER_OK, **_INFER_ERRORS}, openapi_extra=_INFER_DOC,
             dependencies=[ReadAccess])
async def infer_model_version(name: NamePath, version: VersionPath, request: Request,
                              plane: DataPlaneDep, settings: SettingsDep) -> Response:
    """Score or sample with this version."""
    return await _infer(request, plane, settings, name, int(version))
