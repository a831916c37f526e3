"""The service's domain errors: each says what went wrong and of which ``ErrorKind``; no HTTP here.

Inference, training and the store raise these (and nfcore raises its own typed errors); only
``service.api.errors`` turns them into HTTP answers.
"""

from __future__ import annotations

from .wire import ErrorKind

__all__ = [
    "ServiceError", "NotFound", "InvalidInput", "PayloadTooLarge", "Conflict",
    "UnsupportedMediaType", "Overloaded", "ModelUnavailable", "Unauthorized", "Forbidden",
    "DeadlineExceeded",
]


class ServiceError(Exception):
    """An error with a message meant for the client."""

    kind: ErrorKind = ErrorKind.INVALID_INPUT

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    """No such model, version, job or dataset."""

    kind = ErrorKind.NOT_FOUND


class InvalidInput(ServiceError):
    """Bad shape, value, spec, expression or option."""

    kind = ErrorKind.INVALID_INPUT


class PayloadTooLarge(ServiceError):
    """Over a row, sample or body-size limit."""

    kind = ErrorKind.PAYLOAD_TOO_LARGE


class Conflict(ServiceError):
    """The request contradicts the state: the version exists, the job already finished."""

    kind = ErrorKind.CONFLICT


class UnsupportedMediaType(ServiceError):
    """A body that is neither JSON nor safetensors."""

    kind = ErrorKind.UNSUPPORTED_MEDIA_TYPE


class Overloaded(ServiceError):
    """Queue full or deadline passed: retry later."""

    kind = ErrorKind.OVERLOADED


class ModelUnavailable(ServiceError):
    """A stored model file cannot be loaded (corrupted on disk): not the client's fault."""

    kind = ErrorKind.UNAVAILABLE


class Unauthorized(ServiceError):
    """No API key, or an unknown one."""

    kind = ErrorKind.UNAUTHORIZED


class Forbidden(ServiceError):
    """The API key lacks the scope."""

    kind = ErrorKind.FORBIDDEN


class DeadlineExceeded(ServiceError):
    """The request's own ``timeout_ms`` passed before it had a result (it is dropped unrun)."""

    kind = ErrorKind.DEADLINE_EXCEEDED
