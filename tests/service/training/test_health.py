"""Readiness of the training side, in both modes (SQLite and SqliteHuey; PostgreSQL and Redis):
not ready while jobs wait and no worker has a recent liveness beat; ready again once one beats.
And the job gauges of /metrics."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.api import create_app
from service.settings import Settings
from service.training import WorkerRecord
from service.training.records import now

from ..jobsupport import TINY_FLOW, postgres_server, postgres_url, queue_name, redis_url, two_moons

__all__ = ["postgres_server", "postgres_url", "queue_name", "redis_url"]


@pytest.fixture(params=["embedded", pytest.param("distributed", marks=pytest.mark.distributed)])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    extra = {}
    if request.param == "distributed":
        extra = {"database_url": request.getfixturevalue("postgres_url"),
                 "queue_url": request.getfixturevalue("redis_url"),
                 "queue_name": request.getfixturevalue("queue_name") + "_health"}
    settings = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data",
                        embedded_worker=False, heartbeat_timeout_s=5, _env_file=None, **extra)
    with TestClient(create_app(settings)) as client:
        client.app.state.reaper_stop.set()  # this test alone moves the jobs
        client.app.state.queue.huey.flush()
        yield client
        client.app.state.queue.huey.flush()


def workers_check(api: TestClient) -> tuple[int, dict]:
    r = api.get("/health/ready")
    return r.status_code, next(c for c in r.json()["checks"] if c["name"] == "workers")


def test_not_ready_while_jobs_wait_and_no_worker_is_live(api: TestClient) -> None:
    db = api.app.state.db
    with db.session() as s:  # rows of other tests sharing the database
        s.query(WorkerRecord).delete()
    status, check = workers_check(api)
    assert status == 200 and check["ok"]  # nothing waits: no worker is needed

    buf = io.BytesIO()
    np.save(buf, two_moons(50))
    dataset = api.post("/datasets", content=buf.getvalue()).json()["id"]
    r = api.post("/train", json={"name": "m", "flow": TINY_FLOW, "training": {"steps": 5},
                                 "objective": {"kind": "density", "dataset": dataset}})
    assert r.status_code == 202
    status, check = workers_check(api)
    assert status == 503 and not check["ok"]
    assert "no worker has beaten within 5 s" in check["detail"] and "jobs waiting" in check["detail"]

    db.beat_worker("host-a:1", threads=1, device="cpu")
    status, check = workers_check(api)
    assert status == 200 and check["ok"] and "host-a:1" in check["detail"]
    assert "nfserve_workers_live 1.0" in api.get("/metrics").text

    with db.session() as s:  # its beats stop: it died
        s.execute(update(WorkerRecord).values(heartbeat_at=now() - 60))
    status, check = workers_check(api)
    assert status == 503 and not check["ok"]
    api.delete(r.json()["status_url"])
