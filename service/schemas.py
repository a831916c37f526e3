"""Request and response schemas of the HTTP API, one family per resource, all in one place.

Every field has a description and an example, so ``/docs`` documents the whole API. The inference
routes parse their bodies with orjson and numpy rather than field by field (a 1M-row ``x`` would be
slow through pydantic); these models are still their documented contract and validate every
non-array field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import orjson
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from .store import NAME_PATTERN

__all__ = [
    "FastJSONResponse", "ErrorPublic", "LogProbRequest", "LogProbOptions", "LogProbResponse",
    "SampleRequest", "SampleOptions", "SampleResponse", "ModelVersionPublic", "ModelPublic",
    "ModelSummary", "ModelsPublic", "ModelUploaded", "HealthPublic", "CheckPublic",
    "OCTET_STREAM",
]

OCTET_STREAM = "application/octet-stream"


class FastJSONResponse(Response):
    """JSON rendered by orjson, numpy arrays included (no per-element Python work)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


_NAME = Field(description="Model name, as in GET /models.", examples=["two_moons"],
              pattern=NAME_PATTERN)
_VERSION = Field(None, ge=1, description="Model version; omitted means the latest.",
                 examples=[1])


class ErrorPublic(BaseModel):
    """Every error answer."""

    detail: str = Field(description="What was wrong, precisely.",
                        examples=["x has 3 columns; model 'two_moons' version 1 expects 2"])


# ---------------------------------------------------------------------------------- inference
class LogProbOptions(BaseModel):
    """The non-array fields of a /log_prob request (query string of a binary request)."""

    model_config = ConfigDict(extra="forbid")

    model: str = _NAME
    version: int | None = _VERSION


class LogProbRequest(LogProbOptions):
    """Score points under a model. As ``application/octet-stream``, send a safetensors body with
    tensors ``x`` (and ``context``) and put ``model``/``version`` in the query string."""

    x: list[list[float]] = Field(
        description="Points, one row per point, each of the model's dimension.",
        examples=[[[0.5, -0.25], [1.0, 0.3]]])
    context: list[list[float]] | list[float] | None = Field(
        None, description="Conditioning values for a conditional model: one row per point, or one "
                          "row for all points.", examples=[None])


class LogProbResponse(BaseModel):
    """Log densities, one per row of ``x``. As ``application/octet-stream`` (``Accept`` header):
    a safetensors body with the tensor ``log_prob``."""

    model: str = Field(description="Model name.", examples=["two_moons"])
    version: int = Field(description="Model version that answered.", examples=[1])
    log_prob: list[float] = Field(description="log p(x) per row, in the data's own units.",
                                  examples=[[-1.42, -2.07]])


class SampleOptions(BaseModel):
    """The non-array fields of a /sample request (query string of a binary request)."""

    model_config = ConfigDict(extra="forbid")

    model: str = _NAME
    version: int | None = _VERSION
    n: int = Field(ge=1, description="Number of samples.", examples=[3])
    seed: int | None = Field(
        None, ge=0, lt=2**63,
        description="Seed of this request's own noise: the same seed gives the same samples, "
                    "batched with other requests or not.", examples=[42])


class SampleRequest(SampleOptions):
    """Draw samples with their log densities. As ``application/octet-stream``, put the options in
    the query string and, for a conditional model, a safetensors body with the tensor
    ``context``."""

    context: list[list[float]] | list[float] | None = Field(
        None, description="Conditioning values for a conditional model: n rows, or one row.",
        examples=[None])


class SampleResponse(BaseModel):
    """Samples and their log densities. As ``application/octet-stream`` (``Accept`` header): a
    safetensors body with tensors ``samples`` and ``log_prob``."""

    model: str = Field(description="Model name.", examples=["two_moons"])
    version: int = Field(description="Model version that answered.", examples=[1])
    samples: list[list[float]] = Field(description="n rows of the model's dimension.",
                                       examples=[[[0.1, 0.9], [1.8, -0.2], [-0.7, 0.6]]])
    log_prob: list[float] = Field(description="log q(x) of each sample.",
                                  examples=[[-1.1, -0.9, -1.6]])


# ---------------------------------------------------------------------------------- models
class ModelVersionPublic(BaseModel):
    """One stored version of a model."""

    version: int = Field(description="Version number (positive integer).", examples=[1])
    created: datetime = Field(description="When the version's file was written (UTC).",
                              examples=["2026-11-21T05:00:00Z"])
    size_bytes: int = Field(description="Size of model.safetensors.", examples=[48512])
    hash: str = Field(description="Content hash stored in the artifact.",
                      examples=["sha256:9f2c…"])
    dim: int = Field(description="Dimension of the data.", examples=[2])
    context_dim: int = Field(description="Dimension of the context; 0: unconditional.",
                             examples=[0])
    spec: dict[str, Any] = Field(description="Normalized flow spec the model was built from.",
                                 examples=[{"dim": 2, "context_dim": 0, "dtype": "float32",
                                            "base": {"type": "normal"}, "layers": []}])
    metadata: dict[str, Any] = Field(
        description="The artifact's other metadata (training summary, metrics, …), JSON values "
                    "decoded.", examples=[{"training": {"objective": "density", "steps": 2000}}])
    artifact_url: str = Field(description="Where to download the file.",
                              examples=["/models/two_moons/versions/1/artifact"])


class ModelPublic(BaseModel):
    """A model with all its versions."""

    name: str = Field(description="Model name.", examples=["two_moons"])
    latest: int = Field(description="Highest version; what a request without version gets.",
                        examples=[2])
    versions: list[ModelVersionPublic] = Field(description="Every version, ascending.")


class ModelSummary(BaseModel):
    """A model in the list."""

    name: str = Field(description="Model name.", examples=["two_moons"])
    versions: list[int] = Field(description="Its versions, ascending.", examples=[[1, 2]])
    latest: int = Field(description="Highest version.", examples=[2])
    dim: int = Field(description="Dimension of the latest version.", examples=[2])
    context_dim: int = Field(description="Context dimension of the latest version.",
                             examples=[0])


class ModelsPublic(BaseModel):
    """Every model in the store."""

    data: list[ModelSummary] = Field(description="Models, by name.")
    count: int = Field(description="Number of models.", examples=[5])


class ModelUploaded(BaseModel):
    """The result of an upload."""

    name: str = Field(description="Model name.", examples=["my_flow"])
    version: int = Field(description="Version it was stored as.", examples=[3])
    hash: str = Field(description="Content hash of the artifact.", examples=["sha256:9f2c…"])
    dim: int = Field(description="Dimension of the data.", examples=[2])
    context_dim: int = Field(description="Dimension of the context.", examples=[0])
    artifact_url: str = Field(description="Where to download it.",
                              examples=["/models/my_flow/versions/3/artifact"])


# ---------------------------------------------------------------------------------- health
class CheckPublic(BaseModel):
    """One readiness check."""

    name: str = Field(description="What was checked.", examples=["model_store"])
    ok: bool = Field(description="Whether it passed.", examples=[True])
    detail: str = Field("", description="Why not, or a note.", examples=["5 models"])


class HealthPublic(BaseModel):
    """Liveness or readiness."""

    status: Literal["ok", "unavailable"] = Field(description="Overall state.", examples=["ok"])
    checks: list[CheckPublic] = Field(default_factory=list,
                                      description="Individual checks (readiness only).")
