"""The model store over HTTP: list, describe, download, upload, and plot a 2-D model."""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

import nfcore
from nfcore import read_info

from ...errors import InvalidInput, NotFound
from ...inference.constrained import target_of, target_public
from ...store import NAME_PATTERN, ModelNotFound, ModelStore
from ...wire import OCTET_STREAM
from ..deps import (
    DataPlaneDep,
    ReadAccess,
    SettingsDep,
    StoreDep,
    WriteAccess,
    multipart_file,
    read_body,
)
from ..schemas import (
    ErrorPublic,
    ModelPublic,
    ModelsPublic,
    ModelSummary,
    ModelUploaded,
    ModelVersionPublic,
    TargetPublic,
    diagnostics_of,
)

__all__ = ["router"]

router = APIRouter(prefix="/models", tags=["models"])

_ERR = {code: {"model": ErrorPublic, "description": text} for code, text in [
    (401, "Missing or invalid API key"), (403, "Key lacks the scope"),
    (404, "Unknown model or version")]}

NamePath = Annotated[str, Path(description="Model name.", examples=["two_moons"])]


# A version whose header cannot be read (half-copied, corrupted) is left out, never a 500.
_UNREADABLE = (ModelNotFound, nfcore.ArtifactError, ValueError, KeyError, TypeError, OSError)


def _version_public(store: ModelStore, name: str, version: int) -> ModelVersionPublic:
    info = store.info(name, version)
    return ModelVersionPublic(
        version=version, created=info.created, size_bytes=info.size_bytes,
        hash=info.content_hash, dim=info.spec["dim"],
        context_dim=info.spec.get("context_dim", 0), spec=info.spec, metadata=info.metadata,
        diagnostics=diagnostics_of(info.metadata.get("training")), cost=info.cost,
        log_prob_exact=info.log_prob_exact, target=_target(info.metadata, info.spec["dim"]),
        artifact_url=f"/models/{name}/versions/{version}/artifact")


def _target(metadata: dict, dim: int) -> TargetPublic | None:
    """The model-language target of a version, when it has one that builds (a stored target that
    does not is reported by loading the model, not here)."""
    try:
        target = target_of(metadata, dim)
    except nfcore.NFCoreError:
        return None
    return None if target is None else TargetPublic(**target_public(target))


def _check_name(store: ModelStore, name: str) -> None:
    if not store.versions(name):
        raise NotFound(f"Unknown model {name!r}; GET /models lists the models")


@router.get("", response_model=ModelsPublic, responses=_ERR, dependencies=[ReadAccess])
def read_models(store: StoreDep) -> ModelsPublic:
    """List every model with its versions."""
    data = []
    for name in store.names():
        versions = store.versions(name)
        if not versions:  # removed meanwhile
            continue
        try:
            latest = _version_public(store, name, versions[-1])
        except _UNREADABLE:
            continue  # half-copied or corrupted file: not listed, not fatal
        data.append(ModelSummary(name=name, versions=versions, latest=versions[-1],
                                 dim=latest.dim, context_dim=latest.context_dim))
    return ModelsPublic(data=data, count=len(data))


@router.get("/{name}", response_model=ModelPublic, responses=_ERR, dependencies=[ReadAccess])
def read_model(name: NamePath, store: StoreDep) -> ModelPublic:
    """One model: every version with its spec, metrics, creation time and hash."""
    _check_name(store, name)
    versions = []
    for v in store.versions(name):
        try:
            versions.append(_version_public(store, name, v))
        except _UNREADABLE:
            continue
    if not versions:
        raise NotFound(f"Model {name!r} has no readable version")
    return ModelPublic(name=name, latest=versions[-1].version, versions=versions)


@router.get("/{name}/versions/{version}/artifact", response_class=FileResponse,
            responses={200: {"content": {OCTET_STREAM: {}},
                             "description": "The version's model.safetensors"}, **_ERR},
            dependencies=[ReadAccess])
def read_model_artifact(name: NamePath,
                        version: Annotated[int, Path(ge=1, description="Version.")],
                        store: StoreDep) -> FileResponse:
    """Download one version's model.safetensors."""
    version = store.resolve(name, version)
    return FileResponse(store.path(name, version), media_type=OCTET_STREAM,
                        filename=f"{name}-v{version}.safetensors")


@router.post(
    "", status_code=201, response_model=ModelUploaded,
    responses={**_ERR, 409: {"model": ErrorPublic, "description": "That version exists"},
               413: {"model": ErrorPublic, "description": "Over the upload limit"},
               422: {"model": ErrorPublic, "description": "Not a valid nfcore model file"}},
    openapi_extra={"requestBody": {"required": True, "content": {
        OCTET_STREAM: {"schema": {"type": "string", "format": "binary",
                                  "description": "A model.safetensors written by nfcore.save"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"], "properties": {"file": {
                "type": "string", "format": "binary",
                "description": "A model.safetensors written by nfcore.save"}}}}}}},
    dependencies=[WriteAccess])
async def create_model(
    request: Request, store: StoreDep, settings: SettingsDep,
    name: Annotated[str, Query(pattern=NAME_PATTERN, description="Model name to store it under.",
                               examples=["my_flow"])],
    version: Annotated[int | None, Query(ge=1, description="Version to store it as; omitted "
                                         "means the next one. 409 if it exists.")] = None,
) -> ModelUploaded:
    """Upload a model.safetensors, as the raw body or as the form field ``file`` of a multipart
    upload (``curl -F file=@model.safetensors``); it is validated exactly like a load."""
    body = await read_body(request, settings.max_upload_bytes, what="Upload")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body = (await multipart_file(request, body))[0]
    if not body:
        raise InvalidInput("Upload is empty; send the bytes of a model.safetensors")

    def validate_and_store() -> tuple[int, nfcore.Flow, str]:
        try:
            flow = nfcore.loads(body)
        except nfcore.ArtifactError as e:
            raise InvalidInput(f"Malformed model upload: {e}") from None
        try:  # a model-language target in its metadata must rebuild, as the cache will
            target_of(flow.metadata, flow.dim)
        except nfcore.NFCoreError as e:
            raise InvalidInput(f"Malformed model upload: its target cannot be rebuilt: {e}"
                               ) from None
        return store.publish_bytes(name, body, version=version), flow, read_info(body).content_hash

    v, flow, content_hash = await run_in_threadpool(validate_and_store)
    return ModelUploaded(name=name, version=v, hash=content_hash, dim=flow.dim,
                         context_dim=flow.context_dim,
                         artifact_url=f"/models/{name}/versions/{v}/artifact")


@router.get("/{name}/plot.png", response_class=Response,
            responses={200: {"content": {"image/png": {}},
                             "description": "Density heat map with samples on top"},
                       **_ERR, 422: {"model": ErrorPublic, "description": "Not a 2-D model"},
                       413: {"model": ErrorPublic, "description": "grid x grid is over the "
                                                                  "row limit"}},
            dependencies=[ReadAccess])
async def read_model_plot(
    name: NamePath, plane: DataPlaneDep,
    version: Annotated[int | None, Query(ge=1, description="Version; default latest.")] = None,
    n: Annotated[int, Query(ge=1, le=20_000, description="Samples to draw.")] = 1000,
    grid: Annotated[int, Query(ge=16, le=400, description="Density grid points per axis.")] = 200,
    seed: Annotated[int, Query(ge=0, description="Seed of the samples.")] = 0,
) -> Response:
    """A picture of a 2-D model: its density as a heat map, with samples on top (for a model fit
    to a model-language target of two parameter columns, in its constrained space)."""
    loaded = await plane.cache.get(name, version)
    if loaded.flow.dim != 2 or loaded.flow.context_dim != 0:
        raise InvalidInput(f"Plots are for unconditional 2-D models; model {loaded.label} has "
                           f"dim {loaded.flow.dim} and context_dim {loaded.flow.context_dim}")
    target = loaded.target  # a model-language fit: its two constrained parameters
    if target is not None and len(target.param_columns) != 2:
        raise InvalidInput(f"Plots are for models of two parameter columns; model {loaded.label} "
                           f"has {target.param_columns}")
    _, samples, _ = await plane.draw(name, loaded.version, n, seed=seed)
    samples = samples[:, :2]
    lo = np.percentile(samples, 0.5, axis=0)
    hi = np.percentile(samples, 99.5, axis=0)
    pad = 0.15 * (hi - lo) + 1e-3
    lo, hi = lo - pad, hi + pad
    xs = np.linspace(lo[0], hi[0], grid)
    ys = np.linspace(lo[1], hi[1], grid)
    points = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    if target is None:
        _, log_prob = await plane.score(name, loaded.version, points)
    else:  # zero density outside the support (below a lower bound, say)
        inside = await run_in_threadpool(
            lambda: target.in_support(torch.from_numpy(points)).numpy())
        log_prob = np.full(len(points), -np.inf)
        if inside.any():
            log_prob[inside] = (await plane.score(name, loaded.version, points[inside]))[1]
    density = np.exp(log_prob.reshape(grid, grid))
    png = await run_in_threadpool(_render, density, samples, (lo, hi), loaded.label)
    return Response(png, media_type="image/png")


def _render(density: np.ndarray, samples: np.ndarray, box: tuple[np.ndarray, np.ndarray],
            title: str) -> bytes:
    from matplotlib.figure import Figure  # Agg through Figure: no pyplot global state

    lo, hi = box
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    ax.imshow(density, origin="lower", extent=(lo[0], hi[0], lo[1], hi[1]), aspect="auto",
              cmap="viridis")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="white", alpha=0.5, linewidths=0)
    ax.set_title(f"{title}: density and {len(samples)} samples")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
