"""The one place that turns errors into HTTP answers: ``{"detail": "<precise message>"}`` with the
status of the error's kind (``wire.STATUS``).

The service's domain errors carry their ``ErrorKind``; nfcore's typed errors are mapped here. Only a
genuine bug gives a 500, and says so.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nfcore import errors as nfcore_errors

from ..errors import ServiceError
from ..inference.protocol import validation_message
from ..wire import JSON, STATUS, ErrorKind

__all__ = ["describe", "install_error_handlers", "error_body"]

log = logging.getLogger("nfserve")

# nfcore's errors -> kind. Order matters: subclasses before their bases.
_ENGINE: list[tuple[type[BaseException], ErrorKind]] = [
    (nfcore_errors.TrainingCancelled, ErrorKind.CONFLICT),
    (nfcore_errors.SolverTimeout, ErrorKind.OVERLOADED),  # an ODE/fixed-point solve out of time
    (nfcore_errors.ConvergenceError, ErrorKind.INVALID_INPUT),  # the point has no solution here
    (nfcore_errors.NFCoreError, ErrorKind.INVALID_INPUT),  # spec, shape, expression, target, artifact
]

# Headers that go with a kind's answer.
_HEADERS: dict[ErrorKind, dict[str, str]] = {
    ErrorKind.OVERLOADED: {"Retry-After": "1"},
    ErrorKind.UNAUTHORIZED: {"WWW-Authenticate": "Bearer"},
}


def _kind(exc: BaseException) -> ErrorKind | None:
    if isinstance(exc, ServiceError):
        return exc.kind
    for cls, kind in _ENGINE:
        if isinstance(exc, cls):
            return kind
    return None


def describe(exc: BaseException) -> tuple[int, str, dict[str, str] | None]:
    """``(status, detail, headers)`` of the answer to ``exc``; an unexpected error is logged and
    becomes a 500 that says it is a bug."""
    kind = _kind(exc)
    if kind is None:
        log.error("Unhandled error", exc_info=exc)
        return 500, f"Internal server error ({type(exc).__name__}); this is a bug", None
    detail = exc.detail if isinstance(exc, ServiceError) else str(exc)
    return STATUS[kind], detail, _HEADERS.get(kind)


def error_body(detail: str) -> bytes:
    return orjson.dumps({"detail": detail})


def _answer(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(detail), status_code=status, headers=headers, media_type=JSON)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every known error into ``{"detail": …}``."""

    async def known(request: Request, exc: Exception) -> Response:
        return _answer(*describe(exc))

    async def validation(request: Request, exc: RequestValidationError) -> Response:
        return _answer(422, validation_message(exc.errors()))

    async def http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # FastAPI could not parse the body: bad input, a 422 as elsewhere
            return _answer(422, f"Request body could not be parsed: {exc.detail}")
        return _answer(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    for cls in (ServiceError, *(cls for cls, _ in _ENGINE), Exception):
        app.add_exception_handler(cls, known)  # an unknown Exception: a 500 that says so
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
