"""Training jobs: submission checks, the job lifecycle, cancellation, progress, exactly-once
claims, and the end-to-end path over HTTP against a real ``nfserve serve`` (embedded mode)."""

from __future__ import annotations

import io
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import nfcore
from nfcore.train import DEFAULT_STEPS
from service.api import create_app
from service.client import Client
from service.settings import Settings
from service.training import JobRecord
from service.training.queue import JSONSerializer
from service.training.reaper import checkpoint_path, reap
from service.training.requests import OPTIONS
from service.training.worker import JobRunner

from ..jobsupport import TINY_FLOW, Deployment, deployment, published, two_moons, wait_for, wait_job

__all__ = ["deployment"]  # the fixture, imported for the tests below

torch.set_num_threads(1)


@pytest.fixture
def jobs_settings(tmp_path: Path) -> Settings:
    return Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data",
                    embedded_worker=False, heartbeat_interval_s=0.1, checkpoint_every_s=0.1,
                    device="cpu", _env_file=None)


@pytest.fixture
def api(jobs_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(jobs_settings)) as client:
        yield client


def runner_for(api: TestClient) -> JobRunner:
    state = api.app.state
    return JobRunner(state.settings, state.db, state.store, state.queue, name="test-worker")


def upload(api: TestClient, x: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, x)
    r = api.post("/datasets", content=buf.getvalue(),
                 headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def density_job(dataset: str, steps: int = 40, name: str = "moons", **training) -> dict:
    return {"name": name, "flow": TINY_FLOW, "objective": {"kind": "density", "dataset": dataset},
            "training": {"steps": steps, "batch_size": 64, **training}}


# ---------------------------------------------------------------------- submission checks
@pytest.mark.parametrize(("change", "message"), [
    ({"flow": {"preset": "nope", "dim": 2}}, "flow.preset: unknown preset"),
    ({"flow": {"preset": "maf", "dim": 2, "hiden": [8]}}, "flow.hiden: unknown key"),
    ({"flow": {"preset": "maf", "dim": 3}}, "the data has 2 columns; the flow has dim 3"),
    ({"name": "no spaces allowed"}, "name"),
    ({"training": {"steps": 10**9}}, "over the limit"),
    ({"training": {"max_seconds": 10**7}}, "NFSERVE_MAX_TRAIN_SECONDS"),
    ({"training": {"steps": 0}}, "training.steps"),
    ({"training": {"lr": -1}}, "training.lr"),
    ({"training": {"stepz": 5}}, "training.stepz"),
    ({"training": {"anneal_steps": 5}}, "only for variational"),
    ({"training": {"loss": "wasserstein"}}, "training.loss"),
    ({"training": {"steps": 5, "epochs": 2}}, "not both"),
    ({"objective": {"kind": "density", "data": [[1, 2, 3], [4, 5, 6]]}}, "3 columns"),
    ({"objective": {"kind": "density", "dataset": "ds_missing"}}, "unknown dataset 'ds_missing'"),
    ({"objective": {"kind": "density"}}, "exactly one of 'dataset'"),
    ({"objective": {"kind": "density", "data": [[1, 2], [3]]}}, "does not have the 2 values"),
    ({"objective": {"kind": "density", "data": [[1, 2], [3, "x"]]}}, "not numbers"),
    ({"objective": {"kind": "magic"}}, "objective"),
    ({"objective": {"kind": "variational", "target": {"builtin": "U9"}}}, "Unknown target 'U9'"),
    ({"objective": {"kind": "variational",
                    "target": {"dim": 2, "log_prob": "__import__('os').system('x')"}}},
     "objective.target"),
    ({"objective": {"kind": "variational",
                    "target": {"dim": 2, "log_prob": "-0.5*sum((z - y)**2)",
                               "constants": {"y": [1.0, 2.0, 3.0]}}}}, "do not broadcast"),
    ({"objective": {"kind": "variational", "target": {"dim": 3, "log_prob": "-sum(z**2)"}}},
     "the target has dimension 3; the flow has dim 2"),
])
def test_train_refuses_bad_requests_with_422(api: TestClient, change: dict,
                                              message: str) -> None:
    body = density_job(upload(api, two_moons(100)))
    body.update(change)
    r = api.post("/train", json=body)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert api.get("/jobs").json()["count"] == 0  # nothing was queued
    datasets = api.app.state.settings.data_dir / "datasets"
    assert len(list(datasets.iterdir())) == 1  # and no inline data was kept


def test_train_refuses_non_finite_inline_data(api: TestClient) -> None:
    body = ('{"name": "m", "flow": {"preset": "maf", "dim": 2}, "objective": {"kind": "density", '
            '"data": [[1, 2], [3, NaN], [Infinity, 0]]}}')
    r = api.post("/train", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "2 rows" in r.json()["detail"] and "NaN or inf" in r.json()["detail"]


def test_unknown_job_is_404(api: TestClient) -> None:
    assert api.get("/jobs/job_nope").status_code == 404
    assert api.delete("/jobs/job_nope").status_code == 404


# ---------------------------------------------------------------------- lifecycle
def test_density_job_runs_publishes_and_is_servable(api: TestClient) -> None:
    r = api.post("/train", json=density_job(upload(api, two_moons(400)), steps=60))
    assert r.status_code == 202
    accepted = r.json()
    assert accepted["status"] == "queued" and accepted["status_url"] == f"/jobs/{accepted['job_id']}"
    job_id = accepted["job_id"]
    assert api.get(accepted["status_url"]).json()["status"] == "queued"

    runner_for(api)(job_id)

    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert published(job) == {"model": "moons", "version": 1}
    assert job["progress"]["step"] == job["progress"]["total"] == 60
    assert job["progress"]["loss"] is not None and job["progress"]["val_loss"] is not None
    assert job["attempts"] == 1 and job["error"] is None
    r = api.post("/log_prob", json={"model": "moons", "x": [[0.0, 0.5]]})
    assert r.status_code == 200 and r.json()["version"] == 1
    meta = api.get("/models/moons").json()
    assert meta["name"] == "moons"
    version = meta["versions"][0]
    assert version["metadata"]["job_id"] == job_id and version["hash"].startswith("sha256:")
    assert version["metadata"]["training"]["steps"] == 60
    listed = api.get("/jobs", params={"status": "succeeded"}).json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == job_id
    assert not checkpoint_path(api.app.state.settings, job_id).exists()


@pytest.mark.parametrize("target", [
    {"builtin": "U1"},
    {"dim": 2, "log_prob": "-0.5*sum(((z - mu)/s)**2)", "constants": {"mu": [1.0, -1.0],
                                                                       "s": [0.5, 2.0]}},
])
def test_variational_job_succeeds(api: TestClient, target: dict) -> None:
    r = api.post("/train", json={"name": "vi", "flow": TINY_FLOW,
                                 "objective": {"kind": "variational", "target": target},
                                 "training": {"steps": 30, "batch_size": 64}})
    assert r.status_code == 202, r.text
    runner_for(api)(r.json()["job_id"])
    job = api.get(r.json()["status_url"]).json()
    assert job["status"] == "succeeded", job
    assert job["kind"] == "variational" and job["result"]["model"] == "vi"
    r = api.post("/sample", json={"model": "vi", "n": 3, "seed": 0})
    assert r.status_code == 200 and len(r.json()["samples"]) == 3


@pytest.mark.parametrize("loss", ["flow_matching", "likelihood", None])
def test_cnf_density_job_trains_by_the_loss_asked_for(api: TestClient, loss: str | None) -> None:
    training = {"steps": 15, "batch_size": 64, **({"loss": loss} if loss else {})}
    r = api.post("/train", json={"name": "cnf", "flow": {"preset": "cnf", "dim": 2, "hidden": [8]},
                                 "objective": {"kind": "density", "data": two_moons(200).tolist()},
                                 "training": training})
    assert r.status_code == 202, r.text
    runner_for(api)(r.json()["job_id"])
    job = api.get(r.json()["status_url"]).json()
    assert job["status"] == "succeeded", job
    version = api.get("/models/cnf").json()["versions"][0]
    assert version["metadata"]["training"]["loss_function"] == (loss or "flow_matching")
    assert version["cost"] == {"log_prob": "ode", "sample": "ode"}
    r = api.post("/log_prob", json={"model": "cnf", "x": [[0.0, 0.5]]})
    assert r.status_code == 200 and r.json()["exact"] is True


def test_inline_data_job_keeps_the_data_as_a_dataset(api: TestClient) -> None:
    data = two_moons(120).tolist()
    r = api.post("/train", json={"name": "inline", "flow": TINY_FLOW,
                                 "objective": {"kind": "density", "data": data},
                                 "training": {"steps": 20}})
    assert r.status_code == 202, r.text
    job = api.get(r.json()["status_url"]).json()
    dataset = api.get(f"/datasets/{job['objective']['dataset']}").json()
    assert (dataset["rows"], dataset["dim"], dataset["format"]) == (120, 2, "inline")
    runner_for(api)(job["id"])
    assert api.get(r.json()["status_url"]).json()["status"] == "succeeded"


def test_job_whose_data_vanished_fails_with_the_reason(api: TestClient) -> None:
    dataset = upload(api, two_moons(100))
    r = api.post("/train", json=density_job(dataset))
    (api.app.state.settings.data_dir / "datasets" / f"{dataset}.safetensors").unlink()
    runner_for(api)(r.json()["job_id"])
    job = api.get(r.json()["status_url"]).json()
    assert job["status"] == "failed"
    assert "FileNotFoundError" in job["error"] and job["result"] is None


# ---------------------------------------------------------------------- cancellation
def test_cancelled_queued_job_never_starts(api: TestClient) -> None:
    r = api.post("/train", json=density_job(upload(api, two_moons(100))))
    job_id = r.json()["job_id"]
    ckpt = checkpoint_path(api.app.state.settings, job_id)  # as if handed back mid-training
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"checkpoint")
    r = api.delete(f"/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert not ckpt.exists()
    runner_for(api)(job_id)  # the queue still delivers its message: it must not run
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["attempts"] == 0 and job["started_at"] is None
    assert api.get("/models").json()["data"] == []


def test_running_job_reports_progress_and_cancel_stops_it_without_a_model(
        api: TestClient) -> None:
    r = api.post("/train", json=density_job(upload(api, two_moons(400)), steps=150_000))
    job_id = r.json()["job_id"]
    thread = threading.Thread(target=runner_for(api), args=(job_id,))
    thread.start()
    try:
        first = wait_for(lambda: (j := api.get(f"/jobs/{job_id}").json())["status"] == "running"
                         and (j["progress"]["step"] or 0) > 0 and j, what="progress")
        assert first["progress"]["total"] == 150_000
        later = wait_for(lambda: (j := api.get(f"/jobs/{job_id}").json())["progress"]["step"]
                         > first["progress"]["step"] and j["heartbeat_at"] > first["heartbeat_at"]
                         and j, what="progress to advance")
        assert later["progress"]["elapsed"] > 0 and later["progress"]["eta"] is not None
        wait_for(lambda: checkpoint_path(api.app.state.settings, job_id).exists(),
                 what="a checkpoint")

        r = api.delete(f"/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["cancel_requested"] is True
        job = wait_for(lambda: (j := api.get(f"/jobs/{job_id}").json())["status"] == "cancelled"
                       and j, what="the cancel")
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert job["result"] is None and job["progress"]["step"] < 150_000
    assert api.get("/models").json()["data"] == []  # no half model
    assert not (api.app.state.settings.models_dir / "moons").exists() or not any(
        (api.app.state.settings.models_dir / "moons").iterdir())
    assert not checkpoint_path(api.app.state.settings, job_id).exists()
    assert api.delete(f"/jobs/{job_id}").status_code == 200  # cancelling again is harmless


def test_cancelling_a_finished_job_is_409(api: TestClient) -> None:
    r = api.post("/train", json=density_job(upload(api, two_moons(100)), steps=10))
    runner_for(api)(r.json()["job_id"])
    r = api.delete(r.json()["status_url"])
    assert r.status_code == 409 and "already succeeded" in r.json()["detail"]


# ---------------------------------------------------------------------- exactly once
def test_concurrent_deliveries_of_one_job_run_it_once(api: TestClient) -> None:
    r = api.post("/train", json=density_job(upload(api, two_moons(200)), steps=40))
    job_id = r.json()["job_id"]
    runners = [runner_for(api) for _ in range(4)]
    barrier = threading.Barrier(len(runners))

    def deliver(run: JobRunner) -> None:
        barrier.wait()
        run(job_id)

    threads = [threading.Thread(target=deliver, args=(run,)) for run in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert [m["name"] for m in api.get("/models").json()["data"]] == ["moons"]
    assert api.get("/models/moons").json()["latest"] == 1


def test_queue_messages_are_json_never_pickle() -> None:
    serializer = JSONSerializer()
    assert serializer.deserialize(serializer.serialize({"job": "job_1"})) == {"job": "job_1"}

    class Evil:
        def __reduce__(self):  # would run on unpickling
            return (Path("/tmp/nfserve-pwned").touch, ())

    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing runs
        serializer.deserialize(pickle.dumps(Evil()))
    assert not Path("/tmp/nfserve-pwned").exists()
    with pytest.raises(TypeError):
        serializer.serialize(Evil())


# ---------------------------------------------------------------------- end to end, embedded
def test_end_to_end_over_http_embedded_mode(deployment: Deployment) -> None:
    """`nfserve serve` alone (SQLite, SqliteHuey, one embedded worker): upload, train, poll,
    score, sample; a second job's version is served at once, with no restart."""
    api = deployment.start_api(embedded_worker=True)
    with Client(api.url) as client:
        ready = client.ready()
        assert {c["name"] for c in ready["checks"]} >= {"job_store", "queue"}
        csv = "x,y\n" + "\n".join(f"{a:.6f},{b:.6f}" for a, b in two_moons(500))
        dataset = client.upload_dataset(csv.encode(), filename="moons.csv")
        assert (dataset["rows"], dataset["dim"], dataset["format"]) == (500, 2, "csv")
        assert client.dataset(dataset["id"])["rows"] == 500

        objective = {"kind": "density", "dataset": dataset["id"]}
        first = client.train("moons", TINY_FLOW, objective, {"steps": 200, "batch_size": 64})
        job = wait_job(client, first["job_id"], deployment)
        assert job["status"] == "succeeded", job
        assert published(job) == {"model": "moons", "version": 1}
        assert job["progress"]["step"] == 200

        x = two_moons(5, seed=1)
        lp1 = client.log_prob("moons", x)
        assert lp1.shape == (5,) and np.isfinite(lp1).all()
        samples, log_q = client.sample("moons", 50, seed=3)
        assert samples.shape == (50, 2) and np.isfinite(log_q).all()

        second = client.train("moons", TINY_FLOW, objective,
                              {"steps": 100, "batch_size": 64, "seed": 1})
        job = wait_job(client, second["job_id"], deployment)
        assert published(job) == {"model": "moons", "version": 2}, job
        lp2 = client.log_prob("moons", x)  # latest is now version 2, no restart
        assert not np.allclose(lp1, lp2)
        np.testing.assert_allclose(client.log_prob("moons", x, version=1), lp1, rtol=1e-5)
        assert [j["id"] for j in client.jobs(name="moons")] == [second["job_id"],
                                                                first["job_id"]]


def test_publish_failure_fails_the_job_with_the_reason(api: TestClient,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    r = api.post("/train", json=density_job(upload(api, two_moons(100)), steps=10))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api.app.state.store, "publish", full)
    runner_for(api)(r.json()["job_id"])
    job = api.get(r.json()["status_url"]).json()
    assert job["status"] == "failed"
    assert "Publishing the model failed" in job["error"] and "No space left" in job["error"]


# ---------------------------------------------------------------------- the reaper
@pytest.mark.parametrize(("retries", "cancel", "status"), [
    (0, False, "queued"), (2, False, "failed"), (0, True, "cancelled")])
def test_reaper_requeues_fails_or_cancels_a_job_with_a_stale_heartbeat(
        api: TestClient, retries: int, cancel: bool, status: str) -> None:
    state = api.app.state
    state.reaper_stop.set()  # the app's own reaper must not race this test's sweeps
    r = api.post("/train", json=density_job(upload(api, two_moons(100))))
    job_id = r.json()["job_id"]
    state.queue.huey.flush()
    attempt = state.db.claim(job_id, "dead-host:1")
    assert attempt == 1
    state.db.transition(job_id, attempt=attempt, retries=retries, cancel_requested=cancel,
                        heartbeat_at=time.time() - 60)
    counts = reap(state.db, state.queue, state.settings.model_copy(update={"max_retries": 2}))
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == status, job
    assert sum(counts.values()) == 1
    if status == "queued":
        assert job["retries"] == 1 and state.queue.pending() == 1  # and its message re-sent
    if status == "failed":
        assert "dead-host:1 stopped sending heartbeats" in job["error"]
        assert "NFSERVE_MAX_RETRIES=2" in job["error"]
    assert reap(state.db, state.queue, state.settings)["requeued"] == 0  # nothing twice
    assert state.db.transition(job_id, attempt=attempt, step=5) is False  # the old attempt is fenced
    with state.db.session() as s:
        assert s.get(JobRecord, job_id).status == status


def test_fresh_heartbeats_are_left_alone(api: TestClient) -> None:
    state = api.app.state
    state.reaper_stop.set()
    r = api.post("/train", json=density_job(upload(api, two_moons(100))))
    state.db.claim(r.json()["job_id"], "live-host:1")
    assert reap(state.db, state.queue, state.settings) == {
        "requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    assert api.get(r.json()["status_url"]).json()["status"] == "running"


def test_plugin_targets_are_checked_at_submission_and_trained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = tmp_path / "plugins" / "nfserve_test_plugin.py"
    plugin.parent.mkdir()
    plugin.write_text("import nfcore\n"
                      "nfcore.targets.register('ring_test', lambda z: -((z * z).sum(-1) - 4) ** 2,"
                      " dim=2, replace=True)\n")
    monkeypatch.syspath_prepend(str(plugin.parent))
    settings = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data",
                        embedded_worker=False, plugins=["nfserve_test_plugin"], device="cpu",
                        _env_file=None)
    with TestClient(create_app(settings)) as api:
        body = {"name": "ring", "flow": TINY_FLOW, "training": {"steps": 10},
                "objective": {"kind": "variational", "target": {"builtin": "ring_test"}}}
        r = api.post("/train", json=body)
        assert r.status_code == 202, r.text
        runner_for(api)(r.json()["job_id"])
        assert api.get(r.json()["status_url"]).json()["status"] == "succeeded"


def test_metrics_count_jobs_by_status(api: TestClient) -> None:
    r = api.post("/train", json=density_job(upload(api, two_moons(100)), steps=10))
    api.post("/train", json=density_job(upload(api, two_moons(100)), steps=10))
    runner_for(api)(r.json()["job_id"])
    text = api.get("/metrics").text
    assert 'nfserve_jobs{status="succeeded"} 1.0' in text
    assert 'nfserve_jobs{status="queued"} 1.0' in text
    assert "nfserve_job_queue_messages" in text


# ---------------------------------------------------------------------- budgets and diagnostics
DIAGNOSTICS = {"pareto_k": 0.93, "ess_fraction": 0.12, "tail_fraction": 0.04, "moment_shift": 0.3,
               "verdict": "unreliable", "reasons": ["pareto_k 0.93 > 0.7", "4 % in spline tails"]}


def spy_fits(monkeypatch: pytest.MonkeyPatch, *, stop: bool = False,
             summary: dict | None = None) -> list[dict]:
    """Record the options each nfcore fit gets (``stop``: then fail instead of training; with
    ``summary``: add it to the fit's summary, as a newer nfcore would)."""
    calls: list[dict] = []
    for name in ("fit_density", "fit_target"):
        real = getattr(nfcore, name)

        def spy(flow, source, real=real, **options):
            calls.append({k: v for k, v in options.items() if k in OPTIONS})
            if stop:
                raise RuntimeError("stopped by the test")
            result = real(flow, source, **options)
            result.summary.update(summary or {})
            return result

        monkeypatch.setattr(nfcore, name, spy)
    return calls


def test_a_time_budget_alone_is_passed_on_alone_and_has_no_step_total(
        api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_fits(monkeypatch)
    r = api.post("/train", json={"name": "timed", "flow": TINY_FLOW,
                                 "objective": {"kind": "density", "data": two_moons(200).tolist()},
                                 "training": {"max_seconds": 1.0, "batch_size": 64}})
    assert r.status_code == 202, r.text
    job = api.get(r.json()["status_url"]).json()
    assert job["training"] == {"max_seconds": 1.0, "batch_size": 64}  # as given, nothing added
    assert job["progress"]["total"] is None
    runner_for(api)(job["id"])
    job = api.get(r.json()["status_url"]).json()
    assert job["status"] == "succeeded", job
    assert calls == [{"max_seconds": 1.0, "batch_size": 64}]  # no hidden step count
    assert job["progress"]["total"] is None and job["progress"]["step"] > 0


@pytest.mark.parametrize(("kind", "training", "total", "passed"), [
    ("density", {}, DEFAULT_STEPS["density"], {}),
    ("variational", {}, DEFAULT_STEPS["variational"], {}),
    ("density", {"epochs": 2, "batch_size": 50}, 10, {"epochs": 2, "batch_size": 50}),  # 225 rows
    ("variational", {"steps": 30, "max_seconds": 60}, 30, {"steps": 30, "max_seconds": 60}),
])
def test_only_the_options_given_reach_nfcore(api: TestClient, monkeypatch: pytest.MonkeyPatch,
                                              kind: str, training: dict, total: int,
                                              passed: dict) -> None:
    calls = spy_fits(monkeypatch, stop=True)
    objective = ({"kind": "density", "dataset": upload(api, two_moons(250))} if kind == "density"
                 else {"kind": "variational", "target": {"builtin": "U1"}})
    r = api.post("/train", json={"name": "m", "flow": TINY_FLOW, "objective": objective,
                                 "training": training})
    assert r.status_code == 202, r.text
    assert api.get(r.json()["status_url"]).json()["progress"]["total"] == total
    runner_for(api)(r.json()["job_id"])
    assert calls == [passed]
    assert "stopped by the test" in api.get(r.json()["status_url"]).json()["error"]


def test_openapi_states_the_budget_rules(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()["components"]["schemas"]["TrainingOptions"]
    for field in ("steps", "max_seconds"):
        text = schema["properties"][field]["description"]
        assert "alone trains until it runs out or early stopping" in text
        assert "whichever comes first" in text
        assert f"{DEFAULT_STEPS['density']} steps for density jobs" in text


def test_diagnostics_of_a_fit_show_in_the_job_and_the_model(
        api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    spy_fits(monkeypatch, summary={"diagnostics": DIAGNOSTICS})
    r = api.post("/train", json={"name": "vi", "flow": TINY_FLOW, "training": {"steps": 10},
                                 "objective": {"kind": "variational",
                                               "target": {"builtin": "U1"}}})
    runner_for(api)(r.json()["job_id"])
    job = api.get(r.json()["status_url"]).json()
    assert job["status"] == "succeeded", job
    assert job["result"]["diagnostics"] == DIAGNOSTICS
    version = api.get("/models/vi").json()["versions"][0]
    assert version["diagnostics"] == DIAGNOSTICS
    assert version["metadata"]["training"]["diagnostics"] == DIAGNOSTICS
    schema = api.get("/openapi.json").json()["components"]["schemas"]
    assert "diagnostics" in schema["JobResult"]["properties"]
    assert "diagnostics" not in schema["JobResult"].get("required", [])
    assert set(schema["Diagnostics"]["properties"]) >= set(DIAGNOSTICS)
