"""The reaper: no job stays ``running`` without a live worker, and no queued job without a message.

Every worker process, and the API too, sweeps the job table every few seconds:

- A ``running`` job whose heartbeat is older than ``heartbeat_timeout_s`` lost its worker (killed,
  host gone). It is re-queued, to resume from its last checkpoint, up to ``max_retries`` times, and
  then marked ``failed`` with the reason (``cancelled`` if a cancel was asked). Each change is one
  ``Database.transition`` fenced by the attempt number, so any number of reapers on any number of
  hosts agree.
- Jobs left ``queued`` while the queue is empty (the API died between recording and sending, or
  the queue was flushed) are sent again; a duplicate message is harmless, as running starts with an
  atomic claim.
- Rows of workers silent for long are forgotten.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy import select

from ..settings import Settings
from ..wire import JobStatus
from .queue import JobQueue
from .records import Database, JobRecord, now

__all__ = ["reap", "resend_orphans", "Reaper", "checkpoint_path"]

log = logging.getLogger("nfserve.reaper")


def checkpoint_path(settings: Settings, job_id: str) -> Path:
    """Where a job's training checkpoint lives (shared by every worker that may resume it)."""
    return Path(settings.data_dir) / "checkpoints" / f"{job_id}.safetensors"


def reap(db: Database, queue: JobQueue, settings: Settings, *, orphans: bool = True,
         dead_worker: str | None = None) -> dict[str, int]:
    """One sweep: re-queue or fail the running jobs whose heartbeat is stale (or, given
    ``dead_worker``, every running job of that worker, known to be dead), and re-send the queued
    jobs that have no message. Returns counts by outcome."""
    t = now()
    timeout = settings.heartbeat_timeout_s
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    lost = (JobRecord.worker == dead_worker if dead_worker is not None
            else JobRecord.heartbeat_at < t - timeout)
    with db.session() as s:
        stale = s.execute(
            select(JobRecord.id, JobRecord.attempts, JobRecord.retries,
                   JobRecord.cancel_requested, JobRecord.worker, JobRecord.heartbeat_at)
            .where(JobRecord.status == JobStatus.RUNNING, lost)
        ).all()
    for job_id, attempt, retries, cancel, worker, beat in stale:
        age = t - (beat or t)
        if cancel:
            to, values = JobStatus.CANCELLED, {}
        elif retries >= settings.max_retries:
            why = (f"died ({age:.0f} s after its last heartbeat)" if dead_worker is not None
                   else f"stopped sending heartbeats ({age:.0f} s without one, over "
                        f"NFSERVE_HEARTBEAT_TIMEOUT_S={timeout:g})")
            to, values = JobStatus.FAILED, {
                "error": f"Worker {worker} {why} on attempt {attempt}; "
                         f"the job was already re-queued {retries} times "
                         f"(NFSERVE_MAX_RETRIES={settings.max_retries}), so it is failed"}
        else:
            to, values = JobStatus.QUEUED, {"retries": JobRecord.retries + 1, "worker": None,
                                            "heartbeat_at": None}
        if not db.transition(job_id, to, attempt=attempt, **values):
            continue  # another reaper got there first, or the worker came back
        outcome = "requeued" if to == JobStatus.QUEUED else str(to)
        counts[outcome] += 1
        if to == JobStatus.QUEUED:
            log.warning("Job %s: worker %s lost (%.0f s since its last beat); re-queued "
                        "(retry %d of %d)", job_id, worker, age, retries + 1,
                        settings.max_retries)
            try:
                queue.submit(job_id)
            except Exception:
                log.warning("Could not send job %s to the queue; the next sweep will", job_id)
        else:
            log.warning("Job %s: worker %s lost (%.0f s since its last beat); %s", job_id,
                        worker, age, outcome)
            checkpoint_path(settings, job_id).unlink(missing_ok=True)
    if orphans:
        counts["resent"] = resend_orphans(db, queue, settings)
    return counts


def resend_orphans(db: Database, queue: JobQueue, settings: Settings, *,
                   older_than: float | None = None) -> int:
    """Re-send queued jobs that have sat unclaimed past the heartbeat timeout while the queue is
    empty (their message was lost). Duplicates are harmless: running starts with a claim."""
    if queue.pending() > 0:
        return 0
    age = settings.heartbeat_timeout_s if older_than is None else older_than
    with db.session() as s:
        ids = list(s.scalars(select(JobRecord.id).where(JobRecord.status == JobStatus.QUEUED,
                                                        JobRecord.updated_at < now() - age)))
    for job_id in ids:
        queue.submit(job_id)
        db.transition(job_id, from_=JobStatus.QUEUED)  # stamps updated_at: not again at once
    if ids:
        log.warning("Re-sent %d queued jobs that had no message in the queue", len(ids))
    return len(ids)


class Reaper(threading.Thread):
    """Runs ``reap`` every few seconds until ``stop`` is set (in every worker, and in the API so
    that jobs are not left running when every worker is gone)."""

    def __init__(self, db: Database, queue: JobQueue, settings: Settings, stop: threading.Event):
        super().__init__(name="reaper", daemon=True)
        self.db, self.queue, self.settings, self.stop = db, queue, settings, stop
        self.interval = max(0.5, min(5.0, settings.heartbeat_timeout_s / 3))

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                reap(self.db, self.queue, self.settings)
                self.db.forget_workers(older_than_s=10 * self.settings.heartbeat_timeout_s)
            except Exception:
                log.warning("Reaper sweep failed; retrying", exc_info=True)
