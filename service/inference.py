"""The inference manager: an LRU cache of loaded models, each with its batcher.

``InferenceEngine.log_prob`` and ``.sample`` are what the routes call. They resolve the version
(latest when omitted, looked up on every request so new versions are served without a restart), load
the model off the event loop on a cache miss, check the inputs once at this boundary (shape, dtype,
finiteness, emptiness) and await the batcher.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

import nfcore

from .batcher import Batcher, BatcherConfig, Job
from .errors import InvalidInput, ModelUnavailable, Overloaded, PayloadTooLarge
from .metrics import Metrics
from .settings import Settings
from .store import ModelStore

__all__ = ["InferenceEngine", "LoadedModel", "as_rows"]

_NP_DTYPES = {"float32": np.float32, "float64": np.float64}


@dataclass
class LoadedModel:
    name: str
    version: int
    flow: nfcore.Flow
    batcher: Batcher

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"


def as_rows(value: object, what: str, width: int, dtype: type, *, allow_single: bool = False
            ) -> np.ndarray:
    """``value`` as a C-contiguous (rows, width) array of ``dtype``, or ``InvalidInput``."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"{what} must be a rectangular array of numbers: {e}") from None
    if arr.dtype == object:
        raise InvalidInput(f"{what} must be a rectangular array of numbers; it holds null or "
                           f"non-numeric values")
    if arr.dtype.kind not in "fiub":
        raise InvalidInput(f"{what} must be a rectangular array of numbers; got elements of "
                           f"type {arr.dtype}")
    if arr.size == 0:
        raise InvalidInput(f"{what} is empty: send at least one row of {width} values")
    if arr.ndim == 1 and allow_single:
        arr = arr[None]
    if arr.ndim != 2:
        raise InvalidInput(f"{what} must be a 2-D array of shape (rows, {width}); got shape "
                           f"{tuple(arr.shape)}")
    if arr.shape[1] != width:
        raise InvalidInput(f"{what} has {arr.shape[1]} columns; the model expects {width}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise InvalidInput(f"{what} holds NaN or infinite values (first at row {bad[0]}, "
                           f"column {bad[1]})")
    return arr


class InferenceEngine:
    """Model cache + batchers. Create in the lifespan, ``close()`` on shutdown."""

    def __init__(self, settings: Settings, store: ModelStore, metrics: Metrics | None = None):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.device = settings.resolved_device
        self.config = BatcherConfig(
            batching=settings.batching, max_batch_rows=settings.max_batch_rows,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_queued_rows=settings.max_queued_rows, torch_threads=settings.torch_threads)
        self._cache: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Future] = {}
        self._device_lock = threading.Lock()  # one forward pass at a time per device

    # ------------------------------------------------------------------ cache
    @property
    def cached(self) -> list[tuple[str, int]]:
        return list(self._cache)

    def _load(self, name: str, version: int) -> nfcore.Flow:
        try:
            return nfcore.load(self.store.path(name, version), device=self.device)
        except nfcore.ArtifactError as e:
            raise ModelUnavailable(f"Model {name!r} version {version} cannot be loaded: {e}"
                                   ) from None

    async def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The loaded model (latest version when ``version`` is None), loading it on a miss."""
        self.store.check_name(name)
        version = self.store.resolve(name, version)  # a few stat calls: fine on the loop
        key = (name, version)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            if self.metrics:
                self.metrics.cache_hits.inc()
            return hit
        task = self._loading.get(key)
        if task is None:
            # The load is a task of its own, so a request that goes away (cancelled) never
            # cancels it for the other requests waiting on the same model.
            if self.metrics:
                self.metrics.cache_misses.inc()
            task = asyncio.ensure_future(self._load_into_cache(name, version))
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def _load_into_cache(self, name: str, version: int) -> LoadedModel:
        flow = await asyncio.to_thread(self._load, name, version)
        batcher = Batcher(flow, f"{name}:{version}", self.config, metrics=self.metrics,
                          device_lock=self._device_lock)
        model = LoadedModel(name, version, flow, batcher)
        self._cache[(name, version)] = model
        self._evict()
        return model

    def _evict(self) -> None:
        while len(self._cache) > self.settings.model_cache_size:
            _, old = self._cache.popitem(last=False)
            threading.Thread(target=old.batcher.close, daemon=True).start()
            if self.metrics:
                self.metrics.cache_evictions.inc()
        if self.metrics:
            self.metrics.cache_size.set(len(self._cache))

    def close(self) -> None:
        for model in self._cache.values():
            model.batcher.close(timeout=10)
        self._cache.clear()
        if self.metrics:
            self.metrics.cache_size.set(0)

    # ------------------------------------------------------------------ requests
    async def _run(self, model: LoadedModel, job: Job) -> object:
        model.batcher.submit(job)
        timeout = job.deadline - time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                return await job.future
        except TimeoutError:
            if self.metrics:
                self.metrics.rejected.labels(model.label, "deadline").inc()
            raise Overloaded(
                f"Model {model.label} is overloaded: no result within the "
                f"{self.settings.request_timeout_s:g} s request deadline; retry later") from None

    def _context(self, model: LoadedModel, context: object, rows: int) -> np.ndarray | None:
        flow = model.flow
        if flow.context_dim == 0:
            if context is not None:
                raise InvalidInput(f"Model {model.label} is unconditional; send no context")
            return None
        if context is None:
            raise InvalidInput(f"Model {model.label} needs a context of shape "
                               f"({rows}, {flow.context_dim}) or ({flow.context_dim},)")
        ctx = as_rows(context, "context", flow.context_dim, _NP_DTYPES[flow.spec["dtype"]],
                      allow_single=True)
        if ctx.shape[0] not in (1, rows):
            raise InvalidInput(f"context has {ctx.shape[0]} rows; expected 1 or {rows}")
        return ctx

    def _job(self, kind: str, rows: int, **fields: object) -> Job:
        loop = asyncio.get_running_loop()
        return Job(kind=kind, rows=rows, future=loop.create_future(), loop=loop,
                   deadline=time.monotonic() + self.settings.request_timeout_s, **fields)

    async def log_prob(self, name: str, version: int | None, x: object,
                       context: object = None) -> tuple[LoadedModel, np.ndarray]:
        """Score ``x`` (rows × dim) under the model: ``(model, log_prob)``."""
        model = await self.get(name, version)
        flow = model.flow
        rows = x.shape[0] if isinstance(x, np.ndarray) and x.ndim == 2 else None
        if rows is not None and rows > self.settings.max_rows:
            raise PayloadTooLarge(f"x has {rows} rows; the limit is {self.settings.max_rows}")
        x = as_rows(x, "x", flow.dim, _NP_DTYPES[flow.spec["dtype"]])
        if x.shape[0] > self.settings.max_rows:
            raise PayloadTooLarge(f"x has {x.shape[0]} rows; the limit is "
                                  f"{self.settings.max_rows}")
        ctx = self._context(model, context, x.shape[0])
        job = self._job("log_prob", x.shape[0], x=x, context=ctx)
        return model, await self._run(model, job)

    async def sample(self, name: str, version: int | None, n: int, *, seed: int | None = None,
                     context: object = None) -> tuple[LoadedModel, np.ndarray, np.ndarray]:
        """``n`` samples and their log density: ``(model, samples, log_prob)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInput(f"n must be a positive integer; got {n!r}")
        if n > self.settings.max_sample_n:
            raise PayloadTooLarge(f"n = {n} is over the limit of {self.settings.max_sample_n}")
        model = await self.get(name, version)
        ctx = self._context(model, context, n)
        job = self._job("sample", n, seed=seed, context=ctx)
        samples, log_q = await self._run(model, job)
        return model, samples, log_q
