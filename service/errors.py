"""Every error the service answers with, and the one place that maps them to HTTP status codes.

Engine errors (``nfcore.errors``), store errors and the service's own errors all become
``{"detail": "<precise message>"}`` with a 4xx/503 status. Only a genuine bug gives a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nfcore import errors as engine

from .schemas import FastJSONResponse
from .store import InvalidName, ModelNotFound, VersionExists

__all__ = [
    "ServiceError", "NotFound", "InvalidInput", "PayloadTooLarge", "Conflict", "Overloaded",
    "ModelUnavailable", "Unauthorized", "Forbidden", "status_for", "install_error_handlers",
    "validation_message", "UnsupportedMediaType", "describe",
]

log = logging.getLogger("nfserve")


class ServiceError(Exception):
    """An error with an HTTP status and a message meant for the client."""

    status_code = 400
    headers: dict[str, str] | None = None

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    status_code = 404


class InvalidInput(ServiceError):
    status_code = 422


class PayloadTooLarge(ServiceError):
    status_code = 413


class Conflict(ServiceError):
    status_code = 409


class UnsupportedMediaType(ServiceError):
    status_code = 415


class Overloaded(ServiceError):
    """Queue full or deadline passed: retry later."""

    status_code = 503
    headers = {"Retry-After": "1"}


class ModelUnavailable(ServiceError):
    """A stored model file cannot be loaded (corrupted on disk): not the client's fault."""

    status_code = 503


class Unauthorized(ServiceError):
    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ServiceError):
    status_code = 403


# Engine and store exceptions -> status. Order matters: subclasses before their bases.
_STATUS: list[tuple[type[BaseException], int]] = [
    (ServiceError, 0),  # carries its own
    (ModelNotFound, 404),
    (VersionExists, 409),
    (InvalidName, 422),
    (engine.ShapeError, 422),
    (engine.SpecError, 422),
    (engine.ExpressionError, 422),
    (engine.TargetError, 422),
    (engine.ArtifactError, 422),
    (engine.TrainingCancelled, 409),
    (engine.NFCoreError, 422),
]


def status_for(exc: BaseException) -> int | None:
    """The HTTP status of a known error, or None for an unexpected one."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return exc.status_code if isinstance(exc, ServiceError) else status
    return None


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> FastJSONResponse:
    return FastJSONResponse({"detail": detail}, status_code=status, headers=headers)


def _bug(exc: BaseException) -> str:
    return f"Internal server error ({type(exc).__name__}); this is a bug"


def describe(exc: BaseException) -> tuple[int, str, dict[str, str] | None]:
    """``(status, detail, headers)`` of the answer to ``exc``; an unexpected error is logged and
    becomes a 500 that says it is a bug."""
    status = status_for(exc)
    if status is None:
        log.error("Unhandled error", exc_info=exc)
        return 500, _bug(exc), None
    if isinstance(exc, ServiceError):
        return status, exc.detail, exc.headers
    return status, str(exc), None


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


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every known error into ``{"detail": …}``."""

    async def known(request: Request, exc: Exception) -> FastJSONResponse:
        return _error(*describe(exc))

    async def validation(request: Request, exc: RequestValidationError) -> FastJSONResponse:
        return _error(422, validation_message(exc.errors()))

    async def http(request: Request, exc: StarletteHTTPException) -> FastJSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def unexpected(request: Request, exc: Exception) -> FastJSONResponse:
        log.exception("Unhandled error on %s %s", request.method, request.url.path)
        return _error(500, _bug(exc))

    for cls, _ in _STATUS:
        app.add_exception_handler(cls, known)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, unexpected)
