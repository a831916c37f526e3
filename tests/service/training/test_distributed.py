"""Distributed mode against real Redis (RedisHuey) and PostgreSQL (job store): two worker processes
share the jobs, each job runs exactly once even when its message is delivered twice, and the
end-to-end path survives a worker killed mid-job.

The session gets its own PostgreSQL database and Huey queue name (see ``jobsupport``).
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from service.client import Client
from service.settings import Settings
from service.training import Database, JobQueue, JobRecord

from ..jobsupport import (
    TINY_FLOW,
    Deployment,
    deployment,
    postgres_server,
    postgres_url,
    published,
    queue_name,
    redis_url,
    two_moons,
    wait_for,
    wait_job,
)

__all__ = ["deployment", "postgres_server", "postgres_url", "queue_name", "redis_url"]

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture
def cluster(deployment: Deployment, redis_url: str, queue_name: str,
            postgres_url: str) -> Deployment:
    deployment.env.update({"NFSERVE_QUEUE_URL": redis_url, "NFSERVE_QUEUE_NAME": queue_name,
                           "NFSERVE_DATABASE_URL": postgres_url})
    return deployment


def start_workers(d: Deployment, n: int) -> list:
    workers = [d.start_worker() for _ in range(n)]
    for w in workers:  # both consuming before any job is sent
        wait_for(lambda w=w: "queue redis" in w.output(), timeout=120, what="a worker to start")
    return workers


def test_two_workers_share_the_jobs_and_none_runs_twice(cluster: Deployment) -> None:
    api = cluster.start_api(embedded_worker=False)
    workers = start_workers(cluster, 2)
    with Client(api.url) as client:
        ready = {c["name"]: c["detail"] for c in client.ready()["checks"]}
        assert ready["queue"].startswith("redis") and "postgresql" in ready["job_store"]
        dataset = client.upload_dataset(two_moons(400))
        objective = {"kind": "density", "dataset": dataset["id"]}
        ids = [client.train("shared", TINY_FLOW, objective,
                            {"steps": 250, "batch_size": 64, "seed": i})["job_id"]
               for i in range(6)]
        # Deliver every message a second time: the atomic claim must still run each job once.
        queue = JobQueue(Settings(queue_url=cluster.env["NFSERVE_QUEUE_URL"],
                                  queue_name=cluster.env["NFSERVE_QUEUE_NAME"],
                                  data_dir=cluster.data_dir, _env_file=None))
        for job_id in ids:
            queue.submit(job_id)
        queue.close()
        jobs = [wait_job(client, job_id, cluster) for job_id in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 6, jobs
        assert sorted(j["result"]["version"] for j in jobs) == [1, 2, 3, 4, 5, 6]
        model = client.model("shared")
        assert model["latest"] == 6
        assert sorted(v["metadata"]["job_id"] for v in model["versions"]) == sorted(ids)
        assert np.isfinite(client.log_prob("shared", [[0.0, 0.0]], version=3)).all()

    db = Database(cluster.env["NFSERVE_DATABASE_URL"])
    with db.session() as s:
        rows = list(s.scalars(select(JobRecord).where(JobRecord.id.in_(ids))))
    db.dispose()
    assert all(r.attempts == 1 and r.retries == 0 for r in rows)  # never run twice
    pids = {str(w.pid) for w in workers}
    used = {r.worker.rsplit(":", 1)[1] for r in rows}
    assert used == pids, (used, pids)  # both workers took jobs
    for pid in used:  # one thread per worker: its jobs never overlap in time
        spans = sorted((r.started_at, r.finished_at) for r in rows if r.worker.endswith(pid))
        assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1)), spans


def test_end_to_end_distributed_survives_a_killed_worker(cluster: Deployment) -> None:
    """Upload, train, poll, score, sample over HTTP with Redis and PostgreSQL; the worker that
    runs the job is killed with SIGKILL and the other one resumes it."""
    api = cluster.start_api(embedded_worker=False)
    workers = {str(w.pid): w for w in start_workers(cluster, 2)}
    with Client(api.url) as client:
        dataset = client.upload_dataset(
            ("a,b\n" + "\n".join(f"{a},{b}" for a, b in two_moons(800))).encode(),
            filename="moons.csv")
        objective = {"kind": "density", "dataset": dataset["id"]}
        job_id = client.train("dist", TINY_FLOW, objective,
                              {"steps": 1500, "batch_size": 64})["job_id"]
        path = cluster.data_dir / "checkpoints" / f"{job_id}.safetensors"
        job = wait_for(lambda: (j := client.job(job_id))["status"] == "running" and path.exists()
                       and j, what="the job to run and checkpoint")
        db = Database(cluster.env["NFSERVE_DATABASE_URL"])
        with db.session() as s:
            pid = s.scalar(select(JobRecord.worker).where(JobRecord.id == job_id)).rsplit(":", 1)[1]
        db.dispose()
        assert job["attempts"] == 1
        workers[pid].kill9()

        job = wait_job(client, job_id, cluster)
        assert job["status"] == "succeeded", job
        assert job["retries"] == 1 and job["resumed_from"] > 0
        assert published(job) == {"model": "dist", "version": 1}
        lp = client.log_prob("dist", two_moons(4, seed=2))
        assert lp.shape == (4,) and np.isfinite(lp).all()
        samples, log_q = client.sample("dist", 20, seed=0)
        assert samples.shape == (20, 2) and np.isfinite(log_q).all()

        again = client.train("dist", TINY_FLOW, objective, {"steps": 100, "seed": 5})
        assert wait_job(client, again["job_id"], cluster)["result"]["version"] == 2
        r = client.http.post("/log_prob", json={"model": "dist", "x": [[0.0, 0.0]]})
        assert r.status_code == 200 and r.json()["version"] == 2  # served at once, no restart
