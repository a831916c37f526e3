"""The wire contract shared by the client and the server: media types, tensor names, job statuses
and the HTTP status of each kind of error. Standard library only, so the client installs alone.

Example:
    >>> STATUS[ErrorKind.NOT_FOUND], JobStatus.QUEUED in JobStatus.active()
    (404, True)
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "JSON", "OCTET_STREAM", "LOG_PROB", "SAMPLE", "REQUEST_TENSORS", "ANSWER_TENSORS",
    "JobStatus", "ErrorKind", "STATUS",
    "TARGET_METADATA", "TARGET_ANSWER_TENSORS",
]

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"  # a safetensors body

#: The two inference routes.
LOG_PROB = "/log_prob"
SAMPLE = "/sample"

#: Tensors a binary (safetensors) request may carry, and those its answer holds.
REQUEST_TENSORS: dict[str, tuple[str, ...]] = {LOG_PROB: ("x", "context"), SAMPLE: ("context",)}
ANSWER_TENSORS: dict[str, tuple[str, ...]] = {LOG_PROB: ("log_prob",),
                                              SAMPLE: ("samples", "log_prob")}

#: A model fit to a model-language target: the artifact metadata key holding the target's JSON,
#: and the tensors of its /sample answer (the column names go in the safetensors metadata,
#: ``columns``, as JSON text).
TARGET_METADATA = "target"
TARGET_ANSWER_TENSORS: tuple[str, ...] = ("samples", "log_prob", "target_log_prob")


class JobStatus(StrEnum):
    """Where a training job stands. ``queued`` and ``running`` are active; the others are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def active(cls) -> frozenset[JobStatus]:
        return frozenset({cls.QUEUED, cls.RUNNING})

    @classmethod
    def final(cls) -> frozenset[JobStatus]:
        return frozenset(cls) - cls.active()


class ErrorKind(StrEnum):
    """What went wrong, independently of the protocol; ``STATUS`` gives its HTTP status."""

    INVALID_INPUT = "invalid_input"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's own timeout_ms passed


STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_INPUT: 422,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.PAYLOAD_TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.DEADLINE_EXCEEDED: 408,  # a 4xx: the request's own deadline, not the server's fault
}
