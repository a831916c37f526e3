"""The embedded worker of ``nfserve serve``: one worker process beside the API, kept alive.

When the worker dies (``kill -9``, out of memory, a crash), the supervisor re-queues the jobs it
was running at once, rather than after the heartbeat timeout, and starts a new worker after a
back-off that doubles with each quick death (from 0.5 s up to 30 s, back to 0.5 s once a worker
has lived a minute). The new worker resumes the jobs from their checkpoints. The worker stops by
itself when the ``serve`` process goes away, and ``stop`` hands its running job back first.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..settings import Settings
from .queue import JobQueue
from .reaper import reap
from .records import Database
from .worker import worker_name

__all__ = ["EmbeddedWorker", "settings_env"]

log = logging.getLogger("nfserve.supervisor")


def settings_env(settings: Settings) -> dict[str, str]:
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


class EmbeddedWorker:
    """Starts one worker process and restarts it, with a back-off, whenever it dies.

    Arguments:
        settings: the settings the worker gets (through its environment).
        backoff: the first and the longest wait before a restart, in seconds.
        stable_s: a worker that lived this long resets the back-off.
    """

    def __init__(self, settings: Settings, *, backoff: tuple[float, float] = (0.5, 30.0),
                 stable_s: float = 60.0):
        self.settings = settings
        self.backoff = backoff
        self.stable_s = stable_s
        self.restarts = 0
        self.process: subprocess.Popen | None = None
        self._started = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor",
                                        daemon=True)

    def start(self) -> EmbeddedWorker:
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "service.training.worker", "--parent-pid", str(os.getpid())]
        with self._lock:
            if self._stop.is_set():
                return
            self.process = subprocess.Popen(cmd, env=settings_env(self.settings))
            self._started = time.monotonic()
        log.info("Embedded worker started (pid %d)", self.process.pid)

    def _release(self, pid: int) -> None:
        """Re-queue now the jobs the dead worker ``pid`` was running (it cannot hand them back),
        and remove it from the live workers."""
        dead = worker_name().rsplit(":", 1)[0] + f":{pid}"
        db, queue = Database.from_settings(self.settings), JobQueue(self.settings)
        try:
            db.drop_worker(dead)  # no longer counts as live
            counts = reap(db, queue, self.settings, orphans=False, dead_worker=dead)
            if any(counts.values()):
                log.warning("Jobs of the dead worker %s: %s", dead, counts)
        finally:
            queue.close()
            db.dispose()

    def _watch(self) -> None:
        delay = self.backoff[0]
        while not self._stop.wait(0.2):
            process = self.process
            if process is None or process.poll() is None:
                continue
            lived = time.monotonic() - self._started
            if lived >= self.stable_s:
                delay = self.backoff[0]
            log.warning("Embedded worker (pid %d) exited with status %s after %.0f s; restarting "
                        "in %.1f s", process.pid, process.returncode, lived, delay)
            try:
                self._release(process.pid)
            except Exception:  # the reapers still re-queue them after the heartbeat timeout
                log.warning("Could not re-queue the dead worker's jobs", exc_info=True)
            if self._stop.wait(delay):
                return
            self.restarts += 1
            self._spawn()
            delay = min(2 * delay, self.backoff[1])

    def stop(self, timeout: float = 60.0) -> None:
        """Stop supervising; SIGTERM the worker (its running job is handed back), then SIGKILL
        after ``timeout`` seconds."""
        with self._lock:
            self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
