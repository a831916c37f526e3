"""Dependencies as ``Annotated`` aliases, so handlers read like plain functions; API keys; bodies.

They are all ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop
per dependency per request that cost more than the rest of a small /log_prob request.

- ``SettingsDep``, ``StoreDep``, ``DataPlaneDep``, ``MetricsDep``, ``DatabaseDep``, ``QueueDep``:
  what the lifespan put on ``app.state``.
- ``require_read`` / ``require_write``: API-key checks (``Authorization: Bearer <key>``), a no-op
  when no keys are configured. Use them as ``dependencies=[ReadAccess]`` on a router or route.
- ``read_body``: the request body, refused with 413 from ``Content-Length`` before reading, and cut
  off while streaming once it passes the limit (so a huge body is never held in memory).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from ..errors import Forbidden, InvalidInput, PayloadTooLarge, Unauthorized
from ..inference import DataPlane
from ..metrics import Metrics
from ..settings import Settings
from ..store import ModelStore
from ..training import Database, JobQueue

__all__ = ["SettingsDep", "StoreDep", "DataPlaneDep", "MetricsDep", "DatabaseDep", "QueueDep",
           "ReadAccess", "WriteAccess", "require_read", "require_write", "read_body",
           "collect_body", "multipart_file", "check_key", "bearer_token"]


def _state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """The dependency that returns ``app.state.<name>``."""
    async def get(request: Request) -> Any:
        return getattr(request.app.state, name)
    get.__name__ = f"get_{name}"
    return get


SettingsDep = Annotated[Settings, Depends(_state("settings"))]
StoreDep = Annotated[ModelStore, Depends(_state("store"))]
DataPlaneDep = Annotated[DataPlane, Depends(_state("data_plane"))]
MetricsDep = Annotated[Metrics, Depends(_state("metrics"))]
DatabaseDep = Annotated[Database, Depends(_state("db"))]
QueueDep = Annotated[JobQueue, Depends(_state("queue"))]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`. "
                     "Needed only when the server is configured with keys.")
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _matches(key: str, keys: list[str]) -> bool:
    # Compare every key in constant time, so the timing says nothing about which one nearly matched.
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (None when absent or another scheme)."""
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def check_key(settings: Settings, key: str | None, *, write: bool) -> None:
    """Raise ``Unauthorized``/``Forbidden`` unless ``key`` has the scope (no-op without keys)."""
    if not settings.auth_enabled:
        return
    if not key:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
    if _matches(key, settings.api_keys_write):
        return
    if _matches(key, settings.api_keys_read):
        if write:
            raise Forbidden("This API key has the read scope only; uploads need a write key")
        return
    raise Unauthorized("Invalid API key")


async def require_read(settings: SettingsDep, credentials: CredentialsDep) -> None:
    """Scoring, sampling, listing and downloads: a read or write key."""
    check_key(settings, credentials and credentials.credentials, write=False)


async def require_write(settings: SettingsDep, credentials: CredentialsDep) -> None:
    """Uploads and other changes: a write key."""
    check_key(settings, credentials and credentials.credentials, write=True)


ReadAccess = Depends(require_read)
WriteAccess = Depends(require_write)


async def collect_body(chunks: AsyncIterator[bytes], declared: str | None, limit: int, *,
                       what: str = "Request body") -> bytes:
    """Join ``chunks`` into at most ``limit`` bytes; 413 as early as the size is known to be over
    (from the declared ``Content-Length`` before reading, else while streaming)."""
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidInput(f"Invalid Content-Length header {declared!r}") from None
        if size > limit:
            raise PayloadTooLarge(f"{what} of {size} bytes is over the limit of {limit} bytes")
    parts: list[bytes] = []
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"{what} is over the limit of {limit} bytes")
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_body(request: Request, limit: int, *, what: str = "Request body") -> bytes:
    """The whole body, at most ``limit`` bytes; 413 as early as the size is known to be over."""
    return await collect_body(request.stream(), request.headers.get("content-length"), limit,
                              what=what)


async def multipart_file(request: Request, body: bytes) -> tuple[bytes, str | None, str | None]:
    """The form field ``file`` of a ``multipart/form-data`` body already read (and size-checked)
    by ``read_body``: ``(bytes, file name, content type)``; 422 when there is no such file."""
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {k: v for k, v in request.scope.items() if k != "app"}  # parser errors raise, not 400
    try:
        form = await Request(scope, receive).form(max_files=1, max_fields=8)
    except MultiPartException as e:
        raise InvalidInput(f"Malformed multipart upload: {e.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("multipart upload: expected a file in the form field 'file'")
        return await upload.read(), upload.filename, upload.content_type
    finally:
        await form.close()
