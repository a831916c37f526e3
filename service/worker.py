"""The worker process (``nfserve worker``): a Huey consumer with thread workers, and a reaper.

- **Threads, not fork.** Huey's consumer runs ``worker_threads`` thread workers in this process, so
  CUDA stays usable (a forked child cannot reuse its parent's CUDA context). Run one worker process
  per GPU (``NFSERVE_DEVICE=cuda:N``).
- **Reaper.** Every worker also sweeps the job table every few seconds. A ``running`` job whose
  heartbeat is older than ``heartbeat_timeout_s`` lost its worker (killed, host gone): it is
  re-queued, to resume from its last checkpoint, up to ``max_retries`` times, and then marked
  ``failed`` with the reason. Every transition is a conditional ``UPDATE`` fenced by the attempt
  number, so any number of reapers on any number of hosts agree. Jobs left ``queued`` with no
  message in the queue (the API died between recording and sending, or the queue was flushed) are
  sent again; a duplicate message is harmless because running starts with an atomic claim.
- **Graceful stop.** SIGTERM or SIGINT hands the running jobs back to the queue (they resume from
  their checkpoints elsewhere) and exits. An embedded worker started by ``nfserve serve`` does the
  same when its parent process goes away.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from huey.consumer import Consumer
from sqlalchemy import select, update

from .db import Database, Job, now
from .queue import JobQueue
from .store import ModelStore
from .tasks import JobRunner, checkpoint_path, worker_name

__all__ = ["reap", "resend_orphans", "Reaper", "load_plugins", "run_worker", "check_worker", "start_embedded_worker",
           "stop_embedded_worker", "settings_env", "main"]

log = logging.getLogger("nfserve.worker")


def reap(db: Database, queue: JobQueue, settings: Any, *, orphans: bool = True) -> dict[str, int]:
    """One sweep: re-queue or fail the running jobs whose heartbeat is stale, and re-send the
    queued jobs that have no message. Returns counts by outcome."""
    t = now()
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    with db.session() as s:
        stale = s.execute(
            select(Job.id, Job.attempts, Job.retries, Job.cancel_requested, Job.worker,
                   Job.heartbeat_at)
            .where(Job.status == "running", Job.heartbeat_at < t - settings.heartbeat_timeout_s)
        ).all()
    for job_id, attempt, retries, cancel, worker, beat in stale:
        age = t - (beat or t)
        fence = (Job.id == job_id, Job.status == "running", Job.attempts == attempt)
        if cancel:
            values = {"status": "cancelled", "finished_at": t}
            outcome = "cancelled"
        elif retries >= settings.max_retries:
            values = {"status": "failed", "finished_at": t,
                      "error": f"Worker {worker} stopped sending heartbeats ({age:.0f} s without "
                               f"one, over NFSERVE_HEARTBEAT_TIMEOUT_S="
                               f"{settings.heartbeat_timeout_s:g}) on attempt {attempt}; the job "
                               f"was already re-queued {retries} times "
                               f"(NFSERVE_MAX_RETRIES={settings.max_retries}), so it is failed"}
            outcome = "failed"
        else:
            values = {"status": "queued", "retries": Job.retries + 1, "worker": None,
                      "heartbeat_at": None}
            outcome = "requeued"
        with db.session() as s:
            changed = s.execute(update(Job).where(*fence).values(updated_at=t, **values)
                                .execution_options(synchronize_session=False)).rowcount
        if not changed:
            continue  # another reaper got there first, or the worker came back
        counts[outcome] += 1
        if outcome == "requeued":
            log.warning("Job %s: worker %s silent for %.0f s; re-queued (retry %d of %d)",
                        job_id, worker, age, retries + 1, settings.max_retries)
            try:
                queue.submit(job_id)
            except Exception:
                log.warning("Could not send job %s to the queue; the next sweep will", job_id)
        else:
            log.warning("Job %s: worker %s silent for %.0f s; %s", job_id, worker, age, outcome)
            checkpoint_path(settings, job_id).unlink(missing_ok=True)
    if orphans:
        counts["resent"] = resend_orphans(db, queue, settings)
    return counts


def resend_orphans(db: Database, queue: JobQueue, settings: Any, *,
                   older_than: float | None = None) -> int:
    """Re-send queued jobs that have sat unclaimed past the heartbeat timeout while the queue is
    empty (their message was lost). Duplicates are harmless: running starts with a claim."""
    if queue.pending() > 0:
        return 0
    age = settings.heartbeat_timeout_s if older_than is None else older_than
    with db.session() as s:
        ids = list(s.scalars(select(Job.id).where(Job.status == "queued",
                                                  Job.updated_at < now() - age)))
    for job_id in ids:
        queue.submit(job_id)
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                      .values(updated_at=now()).execution_options(synchronize_session=False))
    if ids:
        log.warning("Re-sent %d queued jobs that had no message in the queue", len(ids))
    return len(ids)


class Reaper(threading.Thread):
    """Runs ``reap`` every few seconds until ``stop`` is set (in every worker, and in the API so
    that jobs are not left running when every worker is gone)."""

    def __init__(self, db: Database, queue: JobQueue, settings: Any, stop: threading.Event):
        super().__init__(name="reaper", daemon=True)
        self.db, self.queue, self.settings, self.stop = db, queue, settings, stop
        self.interval = max(0.5, min(5.0, settings.heartbeat_timeout_s / 3))

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                reap(self.db, self.queue, self.settings)
            except Exception:
                log.warning("Reaper sweep failed; retrying", exc_info=True)


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


def load_plugins(settings: Any) -> None:
    """Import the operator's plugin modules (``NFSERVE_PLUGINS``); they register targets."""
    for module in settings.plugins:
        importlib.import_module(module)


def run_worker(settings: Any, *, parent_pid: int | None = None) -> None:
    """Run a worker until SIGTERM/SIGINT: consume jobs, beat heartbeats, reap dead workers' jobs."""
    load_plugins(settings)
    db = Database.from_settings(settings)
    db.create_all()
    store = ModelStore(settings.models_dir)
    store.open()
    queue = JobQueue(settings)
    shutdown = threading.Event()
    queue.handler = JobRunner(settings, db, store, queue, shutdown=shutdown, name=worker_name())
    consumer = _Consumer(queue.huey, workers=settings.worker_threads, worker_type="thread",
                         periodic=False, initial_delay=0.05, backoff=1.5, max_delay=0.5,
                         check_worker_health=True, graceful_signal="TERM")
    consumer.shutdown = shutdown
    try:
        reap(db, queue, settings, orphans=False)
        resend_orphans(db, queue, settings, older_than=0.0)
    except Exception:
        log.warning("Start-up sweep failed; the reaper retries", exc_info=True)
    Reaper(db, queue, settings, shutdown).start()
    if parent_pid is not None:
        _ParentWatch(parent_pid, shutdown).start()
    log.info("Worker %s: %d thread(s), queue %s, database %s, device %s", worker_name(),
             settings.worker_threads, "redis" if queue.is_redis else "sqlite",
             db.url.render_as_string(hide_password=True), settings.resolved_device)
    try:
        consumer.run()
    finally:
        shutdown.set()
        queue.close()
        db.dispose()


def check_worker(settings: Any) -> list[str]:
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


# ---------------------------------------------------------------------- embedded mode
def settings_env(settings: Any) -> dict[str, str]:
    """The environment that gives a child process exactly these settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        key = f"NFSERVE_{name.upper()}"
        if value is None:
            env.pop(key, None)
        elif isinstance(value, list):
            env[key] = ",".join(str(v) for v in value)
        elif isinstance(value, Path):
            env[key] = str(value.resolve())
        else:
            env[key] = str(value)
    return env


def start_embedded_worker(settings: Any) -> subprocess.Popen:
    """Start one worker process that stops when this process goes away (``nfserve serve``)."""
    cmd = [sys.executable, "-m", "service.worker", "--parent-pid", str(os.getpid())]
    return subprocess.Popen(cmd, env=settings_env(settings))


def stop_embedded_worker(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM (running jobs are handed back), then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> None:
    """``python -m service.worker [--parent-pid PID]`` (``nfserve worker`` is the public name)."""
    import argparse

    from .settings import Settings

    parser = argparse.ArgumentParser(prog="nfserve worker")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s "
                        "[worker %(process)d] %(message)s")
    run_worker(Settings(), parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
