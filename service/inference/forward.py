"""The forward pass of one batch through a flow: every request's rows in one pass, split back.

``forward(flow, max_rows)`` returns the ``run`` function a ``Batcher`` calls. It runs under
``torch.inference_mode`` on the flow's device, in chunks of at most ``max_rows`` rows, and under
``nfcore.time_limit`` of the batch's earliest deadline, so that a fixed-point or ODE solve that
cannot finish in time ends in ``SolverTimeout`` instead of a hang.

Seeded sampling is batch-independent: each request draws its base noise from its own
``torch.Generator`` (on the CPU, so the same seed gives the same noise on any device), and the
batched pass is row-wise, so a request's samples do not depend on its neighbours.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import nfcore

from .batcher import Pending, Run

__all__ = ["forward"]


def _context(flow: nfcore.Flow, batch: list[Pending]) -> torch.Tensor | None:
    if flow.context_dim == 0:
        return None
    parts = [torch.from_numpy(np.ascontiguousarray(p.context)).expand(p.rows, -1) for p in batch]
    ctx = torch.cat(parts) if len(parts) > 1 else parts[0]
    return ctx.to(device=flow.device, dtype=flow.dtype)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _chunks(total: int, step: int) -> list[slice]:
    return [slice(i, i + step) for i in range(0, total, step)]


def _log_prob(flow: nfcore.Flow, batch: list[Pending], step: int) -> list[np.ndarray]:
    sizes = [p.rows for p in batch]
    ctx = _context(flow, batch)
    x = _cat([torch.from_numpy(p.x) for p in batch]).to(device=flow.device, dtype=flow.dtype)
    lp = _cat([flow.log_prob(x[s], None if ctx is None else ctx[s])
               for s in _chunks(sum(sizes), step)]).cpu()
    return [part.numpy() for part in lp.split(sizes)]


def _sample(flow: nfcore.Flow, batch: list[Pending], step: int
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    sizes = [p.rows for p in batch]
    ctx = _context(flow, batch)
    noise = []
    for p in batch:
        gen = torch.Generator()
        if p.seed is not None:
            gen.manual_seed(p.seed)
        else:
            gen.seed()
        noise.append(torch.randn(p.rows, flow.dim, generator=gen, dtype=flow.dtype))
    z = _cat(noise).to(flow.device)
    xs, lqs = zip(*(flow.sample_from_noise(z[s], None if ctx is None else ctx[s])
                    for s in _chunks(sum(sizes), step)), strict=True)
    x, lq = _cat(list(xs)).cpu(), _cat(list(lqs)).cpu()
    return [(a.numpy(), b.numpy()) for a, b in zip(x.split(sizes), lq.split(sizes), strict=True)]


def forward(flow: nfcore.Flow, max_rows: int) -> Run:
    """The batch pass of ``flow``: ``log_prob`` batches give an array per request, ``sample``
    batches ``(samples, log_prob)`` per request.

    Example:
        >>> import asyncio, time
        >>> flow = nfcore.build({"preset": "maf", "dim": 2, "transforms": 1, "hidden": [4]})
        >>> loop = asyncio.new_event_loop()
        >>> item = Pending(kind="log_prob", rows=3, future=loop.create_future(), loop=loop,
        ...                deadline=time.monotonic() + 1, x=np.zeros((3, 2), np.float32))
        >>> [a.shape for a in forward(flow, 2)([item])]
        [(3,)]
        >>> loop.close()
    """
    passes = {"log_prob": _log_prob, "sample": _sample}

    def run(batch: list[Pending]) -> list[Any]:
        # An iterative or ODE solve stops at the earliest deadline in the batch (SolverTimeout,
        # a 503) instead of running on after its callers have given up.
        left = min(p.deadline for p in batch) - time.monotonic()
        with torch.inference_mode(), nfcore.time_limit(max(left, 1e-3)):
            return passes[batch[0].kind](flow, batch, max_rows)

    return run
