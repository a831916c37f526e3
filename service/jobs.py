"""Job submission, listing and cancellation: the API process's half of training jobs.

Everything a job needs is checked here, at submission, so a bad spec, an unknown dataset, a
dimension mismatch or a malformed expression is a 422 to the client rather than a failed job
later: the spec is normalized, the target is built and evaluated on a few points, and the data's
shape is compared with the flow's. The worker's half is ``service.tasks``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import func, select, update

import nfcore
from nfcore import targets
from nfcore.errors import SpecError, TargetError

from .datasets import parse_inline, save_dataset
from .db import Database, Dataset, Job, new_id, now
from .errors import Conflict, InvalidInput, NotFound, Overloaded
from .jobs_schemas import (
    BuiltinTarget,
    DensityObjective,
    ExpressionTarget,
    JobCreate,
)
from .queue import JobQueue

__all__ = ["submit_job", "cancel_job", "list_jobs", "read_job", "build_target",
           "density_steps", "dataset_or_404", "open_jobs", "close_jobs", "check_job_store",
           "check_queue", "JobsCollector", "DEFAULT_STEPS"]

log = logging.getLogger("nfserve.jobs")

DEFAULT_STEPS = 1000


def build_target(spec: dict[str, Any]) -> targets.Target:
    """The target of a variational objective (``{"builtin", "options"}`` or an expression); its
    ``spec`` goes into the model's training summary and the checkpoint fingerprint."""
    return targets.from_spec(spec)


def density_steps(training: dict[str, Any], rows: int) -> int:
    """The step budget of a density job: ``steps``, or ``epochs`` over the training rows."""
    if training.get("steps") is not None:
        return int(training["steps"])
    if training.get("epochs") is not None:
        fraction = training.get("validation_fraction", 0.1)
        n_val = 0 if fraction == 0 else min(max(1, round(rows * fraction)), rows - 1)
        train_rows = rows - n_val
        batch = min(training["batch_size"], train_rows)
        return int(training["epochs"]) * math.ceil(train_rows / batch)
    return DEFAULT_STEPS


def _spec(flow: dict[str, Any]) -> dict[str, Any]:
    try:
        return nfcore.normalize_spec(flow)
    except SpecError as e:
        where = f"flow.{e.field}" if e.field else "flow"
        raise InvalidInput(f"{where}: {e.message}") from None


def _check_target(body: ExpressionTarget | BuiltinTarget, spec: dict[str, Any]) -> dict:
    stored = body.model_dump()
    try:
        target = build_target(stored)
    except TargetError as e:
        raise InvalidInput(f"objective.target: {e}") from None
    if target.dim != spec["dim"]:
        raise InvalidInput(f"objective.target: the target has dimension {target.dim}; the flow "
                           f"has dim {spec['dim']}")
    # Evaluate on a few points, so shape errors between z and the constants surface now.
    z = torch.randn(4, target.dim, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64 if spec["dtype"] == "float64" else torch.float32)
    try:
        with torch.no_grad():
            out = target.log_prob(z)
    except (TargetError, RuntimeError, ValueError, IndexError, TypeError) as e:
        raise InvalidInput(f"objective.target: log_prob fails on test points of shape "
                           f"(4, {target.dim}): {e}") from None
    if torch.isnan(out).all():
        raise InvalidInput("objective.target: log_prob is NaN at every test point")
    return stored


def _check_budget(steps: int, settings: Any) -> None:
    if steps > settings.max_train_steps:
        raise InvalidInput(f"training: {steps} steps is over the limit of "
                           f"{settings.max_train_steps} (NFSERVE_MAX_TRAIN_STEPS)")


def submit_job(body: JobCreate, *, db: Database, queue: JobQueue, settings: Any) -> Job:
    """Validate ``body``, record the job as queued and send it to the workers."""
    spec = _spec(body.flow)
    training = body.training.model_dump()
    objective = body.objective
    parsed = None
    if isinstance(objective, DensityObjective):
        if objective.data is not None:  # stored as a dataset once every check has passed
            parsed = parse_inline(objective.data, objective.context)
            rows, dim, context_dim = parsed.rows, parsed.dim, parsed.context_dim
            stored = {"kind": "density", "dataset": None, "inline": True}
        else:
            dataset = db.get_dataset(objective.dataset)
            if dataset is None:
                raise InvalidInput(f"objective.dataset: unknown dataset {objective.dataset!r}; "
                                   f"upload one with POST /datasets")
            rows, dim, context_dim = dataset.rows, dataset.dim, dataset.context_dim
            stored = {"kind": "density", "dataset": dataset.id, "inline": False}
        if dim != spec["dim"]:
            raise InvalidInput(f"objective: the data has {dim} columns; the flow has dim "
                               f"{spec['dim']}")
        if context_dim != spec["context_dim"]:
            raise InvalidInput(f"objective: the data has context of dimension {context_dim}; "
                               f"the flow has context_dim {spec['context_dim']}")
        if rows < 2:
            raise InvalidInput(f"objective: the data has {rows} row; training needs at least 2")
        if training["anneal_steps"] is not None:
            raise InvalidInput("training.anneal_steps: only for variational jobs")
        if training["steps"] is not None and training["epochs"] is not None:
            raise InvalidInput("training: give 'steps' or 'epochs', not both")
        steps = density_steps(training, rows)
        kind = "density"
    else:
        if spec["context_dim"]:
            raise InvalidInput("flow.context_dim: variational jobs train unconditional flows; "
                               "use context_dim 0")
        if training["epochs"] is not None:
            raise InvalidInput("training.epochs: variational jobs have no data; give 'steps'")
        stored = {"kind": "variational", "target": _check_target(objective.target, spec)}
        steps = training["steps"] or DEFAULT_STEPS
        kind = "variational"
    _check_budget(steps, settings)
    if parsed is not None:
        stored["dataset"] = save_dataset(db, settings.data_dir, parsed, filename="inline").id
    training["total"] = steps
    job = Job(id=new_id("job"), name=body.name, kind=kind, status="queued", spec=spec,
              objective=stored, training=training, total=steps, step=0)
    with db.session() as s:
        s.add(job)
    try:
        queue.submit(job.id)
    except Exception as e:
        log.exception("Could not enqueue job %s", job.id)
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job.id, Job.status == "queued")
                      .values(status="failed", finished_at=now(), updated_at=now(),
                              error=f"The queue was unreachable at submission: {e}"))
        raise Overloaded(f"The job queue is unreachable ({type(e).__name__}); try again") from None
    return job


def read_job(db: Database, job_id: str) -> Job:
    job = db.get_job(job_id)
    if job is None:
        raise NotFound(f"Unknown job {job_id!r}; GET /jobs lists the jobs")
    return job


def list_jobs(db: Database, *, status: str | None = None, name: str | None = None,
              limit: int = 100, offset: int = 0) -> tuple[list[Job], int]:
    """Jobs, newest first, and how many match in all."""
    query = select(Job)
    counter = select(func.count()).select_from(Job)
    if status is not None:
        query, counter = query.where(Job.status == status), counter.where(Job.status == status)
    if name is not None:
        query, counter = query.where(Job.name == name), counter.where(Job.name == name)
    with db.session() as s:
        jobs = list(s.scalars(query.order_by(Job.created_at.desc(), Job.id)
                              .limit(limit).offset(offset)))
        count = s.scalar(counter) or 0
    return jobs, count


def cancel_job(db: Database, job_id: str, *, data_dir: Any = None) -> Job:
    """Cancel: a queued job becomes ``cancelled`` at once and never starts; a running one is
    flagged and its worker stops it within a step. A finished job is a 409. A queued job that
    had been handed back keeps a checkpoint in ``data_dir``: it is deleted."""
    t = now()
    with db.session() as s:
        if s.get(Job, job_id) is None:
            raise NotFound(f"Unknown job {job_id!r}; GET /jobs lists the jobs")
        was_queued = s.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued")
            .values(status="cancelled", cancel_requested=True, finished_at=t, updated_at=t)
            .execution_options(synchronize_session=False)).rowcount
        s.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                  .values(cancel_requested=True, updated_at=t)
                  .execution_options(synchronize_session=False))
    if was_queued and data_dir is not None:
        (Path(data_dir) / "checkpoints" / f"{job_id}.safetensors").unlink(missing_ok=True)
    job = read_job(db, job_id)
    if job.status in ("succeeded", "failed"):
        raise Conflict(f"Job {job_id!r} already {job.status}; there is nothing to cancel")
    return job


def dataset_or_404(db: Database, dataset_id: str) -> Dataset:
    row = db.get_dataset(dataset_id)
    if row is None:
        raise NotFound(f"Unknown dataset {dataset_id!r}")
    return row



# ---------------------------------------------------------------------- app lifespan
def open_jobs(app: Any) -> None:
    """Lifespan start: the job store (tables created if missing) and the queue on ``app.state``,
    and their readiness checks."""
    import threading

    from .worker import Reaper, load_plugins

    settings = app.state.settings
    load_plugins(settings)  # plugin targets must be known here, to check submissions
    app.state.db = Database.from_settings(settings)
    app.state.db.create_all()
    app.state.queue = JobQueue(settings)
    app.state.readiness_checks.extend([check_job_store, check_queue])
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None:
        metrics.registry.register(JobsCollector(app.state.db, app.state.queue))
    # The API reaps too: with every worker gone, a running job is still re-queued or failed.
    app.state.reaper_stop = threading.Event()
    Reaper(app.state.db, app.state.queue, settings, app.state.reaper_stop).start()


def close_jobs(app: Any) -> None:
    """Lifespan end. Queued and running jobs are untouched: they belong to the workers."""
    stop = getattr(app.state, "reaper_stop", None)
    if stop is not None:
        stop.set()
    queue = getattr(app.state, "queue", None)
    if queue is not None:
        queue.close()
    db = getattr(app.state, "db", None)
    if db is not None:
        db.dispose()


class JobsCollector:
    """Prometheus gauges read at scrape time: jobs by status, and messages waiting in the queue."""

    def __init__(self, db: Database, queue: JobQueue):
        self.db, self.queue = db, queue

    def describe(self) -> list:
        return []  # collected lazily, so registering does not query the database

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        jobs = GaugeMetricFamily("nfserve_jobs", "Training jobs by status.", labels=["status"])
        try:
            with self.db.session() as s:
                counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        except Exception:  # a scrape must not fail because the database blinked
            counts = None
        if counts is not None:
            for status in ("queued", "running", "succeeded", "failed", "cancelled"):
                jobs.add_metric([status], counts.get(status, 0))
            yield jobs
        try:
            pending = self.queue.pending()
        except Exception:
            return
        yield GaugeMetricFamily("nfserve_job_queue_messages", "Messages waiting in the job queue.",
                                value=pending)


def check_job_store(app: Any) -> tuple[str, bool, str]:
    db: Database = app.state.db
    try:
        db.ping()
    except Exception as e:
        return "job_store", False, f"database unreachable: {type(e).__name__}: {e}"
    return "job_store", True, db.url.render_as_string(hide_password=True)


def check_queue(app: Any) -> tuple[str, bool, str]:
    queue: JobQueue = app.state.queue
    try:
        pending = queue.pending()
    except Exception as e:
        return "queue", False, f"queue unreachable: {type(e).__name__}: {e}"
    return "queue", True, f"{'redis' if queue.is_redis else 'sqlite'}, {pending} messages waiting"
