"""``nfserve serve`` keeps its embedded worker alive: a real ``kill -9`` of the worker mid-job, and
the job still succeeds, resumed from its checkpoint by the restarted worker, and its model is
served."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from service.client import Client

from ..jobsupport import Deployment, deployment, job_row, published, wait_for, wait_job
from .test_recovery import submit_long, wait_checkpointed

__all__ = ["deployment"]

pytestmark = pytest.mark.slow


def test_serve_restarts_a_killed_worker_and_the_job_resumes(deployment: Deployment) -> None:
    # A long heartbeat timeout: the job must come back because serve saw its worker die, not
    # because a reaper waited the timeout out.
    deployment.env["NFSERVE_HEARTBEAT_TIMEOUT_S"] = "600"
    api = deployment.start_api(embedded_worker=True)
    with Client(api.url) as client:
        job_id = submit_long(client)
        step = wait_checkpointed(deployment, client, job_id)
        worker = job_row(deployment, job_id).worker
        pid = int(worker.rsplit(":", 1)[1])
        assert pid != api.pid  # the embedded worker, a process of its own
        os.kill(pid, signal.SIGKILL)

        job = wait_job(client, job_id, deployment, timeout=240)
        assert job["status"] == "succeeded", (job, deployment.logs())
        assert job["retries"] == 1 and job["attempts"] == 2
        assert job["resumed_from"] >= step > 0  # resumed, not restarted
        assert job_row(deployment, job_id).worker != worker  # by a new worker process
        assert published(job) == {"model": "moons", "version": 1}
        assert client.model("moons")["latest"] == 1
        assert np.isfinite(client.log_prob("moons", [[0.5, 0.25]])).all()
        ready = wait_for(lambda: (r := client.ready())["status"] == "ok" and r,
                         what="readiness with the new worker")
    workers = next(c for c in ready["checks"] if c["name"] == "workers")
    assert workers["ok"] and "1 live workers" in workers["detail"]
    assert "exited with status -9" in api.output()  # serve said what happened
