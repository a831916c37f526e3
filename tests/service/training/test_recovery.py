"""Crash recovery with real processes and real kills (embedded SQLite mode, no external services).

- A worker killed with SIGKILL mid-job: its heartbeat goes stale, the job is re-queued and resumes
  from its last checkpoint on another worker, and succeeds.
- After ``NFSERVE_MAX_RETRIES`` re-queues the job is failed with the reason; nothing stays running.
- Killing and restarting the API loses neither the running job nor the queued one.
- Restarting ``nfserve serve`` (embedded worker) hands the running job back and resumes it.
"""

from __future__ import annotations

import numpy as np
import pytest

from nfcore.train.checkpoint import checkpoint_step
from service.client import Client

from ..jobsupport import (
    TINY_FLOW,
    Deployment,
    deployment,
    job_row,
    published,
    two_moons,
    wait_for,
    wait_job,
)

__all__ = ["deployment"]

pytestmark = pytest.mark.slow

LONG = {"steps": 1500, "batch_size": 64}


def submit_long(client: Client, name: str = "moons", **training: object) -> str:
    dataset = client.upload_dataset(two_moons(1000))
    job = client.train(name, TINY_FLOW, {"kind": "density", "dataset": dataset["id"]},
                       {**LONG, **training})
    return job["job_id"]


def wait_checkpointed(d: Deployment, client: Client, job_id: str, *, attempt: int = 1) -> int:
    """Wait until attempt ``attempt`` of the job runs and has a checkpoint past step 0."""
    path = d.data_dir / "checkpoints" / f"{job_id}.safetensors"

    def checkpointed() -> int | None:
        job = client.job(job_id)
        assert job["status"] in ("queued", "running"), (job, d.logs())
        if job["status"] == "running" and job["attempts"] == attempt:
            step = checkpoint_step(path)
            if step and step > (job["resumed_from"] or 0):
                return step
        return None

    return wait_for(checkpointed, timeout=120, interval=0.05, what="a checkpoint")


def test_killed_worker_job_resumes_from_its_checkpoint_on_another_worker(
        deployment: Deployment) -> None:
    api = deployment.start_api(embedded_worker=False)
    first = deployment.start_worker()
    with Client(api.url) as client:
        job_id = submit_long(client)
        step = wait_checkpointed(deployment, client, job_id)
        first.kill9()
        assert client.job(job_id)["status"] == "running"  # until the heartbeat goes stale

        deployment.start_worker()
        job = wait_job(client, job_id, deployment)
        assert job["status"] == "succeeded", job
        assert job["retries"] == 1 and job["attempts"] == 2
        assert job["resumed_from"] >= step > 0  # resumed, not restarted
        assert job["progress"]["step"] > step
        assert published(job) == {"model": "moons", "version": 1}
        assert np.isfinite(client.log_prob("moons", [[0.5, 0.25]])).all()
    assert not (deployment.data_dir / "checkpoints" / f"{job_id}.safetensors").exists()


def test_job_fails_with_the_reason_after_the_retry_limit(deployment: Deployment) -> None:
    deployment.env["NFSERVE_MAX_RETRIES"] = "1"
    api = deployment.start_api(embedded_worker=False)
    with Client(api.url) as client:
        job_id = submit_long(client, steps=200_000)
        for attempt in (1, 2):  # the first kill is retried, the second is one too many
            worker = deployment.start_worker()
            wait_checkpointed(deployment, client, job_id, attempt=attempt)
            worker.kill9()
        # No worker is left: the API's own reaper must still end the job.
        job = wait_job(client, job_id, deployment)
    assert job["status"] == "failed", job
    assert job["attempts"] == 2 and job["retries"] == 1
    assert "stopped sending heartbeats" in job["error"]
    assert "NFSERVE_MAX_RETRIES=1" in job["error"]
    assert job["result"] is None
    assert not (deployment.data_dir / "checkpoints" / f"{job_id}.safetensors").exists()
    assert job_row(deployment, job_id).status == "failed"


def test_api_killed_and_restarted_while_a_job_runs_loses_nothing(deployment: Deployment) -> None:
    api = deployment.start_api(embedded_worker=False)
    deployment.start_worker()
    with Client(api.url) as client:
        running = submit_long(client, "first")
        queued = submit_long(client, "second", steps=300)  # waits behind the first (one thread)
        wait_checkpointed(deployment, client, running)
    api.kill9()
    port = int(api.url.rsplit(":", 1)[1])
    api = deployment.start_api(embedded_worker=False, port=port)
    with Client(api.url) as client:
        for job_id, name in ((running, "first"), (queued, "second")):
            job = wait_job(client, job_id, deployment)
            assert job["status"] == "succeeded", job
            assert job["attempts"] == 1 and job["retries"] == 0  # never interrupted
            assert published(job) == {"model": name, "version": 1}
            assert np.isfinite(client.log_prob(name, [[0.0, 0.0]])).all()


def test_restarting_serve_hands_the_running_job_back_and_resumes_it(
        deployment: Deployment) -> None:
    api = deployment.start_api(embedded_worker=True)
    port = int(api.url.rsplit(":", 1)[1])
    with Client(api.url) as client:
        job_id = submit_long(client)
        step = wait_checkpointed(deployment, client, job_id)
    api.stop()  # SIGTERM: serve waits for its worker to hand the job back, then exits
    assert api.process.returncode != -9
    assert job_row(deployment, job_id).status == "queued"
    api = deployment.start_api(embedded_worker=True, port=port)
    with Client(api.url) as client:
        job = wait_job(client, job_id, deployment)
    assert job["status"] == "succeeded", job
    assert job["retries"] == 0 and job["attempts"] == 2  # a hand-back is not a failure
    assert job["resumed_from"] >= step > 0
