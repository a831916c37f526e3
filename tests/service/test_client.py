"""The Python client: transport switch, typed errors with the server's message, async, health,
OpenAPI completeness and readiness."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import client as client_module
from service.client import (
    AsyncClient,
    Client,
    InvalidInput,
    NFServeError,
    NotFound,
    Overloaded,
)

from .conftest import Server


def test_client_switches_to_binary_above_the_row_threshold() -> None:
    small = client_module._log_prob_call("m", np.zeros((10, 2)), None, None, None, 100)
    large = client_module._log_prob_call("m", np.zeros((101, 2)), None, None, None, 100)
    assert small.headers["content-type"] == "application/json"
    assert large.headers["content-type"] == "application/octet-stream"
    assert large.params == {"model": "m"}
    assert client_module._sample_call("m", 101, 1, None, None, None, 100).headers[
        "accept"] == "application/octet-stream"


def test_binary_and_json_transports_agree(client: Client) -> None:
    x = np.random.default_rng(3).normal(size=(1500, 2))  # above the default 1000-row threshold
    auto = client.log_prob("tiny", x)
    as_json = client.log_prob("tiny", x, binary=False)
    assert auto.dtype == np.float32  # came back as safetensors
    np.testing.assert_allclose(auto, as_json, rtol=1e-6)


def test_errors_are_typed_and_carry_the_server_message(client: Client) -> None:
    with pytest.raises(NotFound) as e:
        client.sample("missing", 1)
    assert isinstance(e.value, NFServeError)
    assert e.value.status_code == 404
    assert e.value.detail == "Unknown model 'missing'; GET /models lists the models"


def test_async_client_scores_and_samples(server: Server) -> None:
    async def main():
        async with AsyncClient(server.url) as ac:
            lp = await ac.log_prob("tiny", [[0.0, 0.0]])
            x, lq = await ac.sample("tiny", 3, seed=1)
            models = await ac.models()
            with pytest.raises(InvalidInput, match="expects 2"):
                await ac.log_prob("tiny", [[0.0]])
            return lp, x, lq, models

    lp, x, lq, models = asyncio.run(main())
    assert lp.shape == (1,) and x.shape == (3, 2) and lq.shape == (3,)
    assert any(m["name"] == "tiny" for m in models)


def test_health_endpoints(client: Client) -> None:
    assert client.live() == {"status": "ok", "checks": []}
    ready = client.ready()
    assert ready["status"] == "ok"
    assert {c["name"] for c in ready["checks"]} >= {"model_store", "inference"}


def test_readiness_fails_with_a_corrupted_model(app_client: TestClient, settings) -> None:
    bad = settings.models_dir / "broken" / "1"
    bad.mkdir(parents=True)
    (bad / "model.safetensors").write_bytes(b"\x00" * 16)
    r = app_client.get("/health/ready")
    assert r.status_code == 503
    assert "broken" in r.json()["checks"][0]["detail"]
    # and scoring it is a 503 with the reason, not a 500
    r = app_client.post("/log_prob", json={"model": "broken", "x": [[0, 0]]})
    assert r.status_code == 503
    assert "cannot be loaded" in r.json()["detail"]


def test_overloaded_maps_to_its_exception() -> None:
    import httpx

    response = httpx.Response(503, json={"detail": "queue full"})
    with pytest.raises(Overloaded, match="queue full"):
        client_module._check(response)


def test_client_works_over_an_in_process_app(app_client: TestClient) -> None:
    c = Client(http=app_client)
    assert c.log_prob("tiny", [[0, 0]]).shape == (1,)


def test_openapi_describes_every_field_with_an_example(app_client: TestClient) -> None:
    spec = app_client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/log_prob", "/sample", "/models", "/models/{name}",
            "/models/{name}/versions/{version}/artifact", "/models/{name}/plot.png",
            "/health/live", "/health/ready", "/metrics"} <= paths
    for op in ("/log_prob", "/sample"):
        content = spec["paths"][op]["post"]["requestBody"]["content"]
        assert {"application/json", "application/octet-stream"} <= set(content)
    from service.api import schemas

    ours = {n for n in schemas.__all__ if isinstance(getattr(schemas, n), type)}
    missing = []
    for name, schema in spec["components"]["schemas"].items():
        if name not in ours or "properties" not in schema:
            continue
        for field, prop in schema["properties"].items():
            if not prop.get("description") or not (prop.get("examples") or name in (
                    "ModelPublic", "ModelsPublic", "HealthPublic")):
                missing.append(f"{name}.{field}")
    assert not missing, missing
    assert app_client.get("/docs").status_code == 200


def test_async_client_has_every_method_of_the_client() -> None:
    def methods(cls: type) -> dict[str, list[str]]:
        return {name: list(inspect.signature(getattr(cls, name)).parameters)
                for name in dir(cls) if not name.startswith("_") and name not in ("close", "aclose")}

    assert methods(AsyncClient) == methods(Client)
    assert all(inspect.iscoroutinefunction(getattr(AsyncClient, name))
               for name in methods(AsyncClient))


def test_async_client_plots_and_waits_for_jobs(server: Server) -> None:
    job = {"name": "waited", "flow": {"preset": "maf", "dim": 2, "transforms": 1, "hidden": [4]},
           "objective": {"kind": "density", "data": [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]}}

    async def main():
        async with AsyncClient(server.url) as ac:
            png = await ac.plot("tiny", n=50, grid=20)
            queued = await ac.train(job["name"], job["flow"], job["objective"], {"steps": 5})
            with pytest.raises(TimeoutError, match="still queued"):  # no worker runs here
                await ac.wait_job(queued["job_id"], timeout=0.2, poll=0.05)
            await ac.cancel_job(queued["job_id"])
            return png, await ac.wait_job(queued["job_id"], timeout=30, poll=0.05)

    png, ended = asyncio.run(main())
    assert png.startswith(b"\x89PNG")
    assert ended["status"] == "cancelled"
