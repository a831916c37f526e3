"""Schemas of the jobs and datasets resources: ``POST /train``, ``/jobs``, ``/datasets``."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .db import Dataset, Job
from .store import NAME_PATTERN

__all__ = [
    "TrainingOptions", "DensityObjective", "BuiltinTarget", "ExpressionTarget",
    "VariationalObjective", "JobCreate", "JobAccepted", "ProgressPublic", "JobResult",
    "JobPublic", "JobsPublic", "DatasetPublic", "job_public", "dataset_public",
]


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class TrainingOptions(BaseModel):
    """How long and how to train. Omitted options take the engine's defaults."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, ge=1, description="Optimizer steps (default 1000 when neither "
                              "steps nor epochs is given).", examples=[2000])
    epochs: int | None = Field(None, ge=1, description="Passes over the data (density jobs only).")
    batch_size: int = Field(256, ge=1, le=65536, description="Rows (or samples) per step.")
    lr: float = Field(1e-3, gt=0, le=10, description="Adam learning rate.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed: same seed, same data, same model.")
    max_seconds: float | None = Field(None, gt=0, description="Wall-clock limit of the training.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Held-out share of the data "
                                       "for val_loss (density jobs).")
    anneal_steps: int | None = Field(None, ge=0, description="Steps over which the target's "
                                     "weight rises from 0 to 1 (variational jobs).")

    @field_validator("lr", "max_seconds")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("expected a finite number")
        return v


class DensityObjective(BaseModel):
    """Maximum likelihood on data: an uploaded dataset, or rows inline."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["density"]
    dataset: str | None = Field(None, description="Id from POST /datasets.",
                                examples=["ds_0123456789abcdef0123456789abcdef"])
    data: Any = Field(None, description="Rows inline, e.g. [[0.1, 2.0], …] (small data only).")
    context: Any = Field(None, description="Conditioning rows for inline data (conditional flows).")

    @model_validator(mode="after")
    def _one_source(self) -> DensityObjective:
        if (self.dataset is None) == (self.data is None):
            raise ValueError("give exactly one of 'dataset' (an id from POST /datasets) or 'data' "
                             "(rows inline)")
        if self.context is not None and self.data is None:
            raise ValueError("'context' goes with inline 'data'; a dataset carries its own")
        return self


class BuiltinTarget(BaseModel):
    """A built-in or plugin target by name, e.g. ``{"builtin": "U1"}``."""

    model_config = ConfigDict(extra="forbid")

    builtin: str = Field(description="U1-U4, banana, funnel, gaussian_mixture, or a plugin.",
                         examples=["U1"])
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options, e.g. "
                                    "{\"dim\": 5} for the funnel.")


class ExpressionTarget(BaseModel):
    """An unnormalized log density written as an expression in ``z`` (a whitelisted grammar)."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(ge=1, description="Dimension of z.", examples=[2])
    log_prob: str = Field(max_length=20000, description="Expression for log p~(z).",
                          examples=["-0.5*sum(z**2)"])
    constants: dict[str, Any] = Field(default_factory=dict, description="Named constants.")


class VariationalObjective(BaseModel):
    """Reverse KL against an unnormalized log density."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["variational"]
    target: BuiltinTarget | ExpressionTarget


Objective = Annotated[DensityObjective | VariationalObjective, Field(discriminator="kind")]


class JobCreate(BaseModel):
    """``POST /train``: what to train and how."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Model name; the job publishes its next "
                      "version.", examples=["two_moons"])
    flow: dict[str, Any] = Field(description="Flow spec (layers or a preset).",
                                 examples=[{"preset": "nsf", "dim": 2, "transforms": 4}])
    objective: Objective
    training: TrainingOptions = Field(default_factory=TrainingOptions)


class JobAccepted(BaseModel):
    """The answer to ``POST /train`` (202)."""

    job_id: str = Field(description="Id of the new job.",
                        examples=["job_0123456789abcdef0123456789abcdef"])
    status: str = Field(description="Always 'queued' at first.", examples=["queued"])
    status_url: str = Field(description="Where to poll the job (also the Location header).",
                            examples=["/jobs/job_0123456789abcdef0123456789abcdef"])


class ProgressPublic(BaseModel):
    """Where a job stands; written by its worker about once a second while it runs."""

    step: int | None = Field(None, description="Steps done.", examples=[1200])
    total: int | None = Field(None, description="Steps planned.", examples=[2000])
    loss: float | None = Field(None, description="Latest training loss (mean since the previous "
                               "report).", examples=[1.234])
    val_loss: float | None = Field(None, description="Latest validation loss (density jobs).",
                                   examples=[1.251])
    elapsed: float | None = Field(None, description="Seconds of training so far (across "
                                  "attempts).", examples=[12.5])
    eta: float | None = Field(None, description="Estimated seconds left.", examples=[8.3])


class JobResult(BaseModel):
    """The model version a succeeded job published."""

    model: str = Field(description="Model name.", examples=["two_moons"])
    version: int = Field(description="The new version, servable at once.", examples=[3])


_TS = "UTC time"


class JobPublic(BaseModel):
    """A job as ``GET /jobs/{id}`` shows it."""

    id: str = Field(description="Job id.", examples=["job_0123456789abcdef0123456789abcdef"])
    name: str = Field(description="Model name the job publishes to.", examples=["two_moons"])
    kind: Literal["density", "variational"] = Field(description="Objective kind.",
                                                    examples=["density"])
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="Lifecycle state.", examples=["running"])
    cancel_requested: bool = Field(description="DELETE was called; a running job stops within a "
                                   "step.", examples=[False])
    created_at: datetime = Field(description=f"{_TS} of submission.")
    started_at: datetime | None = Field(description=f"{_TS} a worker first started it.")
    finished_at: datetime | None = Field(description=f"{_TS} it ended.")
    heartbeat_at: datetime | None = Field(description=f"{_TS} of its worker's last heartbeat.")
    attempts: int = Field(description="Times a worker started it.", examples=[1])
    retries: int = Field(description="Times it was re-queued after its worker died.",
                         examples=[0])
    resumed_from: int | None = Field(None, description="Checkpoint step the latest attempt resumed "
                                     "from, if any.", examples=[None])
    progress: ProgressPublic = Field(description="Step, total, losses, elapsed and eta.")
    result: JobResult | None = Field(description="The published model, once succeeded.")
    error: str | None = Field(description="Why it failed.", examples=[None])
    objective: dict[str, Any] = Field(description="What it fits: dataset id or target.",
                                      examples=[{"kind": "density", "dataset": "ds_0123"}])
    training: dict[str, Any] = Field(description="Training options, defaults filled in.",
                                     examples=[{"steps": 2000, "batch_size": 256}])
    spec: dict[str, Any] = Field(description="The normalized flow spec.")


class JobsPublic(BaseModel):
    """Jobs, newest first."""

    data: list[JobPublic] = Field(description="This page of jobs.")
    count: int = Field(description="Jobs matching the filters in all.", examples=[42])


class DatasetPublic(BaseModel):
    """An uploaded dataset."""

    id: str = Field(description="Dataset id, for objective.dataset.",
                    examples=["ds_0123456789abcdef0123456789abcdef"])
    rows: int = Field(description="Rows (points).", examples=[10000])
    dim: int = Field(description="Columns of x; must equal the flow's dim.", examples=[2])
    context_dim: int = Field(description="Columns of the context (0 if none).", examples=[0])
    format: str = Field(description="csv, npy, safetensors, or inline.", examples=["csv"])
    dtype: str = Field(description="Stored dtype of x.", examples=["float64"])
    filename: str | None = Field(description="Uploaded file name.", examples=["moons.csv"])
    bytes: int = Field(description="Size of the stored safetensors file.", examples=[160104])
    sha256: str = Field(description="Hash of the stored file.", examples=["sha256:9f…"])
    created_at: datetime = Field(description=f"{_TS} of the upload.")


def job_public(job: Job) -> JobPublic:
    result = (JobResult(model=job.result_name, version=job.result_version)
              if job.result_name is not None and job.result_version is not None else None)
    return JobPublic(
        id=job.id, name=job.name, kind=job.kind, status=job.status,
        cancel_requested=bool(job.cancel_requested), created_at=_ts(job.created_at),
        started_at=_ts(job.started_at), finished_at=_ts(job.finished_at),
        heartbeat_at=_ts(job.heartbeat_at), attempts=job.attempts or 0, retries=job.retries or 0,
        resumed_from=job.resumed_from,
        progress=ProgressPublic(step=job.step, total=job.total, loss=job.loss,
                                val_loss=job.val_loss, elapsed=job.elapsed, eta=job.eta),
        result=result, error=job.error, objective=job.objective, training=job.training,
        spec=job.spec)


def dataset_public(row: Dataset) -> DatasetPublic:
    return DatasetPublic(id=row.id, rows=row.rows, dim=row.dim, context_dim=row.context_dim,
                         format=row.format, dtype=row.dtype, filename=row.filename,
                         bytes=row.bytes, sha256=row.sha256, created_at=_ts(row.created_at))
