"""Training jobs over HTTP: submit (``POST /train``), list, read and cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from ...training import cancel_job, list_jobs, read_job, submit_job
from ...wire import JobStatus
from ..deps import DatabaseDep, QueueDep, ReadAccess, SettingsDep, WriteAccess
from ..schemas import ErrorPublic, JobAccepted, JobCreate, JobPublic, JobsPublic, job_public

__all__ = ["router"]

router = APIRouter(tags=["jobs"])

_ERR = {code: {"model": ErrorPublic, "description": text} for code, text in [
    (401, "Missing or invalid API key"), (403, "Key lacks the scope"), (404, "Unknown job"),
    (422, "Invalid spec, objective, expression or options"), (503, "Queue unreachable")]}

JobIdPath = Annotated[str, Path(description="Job id from POST /train.", max_length=64)]


@router.post("/train", status_code=202, response_model=JobAccepted, dependencies=[WriteAccess],
             responses=_ERR)
def create_train_job(body: JobCreate, db: DatabaseDep, queue: QueueDep,
                     settings: SettingsDep) -> JSONResponse:
    """Queue a training job; poll its ``status_url`` for progress and the resulting model.
    Budget: a time budget (``max_seconds``) alone trains until it runs out or early stopping; a
    step count alone trains that many steps; both: whichever comes first; neither: the default
    step count (see ``TrainingOptions``)."""
    job = submit_job(db, queue, settings, name=body.name, flow=body.flow,
                     objective=body.objective.model_dump(), training=body.training.model_dump())
    url = f"/jobs/{job.id}"
    accepted = JobAccepted(job_id=job.id, status=job.status, status_url=url)
    return JSONResponse(accepted.model_dump(mode="json"), status_code=202, headers={"Location": url})


@router.get("/jobs", response_model=JobsPublic, dependencies=[ReadAccess], responses=_ERR)
def read_jobs(
    db: DatabaseDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    name: Annotated[str | None, Query(description="Only jobs training this model.",
                                      max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobsPublic:
    """Jobs, newest first, with their status, progress and result."""
    jobs, count = list_jobs(db, status=status, name=name, limit=limit, offset=offset)
    return JobsPublic(data=[job_public(j) for j in jobs], count=count)


@router.get("/jobs/{job_id}", response_model=JobPublic, dependencies=[ReadAccess],
            responses=_ERR)
def read_job_status(job_id: JobIdPath, db: DatabaseDep) -> JobPublic:
    """One job: status, progress (step, total, loss, val_loss, elapsed, eta), result or error."""
    return job_public(read_job(db, job_id))


@router.delete("/jobs/{job_id}", response_model=JobPublic, dependencies=[WriteAccess],
               responses={**_ERR, 409: {"model": ErrorPublic,
                                        "description": "The job already finished"}})
def delete_job(job_id: JobIdPath, db: DatabaseDep, settings: SettingsDep) -> JobPublic:
    """Cancel a job: a queued one never starts; a running one stops within a step and publishes
    nothing."""
    return job_public(cancel_job(db, job_id, settings))
