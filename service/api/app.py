"""The FastAPI application: ``create_app(settings)`` and its lifespan.

Importing this module does no work; ``create_app`` builds an app, and its lifespan opens the model
store, the inference path and the training path's job store, queue and reaper (and closes them).
Run it with ``nfserve serve`` or ``uvicorn --factory service.api.app:create_app``.

What lives on ``app.state``:

- ``settings``: the ``Settings`` (set by ``create_app``).
- ``metrics``: this app's Prometheus ``Metrics`` (own registry).
- ``readiness_checks``: callables ``check() -> (name, ok, detail)`` run by ``/health/ready``.
- ``store``, ``cache`` and ``data_plane``: the model store, the model cache and the inference
  protocol layer (set by the lifespan).
- ``db``, ``queue`` and ``reaper_stop``: the job store, the job queue and the stop of the API's
  own reaper (set by the lifespan).
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..inference import DataPlane, ModelCache
from ..metrics import Metrics
from ..settings import Settings, get_settings
from ..store import ModelStore
from ..training import Database, JobQueue
from ..training.health import JobsCollector, readiness_checks
from ..training.reaper import Reaper
from ..training.requests import load_plugins
from ..wire import LOG_PROB, SAMPLE
from .errors import install_error_handlers
from .fastpath import FastPath
from .middleware import MetricsMiddleware
from .openapi import install_openapi
from .routes import datasets, health, inference, jobs, models, oip

__all__ = ["create_app"]

DESCRIPTION = """Normalizing-flow density estimation and sampling.

* **Inference**: `POST /log_prob` scores points, `POST /sample` draws samples. Both take JSON, or a
  safetensors body (`Content-Type: application/octet-stream`, options in the query string), and
  answer in safetensors with `Accept: application/octet-stream`.
* **Models**: list, inspect, download and upload `model.safetensors` artifacts, and plot 2-D models.
* **Training**: `POST /train` queues a job (data or a target, and a budget in steps, epochs or
  seconds); `GET /jobs/{id}` shows its progress, its model and, for variational fits, whether the
  fit can be trusted (`diagnostics`).
* **Open Inference Protocol v2** (KServe v2, Triton HTTP): `/v2/...`, with Triton's binary tensor
  data extension; errors there are `{"error": "..."}`.
* **Auth**: when the server has API keys, send `Authorization: Bearer <key>` (health is open).
* **Errors**: `{"detail": "..."}` with 404, 409, 413, 415, 422, 401/403 or 503.
"""


def _open_training(app: FastAPI) -> None:
    """The job store (tables created if missing), the queue, their checks and gauges, and the
    API's own reaper: with every worker gone, a running job is still re-queued or failed."""
    settings: Settings = app.state.settings
    load_plugins(settings)  # plugin targets must be known here, to check submissions
    app.state.db = db = Database.from_settings(settings)
    db.create_all()
    app.state.queue = queue = JobQueue(settings)
    app.state.readiness_checks.extend(readiness_checks(db, queue, settings))
    app.state.metrics.registry.register(JobsCollector(db, queue, settings))
    app.state.reaper_stop = threading.Event()
    Reaper(db, queue, settings, app.state.reaper_stop).start()


def _close_training(app: FastAPI) -> None:
    """Queued and running jobs are untouched: they belong to the workers."""
    app.state.reaper_stop.set()
    app.state.queue.close()
    app.state.db.dispose()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the store, the inference path and the training path; close them on shutdown."""
    settings: Settings = app.state.settings
    app.state.store = store = ModelStore(settings.models_dir, refresh_s=settings.store_refresh_s)
    store.open()
    app.state.cache = cache = ModelCache(settings, store, app.state.metrics)
    app.state.readiness_checks.extend([store.health, cache.health])
    await asyncio.to_thread(_open_training, app)
    if settings.preload_models:  # loaded and warmed before the first request
        await cache.preload()
    app.state.data_plane = DataPlane(cache, settings)  # last: the fast path answers from here on
    # Everything imported and built so far lives as long as the server: keep it out of the
    # garbage collector's full passes. Without this a full pass walked torch's, pydantic's and
    # FastAPI's objects in the middle of a request every few seconds under load (tens of ms each).
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        await asyncio.to_thread(cache.close)
        await asyncio.to_thread(_close_training, app)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. ``settings`` defaults to ``get_settings()`` (environment and ``.env``)."""
    settings = settings or get_settings()
    app = FastAPI(title="nfserve", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.readiness_checks = []
    install_error_handlers(app)
    for router in (health.router, inference.router, models.router, jobs.router,
                   datasets.router, oip.router):
        app.include_router(router)
    if settings.fast_path:
        fast = {r.path: r for r in inference.router.routes if r.path in (LOG_PROB, SAMPLE)}
        app.add_middleware(FastPath, state=app.state, routes=fast)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_openapi(app)
    return app
