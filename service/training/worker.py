"""The worker process (``nfserve worker``): takes job ids off the queue and runs them.

For each job id, ``JobRunner``:

1. **claims** the job (``Database.claim``: one atomic ``UPDATE … WHERE status = 'queued'``); if
   that changes no row, another worker has it (or it was cancelled or finished) and the message is
   dropped;
2. **trains** it through ``runner.fit``, the path ``nfserve train`` takes too. A monitor thread
   beats the job's heartbeat every ``heartbeat_interval_s`` with the latest progress, and reads the
   cancel flag. Every write is a ``Database.transition`` fenced by the attempt number: a worker
   presumed dead whose job was re-queued can no longer touch the row, and stops at its next step;
3. **checkpoints** to ``data_dir/checkpoints/<job_id>.safetensors``; a re-queued job resumes there;
4. **publishes** the flow through the model store (a new version, written atomically), then marks
   the job succeeded with the fit's summary.

A cancelled job publishes nothing and its checkpoint is deleted. When the worker is asked to stop
(SIGTERM, or the ``serve`` process that started it went away), the running job is handed back:
re-queued at once, to resume from its checkpoint, without counting as a retry.

The process: Huey's consumer with ``worker_threads`` thread workers, not fork, so CUDA stays
usable (run one worker per GPU, ``NFSERVE_DEVICE=cuda:N``); a reaper (``service.training.reaper``);
and a liveness beat in the ``workers`` table, busy or idle, which readiness reads.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from huey.consumer import Consumer
from sqlalchemy import select

import nfcore
from nfcore import targets
from nfcore.errors import TrainingCancelled
from nfcore.train import checkpoint_step

from ..settings import Settings
from ..store import ModelStore
from ..wire import JobStatus
from . import runner
from .datasets import load_dataset
from .queue import JobQueue
from .reaper import Reaper, checkpoint_path, reap, resend_orphans
from .records import Database, JobRecord, now
from .requests import load_plugins

__all__ = ["JobRunner", "run_worker", "check_worker", "worker_name", "main"]

log = logging.getLogger("nfserve.worker")

CANCEL_POLL_S = 0.25


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (PostgreSQL's JSON has no NaN)."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class _Monitor(threading.Thread):
    """Beats the heartbeat, writes progress and watches for cancellation, for one attempt."""

    def __init__(self, db: Database, job_id: str, attempt: int, interval: float,
                 shutdown: threading.Event):
        super().__init__(name=f"monitor-{job_id}", daemon=True)
        self.db, self.job_id, self.attempt = db, job_id, attempt
        self.interval = interval
        self.shutdown = shutdown
        self.stop_training = threading.Event()
        self.done = threading.Event()
        self.cancelled = False
        self.lost = False
        self._progress: dict[str, Any] = {}
        self._lock = threading.Lock()

    # called by the training loop, on the training thread
    def progress(self, p: nfcore.Progress) -> None:
        with self._lock:
            self._progress = {"step": int(p.step),
                              "total": None if p.total is None else int(p.total),
                              "loss": _finite(p.loss), "val_loss": _finite(p.val_loss),
                              "elapsed": _finite(p.elapsed), "eta": _finite(p.eta)}

    def should_stop(self) -> bool:
        return self.stop_training.is_set()

    def beat(self) -> bool:
        """One heartbeat with the latest progress; False if this attempt lost the job."""
        with self._lock:
            values = dict(self._progress)
        if not self.db.transition(self.job_id, attempt=self.attempt, heartbeat_at=now(),
                                  **values):
            self.lost = True
            self.stop_training.set()
            return False
        self.check_cancel()
        return True

    def check_cancel(self) -> None:
        with self.db.session() as s:
            if s.scalar(select(JobRecord.cancel_requested).where(JobRecord.id == self.job_id)):
                self.cancelled = True
                self.stop_training.set()

    def run(self) -> None:
        # Beat every `interval`; look for a cancel request (one cheap SELECT) four times a second,
        # so DELETE /jobs/{id} stops the training within a fraction of a second.
        tick = min(self.interval, CANCEL_POLL_S)
        next_beat = time.monotonic() + self.interval
        while not self.done.wait(tick):
            if self.shutdown.is_set():
                self.stop_training.set()
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.interval
                    self.beat()
                else:
                    self.check_cancel()
            except Exception:  # a database hiccup: the next beat retries
                log.warning("Heartbeat of job %s failed", self.job_id, exc_info=True)
            if self.lost:
                return

    def finish(self) -> None:
        self.done.set()
        self.join(timeout=30)


class JobRunner:
    """Runs one job id in this worker process (the Huey task calls it)."""

    def __init__(self, settings: Settings, db: Database, store: ModelStore, queue: JobQueue, *,
                 shutdown: threading.Event | None = None, name: str | None = None):
        self.settings = settings
        self.db = db
        self.store = store
        self.queue = queue
        self.shutdown = shutdown or threading.Event()
        self.name = name or worker_name()

    def __call__(self, job_id: str) -> None:
        if self.shutdown.is_set():  # shutting down: leave the job to another worker
            self.queue.submit(job_id)
            return
        attempt = self.db.claim(job_id, self.name)
        if attempt is None:
            log.info("Job %s is not queued (taken, cancelled or finished); message dropped", job_id)
            return
        log.info("Job %s: attempt %d on %s", job_id, attempt, self.name)
        job = self.db.get_job(job_id)
        ckpt = checkpoint_path(self.settings, job_id)
        resumed = checkpoint_step(ckpt)
        if resumed is not None:
            self.db.transition(job_id, attempt=attempt, resumed_from=resumed)
        monitor = _Monitor(self.db, job_id, attempt, self.settings.heartbeat_interval_s,
                           self.shutdown)
        monitor.start()
        try:
            result = self._fit(job, monitor, ckpt)
        except TrainingCancelled:
            monitor.finish()
            self._stopped(job, attempt, monitor, ckpt)
            return
        except Exception as e:
            monitor.finish()
            log.exception("Job %s failed", job_id)
            if self._end(job_id, attempt, JobStatus.FAILED, error=f"{type(e).__name__}: {e}"):
                ckpt.unlink(missing_ok=True)
            return
        # The monitor keeps beating while the model is written (slow shared storage).
        try:
            if monitor.lost or not self.db.transition(job_id, attempt=attempt,
                                                      heartbeat_at=now()):
                log.warning("Job %s was taken from this worker; not publishing", job_id)
                return
            self._publish(job, attempt, result)
        except Exception as e:  # e.g. the model store is full or read-only
            log.exception("Job %s: publishing failed", job_id)
            self._end(job_id, attempt, JobStatus.FAILED,
                      error=f"Publishing the model failed: {type(e).__name__}: {e}")
        finally:
            monitor.finish()
        ckpt.unlink(missing_ok=True)

    def _fit(self, job: JobRecord, monitor: _Monitor, ckpt: Path) -> nfcore.FitResult:
        data = target = None
        if job.kind == "density":
            row = self.db.get_dataset(job.objective["dataset"])
            if row is None:
                raise LookupError(f"Dataset {job.objective['dataset']!r} no longer exists")
            data = load_dataset(self.settings.data_dir, row)
        else:
            target = targets.from_spec(job.objective["target"])
        contexts = None
        if job.objective.get("contexts"):  # an amortized fit: the dataset's rows are contexts
            row = self.db.get_dataset(job.objective["contexts"])
            if row is None:
                raise LookupError(f"Dataset {job.objective['contexts']!r} no longer exists")
            contexts = load_dataset(self.settings.data_dir, row)[0]
        return runner.fit(job.kind, job.spec, job.training, data=data, target=target,
                          contexts=contexts,
                          device=self.settings.resolved_device, callback=monitor.progress,
                          should_stop=monitor.should_stop, checkpoint=ckpt,
                          checkpoint_every_s=self.settings.checkpoint_every_s)

    def _end(self, job_id: str, attempt: int, to: JobStatus, **values: Any) -> bool:
        return self.db.transition(job_id, to, attempt=attempt, heartbeat_at=now(), **values)

    def _stopped(self, job: JobRecord, attempt: int, monitor: _Monitor, ckpt: Path) -> None:
        if monitor.lost:
            log.warning("Job %s was taken from this worker; stopped", job.id)
        elif monitor.cancelled:
            if self._end(job.id, attempt, JobStatus.CANCELLED):
                ckpt.unlink(missing_ok=True)
            log.info("Job %s cancelled", job.id)
        elif self.db.transition(job.id, JobStatus.QUEUED, attempt=attempt, worker=None,
                                heartbeat_at=None):
            # The worker is shutting down: hand the job back, resumable from its checkpoint.
            try:
                self.queue.submit(job.id)
            except Exception:  # the reaper's sweep re-sends it
                log.warning("Could not re-queue job %s; the reaper will", job.id)
            log.info("Job %s handed back to the queue (worker shutting down)", job.id)

    def _publish(self, job: JobRecord, attempt: int, result: nfcore.FitResult) -> None:
        summary = _json_safe(dict(result.summary))
        objective = {k: v for k, v in job.objective.items() if k != "inline"}
        version = runner.publish(self.store, job.name, result, job_id=job.id,
                                 objective=objective)
        last = result.history[-1] if result.history else {}
        self._end(job.id, attempt, JobStatus.SUCCEEDED, result_name=job.name,
                  result_version=version, summary=summary,
                  step=summary.get("steps", last.get("step")), loss=_finite(last.get("loss")),
                  val_loss=_finite(summary.get("val_loss")), eta=0.0,
                  elapsed=_finite(summary.get("duration_s")))
        log.info("Job %s succeeded: %s version %d", job.id, job.name, version)


# ---------------------------------------------------------------------- the process
class _Liveness(threading.Thread):
    """Beats this worker's row in the ``workers`` table, busy or idle, until ``stop``."""

    def __init__(self, db: Database, name: str, settings: Settings, stop: threading.Event):
        super().__init__(name="liveness", daemon=True)
        self.db, self.name, self.settings, self.stop = db, name, settings, stop

    def beat(self) -> None:
        try:
            self.db.beat_worker(self.name, threads=self.settings.worker_threads,
                                device=str(self.settings.resolved_device))
        except Exception:  # a database hiccup: the next beat retries
            log.warning("Liveness beat of worker %s failed", self.name, exc_info=True)

    def run(self) -> None:
        self.beat()
        while not self.stop.wait(self.settings.heartbeat_interval_s):
            self.beat()


class _ParentWatch(threading.Thread):
    """Stops this worker gracefully when the process that started it is gone."""

    def __init__(self, parent_pid: int, stop: threading.Event):
        super().__init__(name="parent-watch", daemon=True)
        self.parent_pid, self.stop = parent_pid, stop

    def run(self) -> None:
        while not self.stop.wait(0.5):
            if os.getppid() != self.parent_pid:
                log.warning("Parent process %d is gone; stopping", self.parent_pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return


class _Consumer(Consumer):
    """Huey's consumer, where every stop is graceful and first tells running jobs to hand back."""

    shutdown: threading.Event

    def stop(self, graceful: bool = False) -> None:
        self.shutdown.set()
        super().stop(graceful=True)


def run_worker(settings: Settings, *, parent_pid: int | None = None) -> None:
    """Run a worker until SIGTERM/SIGINT: consume jobs, beat heartbeats, reap dead workers' jobs."""
    load_plugins(settings)
    db = Database.from_settings(settings)
    db.create_all()
    store = ModelStore(settings.models_dir)
    store.open()
    queue = JobQueue(settings)
    shutdown = threading.Event()
    name = worker_name()
    queue.handler = JobRunner(settings, db, store, queue, shutdown=shutdown, name=name)
    consumer = _Consumer(queue.huey, workers=settings.worker_threads, worker_type="thread",
                         periodic=False, initial_delay=0.05, backoff=1.5, max_delay=0.5,
                         check_worker_health=True, graceful_signal="TERM")
    consumer.shutdown = shutdown
    try:
        reap(db, queue, settings, orphans=False)
        resend_orphans(db, queue, settings, older_than=0.0)
    except Exception:
        log.warning("Start-up sweep failed; the reaper retries", exc_info=True)
    liveness = _Liveness(db, name, settings, shutdown)
    liveness.start()
    Reaper(db, queue, settings, shutdown).start()
    if parent_pid is not None:
        _ParentWatch(parent_pid, shutdown).start()
    log.info("Worker %s: %d thread(s), queue %s, database %s, device %s", name,
             settings.worker_threads, "redis" if queue.is_redis else "sqlite",
             db.url.render_as_string(hide_password=True), settings.resolved_device)
    try:
        consumer.run()
    finally:
        shutdown.set()
        liveness.join(timeout=5)
        try:
            db.drop_worker(name)
        except Exception:
            log.warning("Could not remove worker %s from the workers table", name)
        queue.close()
        db.dispose()


def check_worker(settings: Settings) -> list[str]:
    """What would stop a worker from working (``nfserve worker --check``, the container health
    check): the job store, the queue and the model store must be reachable. [] when healthy."""
    problems = []
    try:
        db = Database.from_settings(settings)
        db.ping()
        db.dispose()
    except Exception as e:
        problems.append(f"job store unreachable: {type(e).__name__}: {e}")
    try:
        queue = JobQueue(settings)
        queue.ping()
        queue.close()
    except Exception as e:
        problems.append(f"queue unreachable: {type(e).__name__}: {e}")
    models = Path(settings.models_dir)
    if not (models.is_dir() and os.access(models, os.W_OK)):
        problems.append(f"model store {models} is not a writable directory")
    return problems


def main(argv: list[str] | None = None) -> None:
    """``python -m service.training.worker [--parent-pid PID]``: the embedded worker of
    ``nfserve serve`` (``nfserve worker`` is the public command)."""
    parser = argparse.ArgumentParser(prog="nfserve worker")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s "
                        "[worker %(process)d] %(message)s")
    run_worker(Settings(), parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
