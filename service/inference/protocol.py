"""The inference protocol layer: decode a request (JSON or safetensors), check it once, run it
through the model's batcher, and encode the answer. It knows no web framework.

``DataPlane.answer(route, call)`` serves ``/log_prob`` and ``/sample`` for any adapter: the FastAPI
routes and the fast path (``service.api``) only read the request into a ``Call`` and send the
``Answer`` back, as KServe's REST endpoints do over its data plane. ``score`` and ``draw`` take
arrays already decoded (the plot route uses them) and make the same checks.

A binary request sends ``Content-Type: application/octet-stream`` with the tensors of
``wire.REQUEST_TENSORS`` and the options in the query string; ``Accept: application/octet-stream``
asks for a safetensors answer (``wire.ANSWER_TENSORS``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from nfcore.train.diagnostics import MIN_DIAGNOSED_DRAWS

from ..errors import (
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from ..settings import Settings
from ..store import NAME_PATTERN
from ..wire import JSON, LOG_PROB, OCTET_STREAM, REQUEST_TENSORS, SAMPLE
from . import constrained
from .batcher import Kind, Pending
from .cache import LoadedModel, ModelCache

__all__ = ["DataPlane", "Call", "Answer", "LogProbOptions", "SampleOptions", "as_rows",
           "validation_message"]

_NP_DTYPES = {"float32": np.float32, "float64": np.float64}

_NAME = Field(description="Model name, as in GET /models.", examples=["two_moons"],
              pattern=NAME_PATTERN)
_VERSION = Field(None, ge=1, description="Model version; omitted means the latest.",
                 examples=[1])
_TIMEOUT = Field(None, gt=0, le=86_400_000,
                 description="This request's own deadline in milliseconds (below the server's "
                             "request_timeout_s): once past, it is dropped before its forward pass "
                             "and answered 408.", examples=[1000])


class LogProbOptions(BaseModel):
    """The non-array fields of a /log_prob request (query string of a binary request)."""

    model_config = ConfigDict(extra="forbid")

    model: str = _NAME
    version: int | None = _VERSION
    timeout_ms: float | None = _TIMEOUT


class SampleOptions(BaseModel):
    """The non-array fields of a /sample request (query string of a binary request)."""

    model_config = ConfigDict(extra="forbid")

    model: str = _NAME
    version: int | None = _VERSION
    timeout_ms: float | None = _TIMEOUT
    n: int = Field(ge=1, description="Number of samples.", examples=[3])
    seed: int | None = Field(
        None, ge=0, lt=2**63,
        description="Seed of this request's own noise: the same seed gives the same samples, "
                    "batched with other requests or not.", examples=[42])
    diagnose: bool = Field(
        False, description="For a model fit to a target (model-language, or built-in by "
        "name): also answer 'diagnostics' of these draws as importance samples of it (PSIS k̂, "
        f"ESS fraction, moment shift, a verdict with its reasons; n >= {MIN_DIAGNOSED_DRAWS}). "
        "For an amortized posterior they say whether to trust it for this observation.",
        examples=[False])


@dataclass(frozen=True, slots=True)
class Call:
    """What the protocol needs of a request, read once by an adapter."""

    content_type: str  # the Content-Type header ("" when absent)
    accept: str  # the Accept header
    query: dict[str, str]  # the query string (last value of each name)
    body: bytes

    @property
    def binary(self) -> bool:
        ctype = self.content_type.split(";")[0].strip().lower()
        if ctype in ("", JSON) or ctype.endswith("+json"):
            return False
        if ctype == OCTET_STREAM:
            return True
        raise UnsupportedMediaType(f"Unsupported Content-Type {ctype!r}; send {JSON} or "
                                   f"{OCTET_STREAM} (safetensors)")

    @property
    def wants_binary(self) -> bool:
        return OCTET_STREAM in self.accept


@dataclass(frozen=True, slots=True)
class Answer:
    """An encoded answer: its body and media type."""

    body: bytes
    media_type: str


def validation_message(errors: list[dict]) -> str:
    """One readable line from pydantic's error list ("field: message; …")."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            parts.append(f"Request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}")
        else:
            parts.append(f"{loc}: {msg}")
    return "; ".join(parts) or "Invalid request"


def as_rows(value: object, what: str, width: int, dtype: type, *, allow_single: bool = False
            ) -> np.ndarray:
    """``value`` as a C-contiguous (rows, width) array of ``dtype``, or ``InvalidInput``."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"{what} must be a rectangular array of numbers: {e}") from None
    if arr.dtype == object:
        raise InvalidInput(f"{what} must be a rectangular array of numbers; it holds null or "
                           f"non-numeric values")
    if arr.dtype.kind not in "fiub":
        raise InvalidInput(f"{what} must be a rectangular array of numbers; got elements of "
                           f"type {arr.dtype}")
    if arr.size == 0:
        raise InvalidInput(f"{what} is empty: send at least one row of {width} values")
    if arr.ndim == 1 and allow_single:
        arr = arr[None]
    if arr.ndim != 2:
        raise InvalidInput(f"{what} must be a 2-D array of shape (rows, {width}); got shape "
                           f"{tuple(arr.shape)}")
    if arr.shape[1] != width:
        raise InvalidInput(f"{what} has {arr.shape[1]} columns; the model expects {width}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise InvalidInput(f"{what} holds NaN or infinite values (first at row {bad[0]}, "
                           f"column {bad[1]})")
    return arr


# ---------------------------------------------------------------------------------- decoding
#: Array fields a JSON body may carry besides the tensors: a model fit to a model-language target
#: takes named constrained ``values`` (``service.inference.constrained``).
_JSON_ARRAYS: dict[str, tuple[str, ...]] = {LOG_PROB: ("values",), SAMPLE: ()}


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


def _parse_tensors(body: bytes, route: str) -> dict[str, np.ndarray]:
    if not body:
        return {}
    try:
        tensors = st_load(body)
    except (SafetensorError, ValueError, TypeError) as e:
        raise InvalidInput(f"Request body is not a valid safetensors file: {e}") from None
    allowed = REQUEST_TENSORS[route]
    extra = sorted(set(tensors) - set(allowed))
    if extra:
        raise InvalidInput(f"Unexpected tensors {extra} in the body; allowed: {sorted(allowed)}")
    return tensors


def _options(cls: type[BaseModel], values: dict[str, Any]) -> Any:
    try:
        return cls.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        raise InvalidInput(validation_message(e.errors())) from None


def _decode(call: Call, route: str, options: type[BaseModel]
            ) -> tuple[Any, dict[str, Any]]:
    """``(options, arrays)`` of a call: tensors from a binary body, fields from a JSON one, and
    the options from the query string and the JSON body together."""
    names = options.model_fields
    query = {k: v for k, v in call.query.items() if k in names} if call.query else {}
    if call.binary:
        tensors = _parse_tensors(call.body, route)
        return _options(options, query), tensors
    if not call.body.strip() and "model" in query:  # every option in the query, no body
        return _options(options, query), {}
    data = _parse_json(call.body)
    arrays = {name: data.pop(name) for name in (*REQUEST_TENSORS[route], *_JSON_ARRAYS[route])
              if name in data}
    return _options(options, {**query, **data}), arrays


# ---------------------------------------------------------------------------------- encoding
def _encode(call: Call, model: LoadedModel, arrays: dict[str, np.ndarray], **fields: Any
            ) -> Answer:
    """The answer body: JSON with ``fields`` next to the arrays, or safetensors with them (as
    JSON text) in the metadata."""
    if call.wants_binary:
        meta = {"model": model.name, "version": str(model.version),
                **{k: orjson.dumps(v).decode() for k, v in fields.items()}}
        return Answer(st_save(arrays, metadata=meta), OCTET_STREAM)
    body = {"model": model.name, "version": model.version, **arrays, **fields}
    return Answer(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), JSON)


class DataPlane:
    """Decode, check, batch, encode, for the inference routes of one app."""

    def __init__(self, cache: ModelCache, settings: Settings):
        self.cache = cache
        self.settings = settings
        self.routes: dict[str, Callable[[Call], Awaitable[Answer]]] = {
            LOG_PROB: self.log_prob, SAMPLE: self.sample}

    async def answer(self, route: str, call: Call) -> Answer:
        """The answer to ``call`` on ``route`` (``/log_prob`` or ``/sample``)."""
        return await self.routes[route](call)

    async def log_prob(self, call: Call) -> Answer:
        opts, arrays = _decode(call, LOG_PROB, LogProbOptions)
        if arrays.get("x") is None and arrays.get("values") is None:
            raise InvalidInput("The safetensors body has no tensor 'x'" if call.binary
                               else "x: field required (a list of rows)")
        model, log_prob = await self.score(opts.model, opts.version, arrays.get("x"),
                                           arrays.get("context"), values=arrays.get("values"),
                                           timeout_ms=opts.timeout_ms)
        # A residual flow above its exact_dim scores with an unbiased estimate: say so.
        return _encode(call, model, {"log_prob": log_prob}, exact=model.flow.exact_log_prob)

    async def sample(self, call: Call) -> Answer:
        opts, arrays = _decode(call, SAMPLE, SampleOptions)
        model = builtin = None
        if opts.diagnose:
            if opts.n < MIN_DIAGNOSED_DRAWS:
                raise InvalidInput(f"diagnose needs n >= {MIN_DIAGNOSED_DRAWS} draws (k̂ from "
                                   f"fewer means little); got n = {opts.n}")
            # Checked before drawing, on the very version that then draws.
            model = await self.cache.get(opts.model, opts.version)
            if model.target is None:
                builtin = constrained.builtin_target_of(model.flow.metadata, model.flow.dim)
                if builtin is None:
                    raise InvalidInput(f"diagnose: model {opts.model!r} was not fit to a target "
                                       "(a model-language one, or a built-in one by name), so "
                                       "there is no target density to weigh its draws against")
        model, result = await self._draw(opts.model, opts.version, opts.n, seed=opts.seed,
                                         context=arrays.get("context"),
                                         timeout_ms=opts.timeout_ms, model=model)
        if model.target is None:
            arrays_out = {"samples": result[0], "log_prob": result[1]}
            fields: dict[str, Any] = {}
        else:
            # A model-language target: constrained samples with named columns, log q there and
            # the model's log density (service.inference.constrained).
            arrays_out = dict(zip(("samples", "log_prob", "target_log_prob"), result,
                                  strict=True))
            fields = {"columns": model.target.columns}
        if opts.diagnose:
            # PSIS and the moments: off the event loop (the first call imports scipy, ~1 s).
            fields["diagnostics"] = await asyncio.to_thread(
                constrained.diagnose, arrays_out["samples"], arrays_out["log_prob"],
                arrays_out.get("target_log_prob"), builtin=builtin)
        return _encode(call, model, arrays_out, **fields)

    # ------------------------------------------------------------------ checked runs
    def _check_rows(self, rows: int, what: str) -> None:
        if rows > self.settings.max_rows:
            raise PayloadTooLarge(f"{what} has {rows} rows; the limit is {self.settings.max_rows}")

    async def score(self, name: str, version: int | None, x: object, context: object = None,
                    *, values: object = None, timeout_ms: float | None = None
                    ) -> tuple[LoadedModel, np.ndarray]:
        """Score ``x`` (rows × dim) under the model: ``(model, log_prob)``. A model fit to a
        model-language target scores constrained values instead: named ``values`` or rows ``x``
        (``service.inference.constrained``)."""
        if isinstance(x, list | np.ndarray) and len(x) > self.settings.max_rows:
            self._check_rows(len(x), "x")  # before converting a huge list
        model = await self.cache.get(name, version)
        with self._track(model):
            flow = model.flow
            if model.target is not None:
                x = constrained.values_rows(model.target, values, x)
            elif values is not None:
                raise InvalidInput(f"values: model {model.label} was not fit to a model-language "
                                   f"target; send rows x")
            else:
                x = as_rows(x, "x", flow.dim, _NP_DTYPES[flow.spec["dtype"]])
            self._check_rows(x.shape[0], "x")
            ctx = self._context(model, context, x.shape[0])
            return model, await self._run(model, "log_prob", x.shape[0], timeout_ms, x=x,
                                          context=ctx)

    async def draw(self, name: str, version: int | None, n: int, *, seed: int | None = None,
                   context: object = None, timeout_ms: float | None = None
                   ) -> tuple[LoadedModel, np.ndarray, np.ndarray]:
        """``n`` samples and their log density: ``(model, samples, log_prob)`` (constrained, for a
        model fit to a model-language target)."""
        model, result = await self._draw(name, version, n, seed=seed, context=context,
                                         timeout_ms=timeout_ms)
        return model, result[0], result[1]

    async def _draw(self, name: str, version: int | None, n: int, *, seed: int | None = None,
                    context: object = None, timeout_ms: float | None = None,
                    model: LoadedModel | None = None
                    ) -> tuple[LoadedModel, tuple[np.ndarray, ...]]:
        """Draw from ``model``, or from the loaded ``name``/``version`` when it is None."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInput(f"n must be a positive integer; got {n!r}")
        if n > self.settings.max_sample_n:
            raise PayloadTooLarge(f"n = {n} is over the limit of {self.settings.max_sample_n}")
        if model is None:
            model = await self.cache.get(name, version)
        with self._track(model):
            ctx = self._context(model, context, n)
            return model, await self._run(model, "sample", n, timeout_ms, seed=seed, context=ctx)

    def _track(self, model: LoadedModel) -> AbstractContextManager[None]:
        """Triton's per-request counters of ``model`` (success, failure, duration)."""
        metrics = self.cache.metrics
        return metrics.track_request(model.label) if metrics else nullcontext()

    def _context(self, model: LoadedModel, context: object, rows: int) -> np.ndarray | None:
        flow = model.flow
        if flow.context_dim == 0:
            if context is not None:
                raise InvalidInput(f"Model {model.label} is unconditional; send no context")
            return None
        if context is None:
            raise InvalidInput(f"Model {model.label} needs a context of shape "
                               f"({rows}, {flow.context_dim}) or ({flow.context_dim},)")
        if isinstance(context, dict):  # named values of a model's 'context' block
            if model.target is None or not model.target.context_dim:
                raise InvalidInput(f"context: model {model.label} has no named context values; "
                                   "send rows")
            context = model.target.pack_context(context).numpy()
        ctx = as_rows(context, "context", flow.context_dim, _NP_DTYPES[flow.spec["dtype"]],
                      allow_single=True)
        if ctx.shape[0] not in (1, rows):
            raise InvalidInput(f"context has {ctx.shape[0]} rows; expected 1 or {rows}")
        return ctx

    async def _run(self, model: LoadedModel, kind: Kind, rows: int, timeout_ms: float | None,
                   **arrays: Any) -> Any:
        loop = asyncio.get_running_loop()
        timeout = self.settings.request_timeout_s
        own = (timeout_ms is not None and self.settings.allow_timeout_override
               and timeout_ms / 1000.0 < timeout)
        if own:
            timeout = timeout_ms / 1000.0
        pending = Pending(kind=kind, rows=rows, future=loop.create_future(), loop=loop,
                          deadline=time.monotonic() + timeout, own_deadline=own, **arrays)
        model.batcher.submit(pending)
        try:
            async with asyncio.timeout(timeout):
                return await pending.future
        except TimeoutError:
            if self.cache.metrics:
                self.cache.metrics.rejected.labels(model.label,
                                                   "timeout" if own else "deadline").inc()
            if own:
                raise DeadlineExceeded(
                    f"No result from model {model.label} within the request's timeout_ms of "
                    f"{timeout_ms:g} ms; a request still queued then is dropped before its "
                    f"forward pass") from None
            raise Overloaded(f"Model {model.label} is overloaded: no result within the "
                             f"{timeout:g} s request deadline; retry later") from None
