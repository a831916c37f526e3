"""The model cache: loaded models by ``(name, version)``, each with its batcher, under an LRU bound.

``ModelCache.get`` resolves the version (the latest when omitted, looked up on every request, so a
new version is served without a restart) and loads the model off the event loop on a miss. One
lock per device lets one forward pass run at a time, whichever model it belongs to.

A model is warmed up as it loads, before it serves (``warmup_rows``): a few rows are sampled and
scored in one pass, so that torch's first-call work (allocator, kernels, lazily built buffers) is
not paid by the first request. ``preload`` loads the models of ``preload_models`` at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

import nfcore
from nfcore import targets

from ..errors import ModelUnavailable
from ..metrics import Metrics
from ..settings import Settings
from ..store import ModelStore
from . import constrained
from .batcher import Batcher, BatcherConfig
from .forward import forward

__all__ = ["ModelCache", "LoadedModel"]

log = logging.getLogger("nfserve")


@dataclass
class LoadedModel:
    """A model ready to serve: its flow and the batcher in front of it; ``target`` is the
    model-language target it was fit to, when it was (``service.inference.constrained``)."""

    name: str
    version: int
    flow: nfcore.Flow
    batcher: Batcher
    target: targets.Target | None = None
    warmup_s: float | None = None  # the warm-up pass's duration; None: none was run

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"


class ModelCache:
    """Loaded models and their batchers. Create in the app's lifespan, ``close()`` on shutdown."""

    def __init__(self, settings: Settings, store: ModelStore, metrics: Metrics | None = None):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.device = settings.resolved_device
        self.config = BatcherConfig(
            batching=settings.batching, max_batch_rows=settings.max_batch_rows,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            run_idle_at_once=settings.run_idle_at_once,
            max_queued_rows=settings.max_queued_rows, torch_threads=settings.torch_threads,
            max_queued_requests=settings.max_queued_requests)
        self._cache: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Future] = {}
        self._device_lock = threading.Lock()  # one forward pass at a time per device

    @property
    def cached(self) -> list[tuple[str, int]]:
        """``(name, version)`` of the loaded models, least recently used first."""
        return list(self._cache)

    def health(self) -> tuple[str, bool, str]:
        """The readiness check of inference: the device and what is loaded."""
        return "inference", True, f"device {self.device}, {len(self._cache)} models loaded"

    def _load(self, name: str, version: int) -> tuple[nfcore.Flow, targets.Target | None]:
        try:
            flow = nfcore.load(self.store.path(name, version), device=self.device)
        except nfcore.ArtifactError as e:
            raise ModelUnavailable(f"Model {name!r} version {version} cannot be loaded: {e}"
                                   ) from None
        # The batcher's passes run nfcore's lean inference path (inference mode, row blocks);
        # warm it here, off the event loop, so that no client's request pays for its set-up.
        flow = flow.warm_up()
        try:  # the model-language target in its metadata, rebuilt with no code
            return flow, constrained.target_of(flow.metadata, flow.dim)
        except nfcore.NFCoreError as e:
            raise ModelUnavailable(f"Model {name!r} version {version}: its stored target "
                                   f"cannot be rebuilt: {e}") from None

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

    def _warm_up(self, name: str, version: int, flow: nfcore.Flow) -> float | None:
        """Sample ``warmup_rows`` rows and score them (one pass each, under the device lock);
        its duration in seconds, or None when off or when it failed (logged: the model still
        serves, and its own requests will say what is wrong)."""
        rows = self.settings.warmup_rows
        if not rows:
            return None
        start = time.perf_counter()
        try:
            ctx = (torch.zeros(rows, flow.context_dim, dtype=flow.dtype, device=flow.device)
                   if flow.context_dim else None)
            z = torch.randn(rows, flow.dim, generator=torch.Generator().manual_seed(0),
                            dtype=flow.dtype).to(flow.device)
            with self._device_lock, torch.inference_mode(), nfcore.time_limit(
                    self.settings.request_timeout_s):
                x, _ = flow.sample_from_noise(z, ctx)
                flow.log_prob(x, ctx)
        except Exception as e:
            log.warning("Warm-up of model %s:%s failed: %s", name, version, e)
            return None
        seconds = time.perf_counter() - start
        if self.metrics:
            self.metrics.warmups.labels(name, str(version)).inc()
            self.metrics.warmup_seconds.labels(name, str(version)).set(seconds)
        return seconds

    async def preload(self) -> list[str]:
        """Load and warm the models of ``settings.preload_models`` ('*': every model); the
        ``name:version`` labels loaded. A model that cannot be loaded is logged and skipped."""
        wanted = self.settings.preload_models
        names = self.store.names() if "*" in wanted else wanted
        loaded = []
        for name in names[:self.settings.model_cache_size]:
            try:
                loaded.append((await self.get(name)).label)
            except Exception as e:
                log.warning("Preloading model %s failed: %s", name, e)
        return loaded

    async def _load_into_cache(self, name: str, version: int) -> LoadedModel:
        flow, target = await asyncio.to_thread(self._load, name, version)
        warmup_s = await asyncio.to_thread(self._warm_up, name, version, flow)
        config = self.config
        if "ode" in flow.cost.values():
            # An adaptive ODE solver picks one step size for the whole batch, so a row's answer
            # would move (within tolerance) with its batch-mates: each request runs alone.
            config = replace(config, batching=False)
        run = forward(flow, config.max_batch_rows)
        if target is not None:
            run = constrained.wrap(run, flow, target)
        batcher = Batcher(run, f"{name}:{version}",
                          config, metrics=self.metrics, device_lock=self._device_lock)
        model = LoadedModel(name, version, flow, batcher, target, warmup_s)
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
