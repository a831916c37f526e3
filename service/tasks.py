"""The training task: what a worker does with a job id it takes off the queue.

1. **Claim** the job with one atomic ``UPDATE … WHERE status = 'queued'``; if that changes no row,
   another worker has it (or it was cancelled or finished) and the message is dropped.
2. **Train** with ``nfcore.fit_density`` or ``nfcore.fit_target``. A monitor thread beats the
   job's heartbeat every ``heartbeat_interval_s``, writes the latest progress with it (so progress
   is never more than about a second old), and reads the cancel flag. Every write is fenced by the
   attempt number: a worker presumed dead whose job was re-queued can no longer touch the row, and
   stops at its next step.
3. **Checkpoint** to ``data_dir/checkpoints/<job_id>.safetensors``; a re-queued job resumes there.
4. **Publish** the trained flow through the model store (a new version, written atomically), then
   record it in the ``models`` table and mark the job succeeded in one transaction.

A cancelled job publishes nothing and its checkpoint is deleted. When the worker itself is asked to
shut down (SIGTERM, or the ``serve`` process that started it went away), the job is handed back:
re-queued at once, to resume from its checkpoint on the next worker, without counting as a retry.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

import nfcore
from nfcore.errors import TrainingCancelled

from .datasets import load_dataset
from .db import Database, Job, ModelRecord, now
from .jobs import build_target
from .queue import JobQueue
from .store import ModelStore

__all__ = ["JobRunner", "checkpoint_path", "record_model", "worker_name"]

log = logging.getLogger("nfserve.worker")

CANCEL_POLL_S = 0.25


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def checkpoint_path(settings: Any, job_id: str) -> Path:
    return Path(settings.data_dir) / "checkpoints" / f"{job_id}.safetensors"


def _checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint file holds (header only), or None if there is none."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, 64 * 2**20)))
        return int(json.loads(header["__metadata__"]["nfcore.checkpoint"])["state"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def record_model(db: Database, *, name: str, version: int, path: Path | str,
                 content_hash: str | None, summary: dict | None, job_id: str | None = None
                 ) -> None:
    """Record a published version in the ``models`` table. The store's files are the truth: a
    row left over for the same name and version (the directory was removed and the number
    reused) is replaced."""
    with db.session() as s:
        row = s.scalar(select(ModelRecord).where(ModelRecord.name == name,
                                                 ModelRecord.version == version))
        if row is None:
            row = ModelRecord(name=name, version=version)
            s.add(row)
        row.job_id, row.path, row.content_hash = job_id, str(path), content_hash
        row.summary, row.created_at = summary, now()


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
    def progress(self, p: Any) -> None:
        with self._lock:
            self._progress = {"step": int(p.step), "total": int(p.total), "loss": _finite(p.loss),
                              "val_loss": _finite(p.val_loss), "elapsed": _finite(p.elapsed),
                              "eta": _finite(p.eta)}

    def should_stop(self) -> bool:
        return self.stop_training.is_set()

    def beat(self) -> bool:
        """One heartbeat with the latest progress; False if this attempt lost the job."""
        with self._lock:
            values = dict(self._progress)
        ok = self.db.fenced_update(self.job_id, self.attempt, heartbeat_at=now(), **values)
        if not ok:
            self.lost = True
            self.stop_training.set()
            return False
        self.check_cancel()
        return True

    def check_cancel(self) -> None:
        with self.db.session() as s:
            if s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)):
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

    def __init__(self, settings: Any, db: Database, store: ModelStore, queue: JobQueue, *,
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
        resumed = _checkpoint_step(ckpt)
        if resumed is not None:
            self.db.fenced_update(job_id, attempt, resumed_from=resumed)
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
            if self._finish(job_id, attempt, status="failed", error=f"{type(e).__name__}: {e}"):
                ckpt.unlink(missing_ok=True)
            return
        # The monitor keeps beating while the model is written (slow shared storage).
        try:
            if monitor.lost or not self.db.fenced_update(job_id, attempt, heartbeat_at=now()):
                log.warning("Job %s was taken from this worker; not publishing", job_id)
                return
            self._publish(job, attempt, result, monitor)
        except Exception as e:  # e.g. the model store is full or read-only
            log.exception("Job %s: publishing failed", job_id)
            self._finish(job_id, attempt, status="failed",
                         error=f"Publishing the model failed: {type(e).__name__}: {e}")
        finally:
            monitor.finish()
        ckpt.unlink(missing_ok=True)

    # ------------------------------------------------------------------ training
    def _fit(self, job: Job, monitor: _Monitor, ckpt: Path) -> Any:
        import torch

        device = self.settings.resolved_device
        flow = nfcore.build(job.spec).to(device)
        t = job.training
        common = {"batch_size": t["batch_size"], "lr": t["lr"], "seed": t["seed"],
                  "max_seconds": t.get("max_seconds"), "callback": monitor.progress,
                  "should_stop": monitor.should_stop, "checkpoint_path": str(ckpt),
                  "checkpoint_every_s": self.settings.checkpoint_every_s, "resume": True}
        if job.kind == "density":
            row = self.db.get_dataset(job.objective["dataset"])
            if row is None:
                raise LookupError(f"Dataset {job.objective['dataset']!r} no longer exists")
            x, context = load_dataset(self.settings.data_dir, row)
            budget = ({"epochs": t["epochs"]} if t.get("epochs") is not None
                      else {"steps": t["total"]})
            return nfcore.fit_density(flow, x, context=context,
                                      validation_fraction=t.get("validation_fraction", 0.1),
                                      **budget, **common)
        target = build_target(job.objective["target"])
        options = {"steps": t["total"], **common}
        if t.get("anneal_steps") is not None:
            options["anneal_steps"] = t["anneal_steps"]
        with torch.enable_grad():
            return nfcore.fit_target(flow, target, **options)

    # ------------------------------------------------------------------ endings
    def _finish(self, job_id: str, attempt: int, **values: Any) -> bool:
        t = now()
        return self.db.fenced_update(job_id, attempt, finished_at=t, heartbeat_at=t, **values)

    def _stopped(self, job: Job, attempt: int, monitor: _Monitor, ckpt: Path) -> None:
        if monitor.lost:
            log.warning("Job %s was taken from this worker; stopped", job.id)
        elif monitor.cancelled:
            if self._finish(job.id, attempt, status="cancelled"):
                ckpt.unlink(missing_ok=True)
            log.info("Job %s cancelled", job.id)
        else:  # the worker is shutting down: hand the job back, resumable from its checkpoint
            if self.db.fenced_update(job.id, attempt, status="queued", worker=None,
                                     heartbeat_at=None):
                try:
                    self.queue.submit(job.id)
                except Exception:  # the reaper's sweep re-sends it
                    log.warning("Could not re-queue job %s; the reaper will", job.id)
                log.info("Job %s handed back to the queue (worker shutting down)", job.id)

    def _publish(self, job: Job, attempt: int, result: Any, monitor: _Monitor) -> None:
        summary = dict(result.summary)
        meta = {"job_id": job.id, "training": summary,
                "objective": {k: v for k, v in job.objective.items() if k != "inline"}}
        version = self.store.publish(job.name, result.flow.cpu(), meta)
        path = self.store.path(job.name, version)
        content_hash = nfcore.read_metadata(path).get("nfcore.content_hash")
        history = result.history[-1] if result.history else {}
        t = now()
        try:
            record_model(self.db, name=job.name, version=version, job_id=job.id, path=path,
                         content_hash=content_hash, summary=summary)
        except Exception:  # the file is published and servable; the catalogue row is a copy
            log.exception("Job %s: could not record %s version %d", job.id, job.name, version)
        with self.db.session() as s:
            s.execute(
                update(Job)
                .where(Job.id == job.id, Job.attempts == attempt, Job.status == "running")
                .values(status="succeeded", result_name=job.name, result_version=version,
                        finished_at=t, updated_at=t, heartbeat_at=t,
                        step=summary.get("steps", monitor._progress.get("step")),
                        loss=_finite(history.get("loss")),
                        val_loss=_finite(summary.get("val_loss")), eta=0.0,
                        elapsed=_finite(summary.get("duration_s")))
                .execution_options(synchronize_session=False))
        log.info("Job %s succeeded: %s version %d", job.id, job.name, version)
