"""Dynamic batching: coalesce concurrent requests for one model into few forward passes.

One ``Batcher`` per loaded model, with its own thread (never the event loop). Requests wait in a
bounded queue; the thread takes the oldest one and, when batching is on, every queued request of
the same kind up to ``max_batch_rows``, waiting at most ``max_queue_delay`` after the oldest one
arrived for the batch to fill (Triton's two knobs). A request that finds its model idle (nothing
queued, running or unanswered) runs at once instead: with nobody else in flight the wait could
only add the delay to a lone client's latency (2 ms on a 1-2 ms query), while under concurrent
load every request finds others in flight and the batch fills as before
(``run_idle_at_once=False`` restores the plain wait). It hands the batch to ``run``, a function that
returns one result per request (``service.inference.forward`` for a flow), and gives each request
its result through its event loop (one ``call_soon_threadsafe`` per batch and loop, not per
request). The batcher knows nothing about models, as Ray Serve's does not.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..errors import DeadlineExceeded, Overloaded
from ..metrics import Metrics

__all__ = ["Batcher", "Pending", "BatcherConfig", "Kind", "Run"]

Kind = Literal["log_prob", "sample"]


@dataclass(frozen=True)
class BatcherConfig:
    """The knobs (from settings)."""

    batching: bool = True
    max_batch_rows: int = 65536
    max_queue_delay_s: float = 0.002
    run_idle_at_once: bool = True  # a request that finds the model idle skips the queue delay
    max_queued_rows: int = 4_000_000
    max_queued_requests: int = 0  # requests waiting before 503; 0: bounded by rows only
    torch_threads: int = 0  # intra-op threads of the inference thread; 0: leave torch's default


@dataclass(eq=False)
class Pending:
    """One request waiting for its forward pass."""

    kind: Kind
    rows: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float
    # The arrays stay out of the repr: formatting a batch's rows would cost more than its pass.
    x: np.ndarray | None = field(default=None, repr=False)  # log_prob: (rows, dim), model dtype
    context: np.ndarray | None = field(default=None, repr=False)  # (rows, c) or (1, c)
    seed: int | None = None  # sample: seed of this request's noise
    own_deadline: bool = False  # the deadline is the request's timeout_ms (408), not the server's
    enqueued: float = field(default_factory=time.monotonic)
    alone: bool = False  # set by ``submit``: the model was idle when it came (no queue delay)


#: The pass over one batch: a result per request, in order (it raises to fail them all).
Run = Callable[[list[Pending]], list[Any]]


def _deliver(items: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for fut, value, exc in items:
        if fut.done():  # the request timed out or its client went away
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


class Batcher:
    """The queue and thread of one loaded model; ``run`` makes the passes (one at a time per
    ``device_lock``)."""

    def __init__(self, run: Run, label: str, config: BatcherConfig, *,
                 metrics: Metrics | None = None, device_lock: threading.Lock | None = None):
        self.run = run
        self.label = label
        self.config = config
        self.metrics = metrics
        self._lock = device_lock or threading.Lock()
        self._queue: deque[Pending] = deque()
        self._queued_rows = 0
        self._open = 0  # requests submitted and not yet answered (queued, running or delivering)
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # forward passes run (tests read it)
        self._thread = threading.Thread(target=self._run, name=f"nfserve-batcher-{label}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side
    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def submit(self, item: Pending) -> None:
        """Queue ``item``; raises ``Overloaded`` at once when the queue is full."""
        with self._cond:
            if self._closed:
                raise Overloaded(f"Model {self.label} is being unloaded; retry")
            limit = self.config.max_queued_requests
            if limit and len(self._queue) >= limit:
                if self.metrics:
                    self.metrics.rejected.labels(self.label, "queue_full").inc()
                raise Overloaded(
                    f"Model {self.label} is overloaded: {len(self._queue)} requests already "
                    f"queued (limit {limit}); retry later")
            if self._queue and self._queued_rows + item.rows > self.config.max_queued_rows:
                if self.metrics:
                    self.metrics.rejected.labels(self.label, "queue_full").inc()
                raise Overloaded(
                    f"Model {self.label} is overloaded: {self._queued_rows} rows already queued "
                    f"(limit {self.config.max_queued_rows}); retry later")
            was_empty = not self._queue
            item.alone = self._open == 0 and self.config.run_idle_at_once
            self._open += 1
            self._queue.append(item)
            self._queued_rows += item.rows
            item.future.add_done_callback(lambda fut: self._answered(item, fut))
            # Wake the thread only when it has something new to decide: the first request (it
            # sleeps on an empty queue) or a full batch (it waits out the queue delay otherwise).
            if was_empty or self._queued_rows >= self.config.max_batch_rows:
                self._cond.notify()
            self._gauge()

    def _answered(self, item: Pending, fut: asyncio.Future) -> None:
        with self._cond:
            self._open -= 1
        if fut.cancelled():
            self._discard(item)

    def _discard(self, item: Pending) -> None:
        """Take a cancelled request (timed out, or its client went away) out of the queue at
        once, so it neither runs nor holds a place in the queue's bounds."""
        with self._cond:
            # One scan by identity, not deque.remove: its ValueError for a missing item formats
            # that item (once its whole array, per request cancelled after its batch was taken).
            for i, queued in enumerate(self._queue):
                if queued is item:
                    del self._queue[i]
                    break
            else:
                return  # already taken into a batch: skipped there
            self._queued_rows -= item.rows
            if self.metrics:
                self.metrics.dropped.labels(self.label).inc()
            self._gauge()
            self._cond.notify()  # the thread may be waiting out this request's queue delay

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued requests, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ inference thread
    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_rows.labels(self.label).set(self._queued_rows)
            self.metrics.queue_requests.labels(self.label).set(len(self._queue))
            self.metrics.nv_pending(self.label).set(len(self._queue))

    def _take(self) -> list[Pending] | None:
        """Block for the next batch (same kind, ≤ max_batch_rows); None once closed and empty."""
        cfg = self.config
        with self._cond:
            while True:
                while not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                head = self._queue[0]
                if cfg.batching and cfg.max_queue_delay_s > 0 and not head.alone:
                    until = head.enqueued + cfg.max_queue_delay_s
                    while not self._closed and self._queued_rows < cfg.max_batch_rows:
                        remaining = until - time.monotonic()
                        if remaining <= 0 or not self._queue or self._queue[0] is not head:
                            break
                        self._cond.wait(remaining)
                if self._queue and self._queue[0] is head:
                    break
                # The head was discarded (cancelled) while waiting: start over from the new one.
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            if cfg.batching:
                kept: deque[Pending] = deque()
                while self._queue:
                    item = self._queue.popleft()
                    if item.kind == head.kind and rows + item.rows <= cfg.max_batch_rows:
                        batch.append(item)
                        rows += item.rows
                    else:
                        kept.append(item)
                        if rows >= cfg.max_batch_rows:
                            break
                kept.extend(self._queue)
                self._queue = kept
            self._queued_rows -= rows
            self._gauge()
            return batch

    def _run(self) -> None:
        # Set here, in the thread that runs the passes: set from another thread, torch's OpenMP
        # pool made each small op of this thread wait on a busy core (10-70x slower, measured).
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        while True:
            batch = self._take()
            if batch is None:
                return
            now = time.monotonic()
            live, out = [], []
            for item in batch:
                if item.future.done():  # timed out or its client went away: dropped unrun
                    if self.metrics:
                        self.metrics.dropped.labels(self.label).inc()
                    continue
                if now > item.deadline:
                    if self.metrics:
                        self.metrics.rejected.labels(
                            self.label, "timeout" if item.own_deadline else "deadline").inc()
                    out.append((item, None, DeadlineExceeded(
                        f"Model {self.label}: the request's timeout_ms passed while it was "
                        f"queued; dropped before its forward pass") if item.own_deadline
                        else Overloaded(
                        f"Model {self.label} is overloaded: the request waited past its deadline "
                        f"in the queue; retry later")))
                else:
                    live.append(item)
            if live and self.metrics:
                self.metrics.observe_queue(self.label, sum(now - p.enqueued for p in live))
            if live:
                try:
                    results = self._forward(live)
                    out.extend((item, res, None) for item, res in zip(live, results, strict=True))
                except Exception as exc:
                    if len(live) == 1:
                        out.append((live[0], None, exc))
                    else:  # run them one by one, so only the request at fault fails
                        for item in live:
                            try:
                                out.append((item, self._forward([item])[0], None))
                            except Exception as one:
                                out.append((item, None, one))
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for item, res, exc in out:
                by_loop.setdefault(item.loop, []).append((item.future, res, exc))
            for loop, items in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # loop closed: nobody is waiting any more
                    pass

    def _forward(self, batch: list[Pending]) -> list[Any]:
        if self.metrics:
            kind = batch[0].kind
            self.metrics.batch_rows.labels(self.label, kind).observe(sum(p.rows for p in batch))
            self.metrics.batch_requests.labels(self.label, kind).observe(len(batch))
        with self._lock:
            self.batches += 1
            start = time.monotonic()
            try:
                return self.run(batch)
            finally:
                if self.metrics:
                    self.metrics.observe_exec(self.label, sum(p.rows for p in batch), len(batch),
                                              time.monotonic() - start)
