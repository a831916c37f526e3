"""The training path, request → record + queue → worker → artifact: the request checks and budget
rules, the job records, datasets, the queue, the one training path (runner), the worker, its
reaper and the embedded worker's supervisor."""

from .jobs import cancel_job, list_jobs, read_dataset, read_job, submit_job
from .queue import JobQueue
from .records import Database, DatasetRecord, JobRecord, WorkerRecord

__all__ = ["submit_job", "cancel_job", "list_jobs", "read_job", "read_dataset", "JobQueue",
           "Database", "JobRecord", "DatasetRecord", "WorkerRecord"]
