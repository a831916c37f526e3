"""Dynamic batching: coalesce concurrent requests for one model into few forward passes.

One ``Batcher`` per loaded model, with its own inference thread (never the event loop).
Requests wait in a bounded queue; the thread takes the oldest request and, when batching is on,
every queued request of the same kind up to ``max_batch_rows``, waiting at most
``max_queue_delay`` after the oldest one arrived for the batch to fill (Triton's two knobs). It
runs them as one pass under ``torch.inference_mode``, splits the result and hands each request its
part through its event loop (one ``call_soon_threadsafe`` per batch and loop, not per request).

Seeded sampling is batch-independent: each request draws its base noise from its own
``torch.Generator`` (on the CPU, so the same seed gives the same noise on any device), and the
batched pass is row-wise, so a request's samples do not depend on its neighbours.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

import nfcore

from .errors import Overloaded
from .metrics import Metrics

__all__ = ["Batcher", "Job", "BatcherConfig"]

Kind = Literal["log_prob", "sample"]


@dataclass(frozen=True)
class BatcherConfig:
    """The knobs (from settings)."""

    batching: bool = True
    max_batch_rows: int = 65536
    max_queue_delay_s: float = 0.002
    max_queued_rows: int = 4_000_000
    torch_threads: int = 0  # intra-op threads of the inference thread; 0: leave torch's default


@dataclass(eq=False)
class Job:
    """One request waiting for its forward pass."""

    kind: Kind
    rows: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float
    x: np.ndarray | None = None  # log_prob: (rows, dim) in the model's dtype
    context: np.ndarray | None = None  # (rows, c) or (1, c)
    seed: int | None = None  # sample: seed of this request's noise
    enqueued: float = field(default_factory=time.monotonic)


def _deliver(items: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for fut, value, exc in items:
        if fut.done():  # the request timed out or its client went away
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


class Batcher:
    """The queue and inference thread of one loaded model."""

    def __init__(self, flow: nfcore.Flow, label: str, config: BatcherConfig, *,
                 metrics: Metrics | None = None, device_lock: threading.Lock | None = None):
        self.flow = flow
        self.label = label
        self.config = config
        self.metrics = metrics
        self._lock = device_lock or threading.Lock()
        self._queue: deque[Job] = deque()
        self._queued_rows = 0
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

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ``Overloaded`` at once when the queue is full."""
        with self._cond:
            if self._closed:
                raise Overloaded(f"Model {self.label} is being unloaded; retry")
            if self._queue and self._queued_rows + job.rows > self.config.max_queued_rows:
                if self.metrics:
                    self.metrics.rejected.labels(self.label, "queue_full").inc()
                raise Overloaded(
                    f"Model {self.label} is overloaded: {self._queued_rows} rows already queued "
                    f"(limit {self.config.max_queued_rows}); retry later")
            was_empty = not self._queue
            self._queue.append(job)
            self._queued_rows += job.rows
            # Wake the thread only when it has something new to decide: the first request (it
            # sleeps on an empty queue) or a full batch (it waits out the queue delay otherwise).
            if was_empty or self._queued_rows >= self.config.max_batch_rows:
                self._cond.notify()
            self._gauge()

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

    def _take(self) -> list[Job] | None:
        """Block for the next batch (same kind, ≤ max_batch_rows); None once closed and empty."""
        cfg = self.config
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            head = self._queue[0]
            if cfg.batching and cfg.max_queue_delay_s > 0:
                until = head.enqueued + cfg.max_queue_delay_s
                while not self._closed and self._queued_rows < cfg.max_batch_rows:
                    remaining = until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            if cfg.batching:
                kept: deque[Job] = deque()
                while self._queue:
                    job = self._queue.popleft()
                    if job.kind == head.kind and rows + job.rows <= cfg.max_batch_rows:
                        batch.append(job)
                        rows += job.rows
                    else:
                        kept.append(job)
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
            for job in batch:
                if job.future.done():
                    continue
                if now > job.deadline:
                    if self.metrics:
                        self.metrics.rejected.labels(self.label, "deadline").inc()
                    out.append((job, None, Overloaded(
                        f"Model {self.label} is overloaded: the request waited past its deadline "
                        f"in the queue; retry later")))
                else:
                    live.append(job)
            if live:
                try:
                    results = self._forward(live)
                    out.extend((job, res, None) for job, res in zip(live, results, strict=True))
                except Exception as exc:
                    if len(live) == 1:
                        out.append((live[0], None, exc))
                    else:  # run them one by one, so only the request at fault fails
                        for job in live:
                            try:
                                out.append((job, self._forward([job])[0], None))
                            except Exception as one:
                                out.append((job, None, one))
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for job, res, exc in out:
                by_loop.setdefault(job.loop, []).append((job.future, res, exc))
            for loop, items in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # loop closed: nobody is waiting any more
                    pass

    def _context(self, batch: list[Job]) -> torch.Tensor | None:
        if self.flow.context_dim == 0:
            return None
        parts = [torch.from_numpy(np.ascontiguousarray(job.context)).expand(job.rows, -1)
                 for job in batch]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _forward(self, batch: list[Job]) -> list[Any]:
        flow = self.flow
        kind = batch[0].kind
        sizes = [job.rows for job in batch]
        total = sum(sizes)
        if self.metrics:
            self.metrics.batch_rows.labels(self.label, kind).observe(total)
            self.metrics.batch_requests.labels(self.label, kind).observe(len(batch))
        device, dtype = flow.device, flow.dtype
        step = self.config.max_batch_rows
        with self._lock, torch.inference_mode():
            self.batches += 1
            ctx = self._context(batch)
            if ctx is not None:
                ctx = ctx.to(device=device, dtype=dtype)
            if kind == "log_prob":
                parts = [torch.from_numpy(job.x) for job in batch]
                x = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(device=device,
                                                                            dtype=dtype)
                lp = torch.cat([
                    flow.log_prob(x[i:i + step], None if ctx is None else ctx[i:i + step])
                    for i in range(0, total, step)]) if total > step else flow.log_prob(x, ctx)
                lp = lp.cpu().numpy()
                return [p.numpy() for p in torch.from_numpy(lp).split(sizes)]
            noise = []
            for job in batch:
                gen = torch.Generator()
                if job.seed is not None:
                    gen.manual_seed(job.seed)
                else:
                    gen.seed()
                noise.append(torch.randn(job.rows, flow.dim, generator=gen, dtype=dtype))
            z = (torch.cat(noise) if len(noise) > 1 else noise[0]).to(device)
            xs, lqs = [], []
            for i in range(0, total, step):
                xi, lqi = flow.sample_from_noise(z[i:i + step],
                                                 None if ctx is None else ctx[i:i + step])
                xs.append(xi)
                lqs.append(lqi)
            x = (torch.cat(xs) if len(xs) > 1 else xs[0]).cpu()
            lq = (torch.cat(lqs) if len(lqs) > 1 else lqs[0]).cpu()
            return [(a.numpy(), b.numpy()) for a, b in zip(x.split(sizes), lq.split(sizes),
                                                            strict=True)]
