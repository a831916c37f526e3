"""Dropping the work of a client that went away.

``unless_disconnected(receive, work)`` awaits ``work`` while a watcher task waits for the ASGI
``http.disconnect`` message; when it comes first, the await is cancelled and
``ClientDisconnected`` raised. A request waiting in a batcher's queue has its future cancelled
with it, so the batcher drops it before its forward pass (``nfserve_batcher_dropped_total``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

__all__ = ["ClientDisconnected", "unless_disconnected"]

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed its connection before its answer was ready."""


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``await work``, cancelled (``ClientDisconnected``) if the client disconnects meanwhile.
    Call it once the request body has been read: the watcher consumes ``receive``'s messages."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise ClientDisconnected("The client disconnected before its answer") from None
        raise
    finally:
        watcher.cancel()
