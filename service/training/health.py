"""Readiness checks and Prometheus gauges of the training side: the job store, the queue, and
whether a live worker is there to take the jobs that wait.

A readiness check is a callable that returns ``(name, ok, detail)``; ``/health/ready`` runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from ..settings import Settings
from ..wire import JobStatus
from .queue import JobQueue
from .records import Database

__all__ = ["Check", "readiness_checks", "JobsCollector"]

Check = Callable[[], tuple[str, bool, str]]


def readiness_checks(db: Database, queue: JobQueue, settings: Settings) -> list[Check]:
    """The job store answers, the queue answers, and jobs that wait have a live worker."""

    def job_store() -> tuple[str, bool, str]:
        try:
            db.ping()
        except Exception as e:
            return "job_store", False, f"database unreachable: {type(e).__name__}: {e}"
        return "job_store", True, db.url.render_as_string(hide_password=True)

    def job_queue() -> tuple[str, bool, str]:
        try:
            pending = queue.pending()
        except Exception as e:
            return "queue", False, f"queue unreachable: {type(e).__name__}: {e}"
        return "queue", True, f"{'redis' if queue.is_redis else 'sqlite'}, {pending} messages waiting"

    def workers() -> tuple[str, bool, str]:
        timeout = settings.heartbeat_timeout_s
        live = db.live_workers(timeout)
        waiting = db.count_jobs().get(JobStatus.QUEUED, 0)
        detail = (f"{len(live)} live workers ({', '.join(w.name for w in live[:5])}"
                  f"{', …' if len(live) > 5 else ''}), {waiting} jobs waiting" if live
                  else f"no worker has beaten within {timeout:g} s "
                       f"(NFSERVE_HEARTBEAT_TIMEOUT_S), {waiting} jobs waiting")
        return "workers", bool(live) or not waiting, detail

    return [job_store, job_queue, workers]


class JobsCollector:
    """Prometheus gauges read at scrape time: jobs by status, live workers, queue messages."""

    def __init__(self, db: Database, queue: JobQueue, settings: Settings):
        self.db, self.queue, self.settings = db, queue, settings

    def describe(self) -> list[Metric]:
        return []  # collected lazily, so registering does not query the database

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.db.count_jobs()
            live = len(self.db.live_workers(self.settings.heartbeat_timeout_s))
        except Exception:  # a scrape must not fail because the database blinked
            counts = None
        if counts is not None:
            jobs = GaugeMetricFamily("nfserve_jobs", "Training jobs by status.",
                                     labels=["status"])
            for status in JobStatus:
                jobs.add_metric([status], counts.get(status, 0))
            yield jobs
            yield GaugeMetricFamily("nfserve_workers_live",
                                    "Worker processes with a recent liveness beat.", value=live)
        try:
            pending = self.queue.pending()
        except Exception:
            return
        yield GaugeMetricFamily("nfserve_job_queue_messages", "Messages waiting in the job queue.",
                                value=pending)
