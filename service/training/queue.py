"""The job queue: Huey, built from the settings, carrying job ids and nothing else.

``SqliteHuey`` in ``data_dir`` is the embedded default; ``RedisHuey`` is chosen by a ``redis://``
(or ``rediss://``, ``unix://``) queue URL so workers on other hosts can share it. The task code is
the same in both modes. Messages are JSON, never pickled objects: anyone who can write to Redis could
otherwise make every worker run code of their choosing.

The queue is only a doorbell. The job row in the database is the system of record, and a worker
claims the row atomically before it runs anything, so a lost, duplicated or stale message is
harmless; the reaper re-sends messages for jobs that need them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huey import Huey, RedisHuey, SqliteHuey
from huey.registry import Message
from huey.serializer import Serializer

from ..settings import Settings

__all__ = ["JSONSerializer", "JobQueue", "make_huey", "TASK_NAME"]

TASK_NAME = "run_job"


def _encode(obj: Any) -> Any:
    if isinstance(obj, Message):
        return {"__message__": [_encode(v) for v in obj]}
    if isinstance(obj, dt.datetime):
        return {"__datetime__": obj.isoformat()}
    if isinstance(obj, tuple | list):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("Queue messages take string keys only")
        return {k: _encode(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"Queue messages carry JSON values only; got {type(obj).__name__}")


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__message__"}:
            return Message(*[_decode(v) for v in obj["__message__"]])
        if set(obj) == {"__datetime__"}:
            return dt.datetime.fromisoformat(obj["__datetime__"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


class JSONSerializer(Serializer):
    """Huey messages as JSON. Only JSON values (plus Huey's own message tuples and datetimes)."""

    def _serialize(self, data: Any) -> bytes:
        return json.dumps(_encode(data), separators=(",", ":")).encode()

    def _deserialize(self, data: bytes) -> Any:
        return _decode(json.loads(bytes(data)))


def make_huey(settings: Settings) -> Huey:
    """The Huey instance the settings describe (``queue_url``, ``queue_name``, ``data_dir``)."""
    name = settings.queue_name
    url = settings.queue_url
    common = {"results": False, "serializer": JSONSerializer(), "utc": True}
    if not url:
        path = Path(settings.data_dir) / "queue.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteHuey(name, filename=str(path.resolve()), timeout=30, **common)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisHuey(name, url=url, **common)
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteHuey(name, filename=str(path), timeout=30, **common)
    raise ValueError(f"NFSERVE_QUEUE_URL: expected redis://…, rediss://…, unix://… or "
                     f"sqlite:///…; got {url!r}")


class JobQueue:
    """Sends job ids to the workers. A worker process sets ``handler`` to run them.

    Example:
        >>> q = JobQueue(Settings(data_dir="/tmp/nfserve-doctest", _env_file=None))
        >>> q.submit("job_1"); q.pending() >= 1
        True
        >>> q.huey.flush()
    """

    def __init__(self, settings: Settings, *, handler: Callable[[str], None] | None = None):
        self.huey = make_huey(settings)
        self.handler = handler
        # Only infrastructure errors (database unreachable at claim) escape the handler; retry them.
        self._task = self.huey.task(name=TASK_NAME, retries=5, retry_delay=2)(self._run)

    @property
    def is_redis(self) -> bool:
        return isinstance(self.huey, RedisHuey)

    def _run(self, job_id: str) -> None:
        if self.handler is None:
            raise RuntimeError("This process has no job handler; start `nfserve worker`")
        self.handler(job_id)

    def submit(self, job_id: str) -> None:
        """Ring the doorbell for ``job_id``; raises if the queue is unreachable."""
        self.huey.enqueue(self._task.s(job_id))

    def pending(self) -> int:
        """Messages waiting; also the readiness probe (raises if the queue is unreachable)."""
        return self.huey.pending_count()

    def ping(self) -> None:
        self.pending()

    def close(self) -> None:
        try:
            self.huey.storage.close()
        except Exception:  # best effort on shutdown
            pass
