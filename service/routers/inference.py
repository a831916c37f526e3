"""``POST /log_prob`` and ``POST /sample``: JSON for small requests, safetensors for large ones.

Bodies are read by hand (size-limited while streaming) and parsed with orjson or safetensors into
numpy, then checked once by the engine. A binary request sends ``Content-Type:
application/octet-stream`` with tensors ``x`` / ``context`` and the options in the query string;
``Accept: application/octet-stream`` asks for a safetensors answer (``log_prob`` / ``samples``).
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ..deps import EngineDep, ReadAccess, SettingsDep, read_body
from ..errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType, validation_message
from ..inference import InferenceEngine
from ..schemas import (
    OCTET_STREAM,
    ErrorPublic,
    LogProbOptions,
    LogProbRequest,
    LogProbResponse,
    SampleOptions,
    SampleRequest,
    SampleResponse,
)
from ..settings import Settings

__all__ = ["router", "Call", "log_prob_answer", "sample_answer"]

router = APIRouter(tags=["inference"], dependencies=[ReadAccess])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorPublic, "description": text} for code, text in [
        (401, "Missing or invalid API key"), (403, "Key lacks the scope"),
        (404, "Unknown model or version"), (413, "Over the row, n or body-size limit"),
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


@dataclass(frozen=True, slots=True)
class Call:
    """What the inference handlers need of a request, read once: used alike by the FastAPI routes
    below and by the pure-ASGI fast path (``service.fastpath``), so both answer the same."""

    content_type: str  # the Content-Type header ("" when absent)
    accept: str  # the Accept header
    query: dict[str, str]  # the query string (last value of each name)
    body: bytes

    @property
    def binary(self) -> bool:
        ctype = self.content_type.split(";")[0].strip().lower()
        if ctype in ("", "application/json") or ctype.endswith("+json"):
            return False
        if ctype == OCTET_STREAM:
            return True
        raise UnsupportedMediaType(f"Unsupported Content-Type {ctype!r}; send application/json "
                                   f"or {OCTET_STREAM} (safetensors)")

    @property
    def wants_binary(self) -> bool:
        return OCTET_STREAM in self.accept


def _loads(body: bytes) -> Any:
    """``orjson.loads`` with the garbage collector paused. Parsed JSON holds no reference cycles,
    yet a large body allocates enough lists to set off collections over the whole heap: half the
    parse time of a 1M-row ``x`` (measured). orjson keeps the GIL, so no other thread allocates
    while the collector is off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return orjson.loads(body)
    finally:
        if enabled:
            gc.enable()


def _parse_json(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidInput("Request body is empty; send a JSON object")
    try:
        data = _loads(body)
    except orjson.JSONDecodeError:
        try:  # the standard parser accepts NaN/Infinity, so those get their precise message later
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidInput(f"Request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"Request body must be a JSON object; got {type(data).__name__}")
    return data


def _parse_tensors(body: bytes, allowed: set[str]) -> dict[str, np.ndarray]:
    if not body:
        return {}
    try:
        tensors = st_load(body)
    except (SafetensorError, ValueError, TypeError) as e:
        raise InvalidInput(f"Request body is not a valid safetensors file: {e}") from None
    extra = sorted(set(tensors) - allowed)
    if extra:
        raise InvalidInput(f"Unexpected tensors {extra} in the body; allowed: {sorted(allowed)}")
    return tensors


def _options(cls: type[BaseModel], values: dict[str, Any]) -> Any:
    try:
        return cls.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        raise InvalidInput(validation_message(e.errors())) from None


@router.post(
    "/log_prob", response_model=LogProbResponse,
    responses={200: _binary_answer("log_prob"), **_ERRORS},
    openapi_extra=_binary_doc(LogProbRequest, LogProbOptions,
                              "x (rows, dim) and optionally context", required=True))
async def score_points(request: Request, engine: EngineDep, settings: SettingsDep) -> Response:
    """Log density of each row of x under a model (latest version unless version is given)."""
    return _answer(*await log_prob_answer(engine, settings, await _call(request, settings)))


@router.post(
    "/sample", response_model=SampleResponse,
    responses={200: _binary_answer("samples (n, dim) and log_prob (n,)"), **_ERRORS},
    openapi_extra=_binary_doc(SampleRequest, SampleOptions,
                              "context (optional, conditional models)", required=False))
async def draw_samples(request: Request, engine: EngineDep, settings: SettingsDep) -> Response:
    """Draw n samples and their log densities; the same seed gives the same samples."""
    return _answer(*await sample_answer(engine, settings, await _call(request, settings)))


async def _call(request: Request, settings: Settings) -> Call:
    headers = request.headers
    return Call(headers.get("content-type", ""), headers.get("accept", ""),
                dict(request.query_params), await read_body(request, settings.max_body_bytes))


def _answer(content: bytes, media_type: str) -> Response:
    return Response(content, media_type=media_type)


def _json(content: dict[str, Any]) -> tuple[bytes, str]:
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), "application/json"


def _tensors(tensors: dict[str, np.ndarray], loaded: Any) -> tuple[bytes, str]:
    return st_save(tensors, metadata={"model": loaded.name, "version": str(loaded.version)}), \
        OCTET_STREAM


def _pick(query: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {name: query[name] for name in names if name in query} if query else {}


async def log_prob_answer(engine: InferenceEngine, settings: Settings, call: Call
                          ) -> tuple[bytes, str]:
    """The answer to a /log_prob call: ``(body, media type)``; raises the service's errors."""
    binary = call.binary
    query = _pick(call.query, ("model", "version"))
    if binary:
        tensors = _parse_tensors(call.body, {"x", "context"})
        if "x" not in tensors:
            raise InvalidInput("The safetensors body has no tensor 'x'")
        opts = _options(LogProbOptions, query)
        x, context = tensors["x"], tensors.get("context")
    else:
        data = _parse_json(call.body)
        x, context = data.pop("x", None), data.pop("context", None)
        opts = _options(LogProbOptions, {**query, **data})
        if x is None:
            raise InvalidInput("x: field required (a list of rows)")
        if isinstance(x, list) and len(x) > settings.max_rows:
            raise PayloadTooLarge(f"x has {len(x)} rows; the limit is {settings.max_rows}")
    loaded, log_prob = await engine.log_prob(opts.model, opts.version, x, context)
    if call.wants_binary:
        return _tensors({"log_prob": log_prob}, loaded)
    return _json({"model": loaded.name, "version": loaded.version, "log_prob": log_prob})


async def sample_answer(engine: InferenceEngine, settings: Settings, call: Call
                        ) -> tuple[bytes, str]:
    """The answer to a /sample call: ``(body, media type)``; raises the service's errors."""
    binary = call.binary
    query = _pick(call.query, ("model", "version", "n", "seed"))
    if binary:
        context = _parse_tensors(call.body, {"context"}).get("context")
        opts = _options(SampleOptions, query)
    elif not call.body.strip() and "model" in query:  # all options in the query, no body
        context = None
        opts = _options(SampleOptions, query)
    else:
        data = _parse_json(call.body)
        context = data.pop("context", None)
        opts = _options(SampleOptions, {**query, **data})
    if opts.n > settings.max_sample_n:
        raise PayloadTooLarge(f"n = {opts.n} is over the limit of {settings.max_sample_n}")
    loaded, samples, log_q = await engine.sample(opts.model, opts.version, opts.n,
                                                 seed=opts.seed, context=context)
    if call.wants_binary:
        return _tensors({"samples": samples, "log_prob": log_q}, loaded)
    return _json({"model": loaded.name, "version": loaded.version, "samples": samples,
                  "log_prob": log_q})
