"""Training jobs on the API's side: submit (record, then queue), read, list and cancel.

A submission is checked whole (``service.training.requests``) before anything is stored: a bad
spec, an unknown dataset, a dimension mismatch or a malformed expression is an ``InvalidInput``
rather than a failed job later. Inline data is kept as a dataset once every check has passed. The
worker's side is ``service.training.worker``.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from sqlalchemy import func, select

from ..errors import Conflict, InvalidInput, NotFound, Overloaded
from ..settings import Settings
from ..store import ModelStore
from ..wire import JobStatus
from .datasets import parse_inline, save_dataset
from .queue import JobQueue
from .reaper import checkpoint_path
from .records import Database, DatasetRecord, JobRecord, new_id
from .requests import check_budget, check_data, checked_spec, checked_target

__all__ = ["submit_job", "cancel_job", "list_jobs", "read_job", "read_dataset"]

log = logging.getLogger("nfserve.jobs")


def submit_job(db: Database, queue: JobQueue, settings: Settings, *, name: str,
               flow: dict[str, Any], objective: dict[str, Any],
               training: dict[str, Any]) -> JobRecord:
    """Check the request, record the job as queued and send it to the workers.

    ``objective`` is ``{"kind": "density", "dataset": id}`` (or inline ``"data"`` and
    ``"context"``) or ``{"kind": "variational", "target": …}``; ``training`` holds the options
    the client gave (None for those it did not).
    """
    ModelStore.check_name(name)
    spec = checked_spec(flow)
    training = {k: v for k, v in training.items() if v is not None}
    kind = objective["kind"]
    parsed = None
    if kind == "density":
        if objective.get("data") is not None:  # stored as a dataset once every check has passed
            parsed = parse_inline(objective["data"], objective.get("context"))
            rows, dim, context_dim = parsed.rows, parsed.dim, parsed.context_dim
            stored: dict[str, Any] = {"kind": kind, "dataset": None, "inline": True}
        else:
            dataset = db.get_dataset(objective["dataset"])
            if dataset is None:
                raise InvalidInput(f"objective.dataset: unknown dataset {objective['dataset']!r}; "
                                   f"upload one with POST /datasets")
            rows, dim, context_dim = dataset.rows, dataset.dim, dataset.context_dim
            stored = {"kind": kind, "dataset": dataset.id, "inline": False}
        check_data(rows, dim, context_dim, spec)
        total = check_budget(kind, training, settings, rows)
    elif kind == "variational":
        target = objective["target"]
        if isinstance(target, dict):  # keys left out stay out (a model's data, derived)
            target = {k: v for k, v in target.items() if v is not None}
        checked = checked_target(target, spec)
        total = check_budget(kind, training, settings)
        stored = {"kind": kind, "target": target}
        contexts = objective.get("contexts")
        if contexts is not None or checked.context_dim:
            stored["contexts"], parsed = _contexts(db, checked.context_dim, contexts)
    else:
        raise InvalidInput(f"objective.kind: expected 'density' or 'variational'; got {kind!r}")
    if parsed is not None:
        saved = save_dataset(db, settings.data_dir, parsed, filename="inline").id
        stored["contexts" if kind == "variational" else "dataset"] = saved
    job = JobRecord(id=new_id("job"), name=name, kind=kind, status=JobStatus.QUEUED, spec=spec,
                    objective=stored, training=training, total=total, step=0)
    with db.session() as s:
        s.add(job)
    try:
        queue.submit(job.id)
    except Exception as e:
        log.exception("Could not enqueue job %s", job.id)
        db.transition(job.id, JobStatus.FAILED, from_=JobStatus.QUEUED,
                      error=f"The queue was unreachable at submission: {e}")
        raise Overloaded(f"The job queue is unreachable ({type(e).__name__}); try again") from None
    return job


def _contexts(db: Database, context_dim: int, contexts: Any) -> tuple[str | None, Any]:
    """The contexts of an amortized variational job: ``(dataset id, None)`` for ``{"dataset":
    id}``, ``(None, parsed rows)`` for inline rows (saved as a dataset once every check has
    passed); ``InvalidInput`` naming ``objective.contexts`` otherwise."""
    if not context_dim:
        raise InvalidInput("objective.contexts: the target has no 'context' block; contexts are "
                           "for amortized fits of a model with one")
    if contexts is None:
        raise InvalidInput(f"objective.contexts: the model has a 'context' block (rows of "
                           f"{context_dim} numbers); give the contexts to fit over, inline "
                           "[[...], ...] or {'dataset': id}")
    if isinstance(contexts, dict):
        if set(contexts) != {"dataset"}:
            raise InvalidInput("objective.contexts: expected rows [[...], ...] or "
                               f"{{'dataset': id}}; got keys {sorted(map(str, contexts))}")
        dataset = db.get_dataset(contexts["dataset"])
        if dataset is None:
            raise InvalidInput(f"objective.contexts.dataset: unknown dataset "
                               f"{contexts['dataset']!r}; upload one with POST /datasets")
        if dataset.dim != context_dim or dataset.context_dim:
            raise InvalidInput(f"objective.contexts.dataset: its rows have {dataset.dim} columns; "
                               f"the model's context rows have {context_dim} numbers")
        return dataset.id, None
    parsed = parse_inline(contexts, what="objective.contexts")
    if parsed.dim != context_dim:
        raise InvalidInput(f"objective.contexts: rows of {parsed.dim} numbers; the model's "
                           f"context rows have {context_dim}")
    return None, parsed


T = TypeVar("T")


def _found(row: T | None, message: str) -> T:
    if row is None:
        raise NotFound(message)
    return row


def read_job(db: Database, job_id: str) -> JobRecord:
    return _found(db.get_job(job_id), f"Unknown job {job_id!r}; GET /jobs lists the jobs")


def list_jobs(db: Database, *, status: JobStatus | None = None, name: str | None = None,
              limit: int = 100, offset: int = 0) -> tuple[list[JobRecord], int]:
    """Jobs, newest first, and how many match in all."""
    where = [c for c in (None if status is None else JobRecord.status == status,
                         None if name is None else JobRecord.name == name) if c is not None]
    with db.session() as s:
        jobs = list(s.scalars(select(JobRecord).where(*where)
                              .order_by(JobRecord.created_at.desc(), JobRecord.id)
                              .limit(limit).offset(offset)))
        count = s.scalar(select(func.count()).select_from(JobRecord).where(*where)) or 0
    return jobs, count


def cancel_job(db: Database, job_id: str, settings: Settings) -> JobRecord:
    """Cancel: a queued job becomes ``cancelled`` at once and never starts; a running one is
    flagged and its worker stops it within a step. A finished job is a ``Conflict``. A queued job
    that had been handed back keeps a checkpoint: it is deleted."""
    job = read_job(db, job_id)
    if db.transition(job_id, JobStatus.CANCELLED, from_=JobStatus.QUEUED, cancel_requested=True):
        checkpoint_path(settings, job_id).unlink(missing_ok=True)
    else:
        db.transition(job_id, from_=JobStatus.RUNNING, cancel_requested=True)
    job = read_job(db, job_id)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise Conflict(f"Job {job_id!r} already {job.status}; there is nothing to cancel")
    return job


def read_dataset(db: Database, dataset_id: str) -> DatasetRecord:
    return _found(db.get_dataset(dataset_id), f"Unknown dataset {dataset_id!r}")
