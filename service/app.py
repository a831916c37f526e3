"""The FastAPI application: ``create_app(settings)`` and its lifespan.

Importing this module does no work; ``create_app`` builds an app and its lifespan opens the model
store and the inference engine (and closes them). Run it with ``nfserve serve`` or
``uvicorn --factory service.app:create_app``.

What lives on ``app.state``:

- ``settings``: the ``Settings`` (set by ``create_app``).
- ``metrics``: this app's Prometheus ``Metrics`` (own registry).
- ``readiness_checks``: callables ``check(app) -> (name, ok, detail)`` run by ``/health/ready``;
  append to it to add a check (the job queue does).
- ``store``: the ``ModelStore`` (set by the lifespan).
- ``engine``: the ``InferenceEngine``, model cache and batchers (set by the lifespan).
- ``db`` and ``queue``: the job store and the job queue (``service.jobs.open_jobs``).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .errors import install_error_handlers
from .fastpath import NFServeAPI
from .inference import InferenceEngine
from .jobs import close_jobs, open_jobs
from .metrics import Metrics, MetricsMiddleware
from .settings import Settings, get_settings
from .store import ModelStore

__all__ = ["create_app"]

DESCRIPTION = """Normalizing-flow density estimation and sampling.

* **Inference**: `POST /log_prob` scores points, `POST /sample` draws samples. Both take JSON, or a
  safetensors body (`Content-Type: application/octet-stream`, options in the query string), and
  answer in safetensors with `Accept: application/octet-stream`.
* **Models**: list, inspect, download and upload `model.safetensors` artifacts, and plot 2-D models.
* **Auth**: when the server has API keys, send `Authorization: Bearer <key>` (health is open).
* **Errors**: `{"detail": "..."}` with 404, 409, 413, 415, 422, 401/403 or 503.
"""


def check_store(app: FastAPI) -> tuple[str, bool, str]:
    store: ModelStore = app.state.store
    if not store.readable():
        return "model_store", False, f"{store.root} is not a readable directory"
    names = store.names()
    unreadable = []
    for name in names[:100]:
        try:
            store.info(name, store.latest(name))
        except Exception as e:  # any defect of a stored file makes it unloadable
            unreadable.append(f"{name}: {e}")
    if unreadable:
        return "model_store", False, "; ".join(unreadable)
    return "model_store", True, f"{len(names)} models in {store.root}"


def check_engine(app: FastAPI) -> tuple[str, bool, str]:
    engine: InferenceEngine | None = getattr(app.state, "engine", None)
    if engine is None:
        return "inference", False, "engine not started"
    return "inference", True, f"device {engine.device}, {len(engine.cached)} models loaded"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the model store and the inference engine; close them on shutdown."""
    settings: Settings = app.state.settings
    app.state.store = ModelStore(settings.models_dir, refresh_s=settings.store_refresh_s)
    app.state.store.open()
    app.state.engine = InferenceEngine(settings, app.state.store, app.state.metrics)
    await asyncio.to_thread(open_jobs, app)  # job store (db) and queue, with their checks
    # Everything imported and built so far lives as long as the server: keep it out of the
    # garbage collector's full passes. Without this a full pass walked torch's, pydantic's and
    # FastAPI's objects in the middle of a request every few seconds under load (tens of ms each).
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        await asyncio.to_thread(app.state.engine.close)
        await asyncio.to_thread(close_jobs, app)


def create_app(settings: Settings | None = None) -> NFServeAPI:
    """Build the API. ``settings`` defaults to ``get_settings()`` (environment and ``.env``)."""
    from .routers import datasets, health, inference, jobs, models

    settings = settings or get_settings()
    app = NFServeAPI(title="nfserve", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.readiness_checks = [check_store, check_engine]
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    routers = [
        health.router,
        inference.router,
        models.router,
        jobs.router,
        datasets.router,
    ]
    for router in routers:
        app.include_router(router)
    return app
