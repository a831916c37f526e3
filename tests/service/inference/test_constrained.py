"""Serving a flow fit to a model-language target, in process: /sample answers constrained,
named columns with log q there and the model's log density; /log_prob takes named constrained
values; both agree with a direct change-of-variables computation on the engine's flow."""

from __future__ import annotations

import asyncio
import io
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.numpy import load as st_load

import nfcore
from nfcore import targets
from service.api import create_app
from service.client import AsyncClient, Client
from service.client import InvalidInput as ClientInvalidInput
from service.errors import InvalidInput
from service.inference import Batcher, BatcherConfig, Pending, forward
from service.inference.constrained import target_of, target_spec, wrap
from service.settings import Settings

from ..conftest import Server, write_model

#: Two parameters, one with a lower bound, a scalar and a vector derived quantity.
MODEL = {"params": {"mu": {}, "sigma": {"lower": 0}},
         "data": {"y": [1.2, 0.4, 2.1, 1.7, 0.9]},
         "log_prob": ["normal_lpdf(mu, 0, 5)", "lognormal_lpdf(sigma, 0, 1)",
                      "normal_lpdf(y, mu, sigma)"],
         "derived": {"var": "square(sigma)", "resid": "(y - mu) / sigma"}}
COLUMNS = ["mu", "sigma", "var"] + [f"resid[{i}]" for i in range(5)]
FLOW = {"preset": "maf", "dim": 2, "transforms": 2, "hidden": [8]}


@pytest.fixture
def api(models_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    spec = targets.from_spec(MODEL).spec
    write_model(models_dir, "posterior", FLOW, metadata={"target": json.dumps(spec)})
    write_model(models_dir, "plain", FLOW, seed=1)
    settings = Settings(models_dir=models_dir, data_dir=tmp_path / "data",
                        embedded_worker=False, _env_file=None)
    with TestClient(create_app(settings)) as client:
        yield client


def flow_of(api: TestClient, name: str) -> nfcore.Flow:
    return nfcore.load(api.app.state.settings.models_dir / name / "1" / "model.safetensors")


def direct_log_q(flow: nfcore.Flow, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Change of variables by hand: z = (mu, log sigma), d(sigma)/d(log sigma) = sigma."""
    z = torch.as_tensor(np.column_stack([mu, np.log(sigma)]), dtype=torch.float32)
    with torch.inference_mode():
        return flow.log_prob(z).double().numpy() - np.log(sigma)


def direct_target(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """The model's log density written out with scipy-free numpy."""
    y = np.asarray(MODEL["data"]["y"])
    normal = (-0.5 * (mu / 5) ** 2 - math.log(5) - 0.5 * math.log(2 * math.pi))
    lognormal = -0.5 * np.log(sigma) ** 2 - np.log(sigma) - 0.5 * math.log(2 * math.pi)
    lik = (-0.5 * ((y[None] - mu[:, None]) / sigma[:, None]) ** 2 - np.log(sigma[:, None])
           - 0.5 * math.log(2 * math.pi)).sum(1)
    return normal + lognormal + lik


def test_sample_answers_named_constrained_columns(api: TestClient) -> None:
    r = api.post("/sample", json={"model": "posterior", "n": 200, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["columns"] == COLUMNS
    samples = np.asarray(body["samples"])
    assert samples.shape == (200, len(COLUMNS))
    mu, sigma = samples[:, 0], samples[:, 1]
    assert (sigma > 0).all()  # the constraint
    np.testing.assert_allclose(samples[:, 2], sigma ** 2, rtol=1e-9)  # derived quantities
    y = np.asarray(MODEL["data"]["y"])
    np.testing.assert_allclose(samples[:, 3:], (y[None] - mu[:, None]) / sigma[:, None],
                               rtol=1e-9)
    # log q in the constrained space, and the model's density at the same points
    np.testing.assert_allclose(body["log_prob"], direct_log_q(flow_of(api, "posterior"), mu, sigma),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(body["target_log_prob"], direct_target(mu, sigma), rtol=1e-9)


def test_log_prob_takes_named_values_and_rows(api: TestClient) -> None:
    mu, sigma = np.array([0.3, 1.1, -0.4]), np.array([0.5, 1.0, 2.5])
    r = api.post("/log_prob", json={"model": "posterior",
                                    "values": {"mu": mu.tolist(), "sigma": sigma.tolist()}})
    assert r.status_code == 200, r.text
    want = direct_log_q(flow_of(api, "posterior"), mu, sigma)
    np.testing.assert_allclose(r.json()["log_prob"], want, rtol=1e-5, atol=1e-5)
    rows = api.post("/log_prob", json={"model": "posterior",
                                       "x": np.column_stack([mu, sigma]).tolist()})
    np.testing.assert_allclose(rows.json()["log_prob"], r.json()["log_prob"], rtol=1e-12)


def test_sample_and_log_prob_agree_on_the_same_values(api: TestClient) -> None:
    body = api.post("/sample", json={"model": "posterior", "n": 50, "seed": 4}).json()
    samples = np.asarray(body["samples"])
    r = api.post("/log_prob", json={"model": "posterior",
                                    "values": {"mu": samples[:, 0].tolist(),
                                               "sigma": samples[:, 1].tolist()}})
    np.testing.assert_allclose(r.json()["log_prob"], body["log_prob"], rtol=1e-4, atol=1e-4)
    # the rows of a /sample answer, derived columns included, are accepted as they are
    again = api.post("/log_prob", json={"model": "posterior", "x": body["samples"]})
    np.testing.assert_allclose(again.json()["log_prob"], r.json()["log_prob"], rtol=1e-12)


def test_binary_sample_carries_the_columns_in_its_metadata(api: TestClient) -> None:
    r = api.post("/sample?model=posterior&n=30&seed=2",
                 headers={"content-type": "application/octet-stream",
                          "accept": "application/octet-stream"})
    assert r.status_code == 200, r.text
    tensors = st_load(r.content)
    assert set(tensors) == {"samples", "log_prob", "target_log_prob"}
    assert tensors["samples"].shape == (30, len(COLUMNS))
    path = Path(api.app.state.settings.data_dir) / "answer.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(r.content)
    with safe_open(str(path), "np") as f:
        assert json.loads(f.metadata()["columns"]) == COLUMNS
    json_body = api.post("/sample", json={"model": "posterior", "n": 30, "seed": 2}).json()
    np.testing.assert_allclose(tensors["samples"], json_body["samples"], rtol=1e-12)
    np.testing.assert_allclose(tensors["target_log_prob"], json_body["target_log_prob"])


@pytest.mark.parametrize(("values", "message"), [
    ({"mu": [0.0], "sigma": [-1.0]}, "values.sigma: row 0 is outside the parameter's support"),
    ({"mu": [0.0, 1.0], "sigma": [1.0, 0.0]}, "values.sigma: row 1 is outside"),
    ({"mu": [0.0]}, "values.sigma: missing"),
    ({"mu": [0.0], "sigma": [1.0], "tau": [1.0]}, "values.tau: unknown parameter"),
    ({"mu": [[0.0, 1.0]], "sigma": [1.0]}, "values.mu: expected shape (N)"),
    ({"mu": [0.0, 1.0], "sigma": [1.0]}, "values.sigma: has 1 rows"),
    ({"mu": ["a"], "sigma": [1.0]}, "values.mu must be a rectangular array of numbers"),
    ([1.0, 2.0], "values must be an object"),
])
def test_bad_named_values_are_422_naming_the_parameter(api: TestClient, values: object,
                                                       message: str) -> None:
    r = api.post("/log_prob", json={"model": "posterior", "values": values})
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


def test_bad_rows_and_plain_models_are_422(api: TestClient) -> None:
    r = api.post("/log_prob", json={"model": "posterior", "x": [[0.0, 1.0, 2.0]]})
    assert r.status_code == 422 and "shape (rows, 2)" in r.json()["detail"]
    r = api.post("/log_prob", json={"model": "posterior", "x": [[0.0, -1.0]]})
    assert r.status_code == 422 and "values.sigma: row 0" in r.json()["detail"]
    r = api.post("/log_prob", json={"model": "plain", "values": {"mu": [0.0]}})
    assert r.status_code == 422 and "not fit to a model-language target" in r.json()["detail"]


def test_a_bad_request_in_a_batch_fails_alone() -> None:
    """Out-of-support values fail their own request only, in a batch with good ones, and the
    good ones get the same answer as alone (the pass does not alter the queued requests)."""
    torch.manual_seed(0)
    flow = nfcore.build(FLOW)
    target = targets.from_spec(MODEL)
    run = wrap(forward(flow, 1000), flow, target)
    lock = threading.Lock()
    batcher = Batcher(run, "t:1", BatcherConfig(max_queue_delay_s=0.0), device_lock=lock)
    good = np.array([[1.0, 0.2], [0.5, 2.0]])
    bad = np.array([[0.0, 1.0], [0.0, -1.0]])

    def job(x: np.ndarray) -> Pending:
        loop = asyncio.get_running_loop()
        return Pending(kind="log_prob", rows=len(x), future=loop.create_future(), loop=loop,
                       deadline=time.monotonic() + 30, x=x)

    async def main() -> list:
        with lock:  # hold every pass until all three are queued: they run as one batch first
            first, second, third = job(good), job(bad), job(good.copy())
            for item in (first, second, third):
                batcher.submit(item)
        return await asyncio.gather(first.future, second.future, third.future,
                                    return_exceptions=True)

    try:
        got_first, got_bad, got_third = asyncio.run(main())
    finally:
        batcher.close()
    assert isinstance(got_bad, InvalidInput) and "values.sigma: row 1" in got_bad.detail
    want = direct_log_q(flow, good[:, 0], good[:, 1])
    np.testing.assert_allclose(got_first, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_third, want, rtol=1e-5, atol=1e-5)


def test_plain_flows_answer_as_before(api: TestClient) -> None:
    body = api.post("/sample", json={"model": "plain", "n": 5, "seed": 0}).json()
    assert set(body) == {"model", "version", "samples", "log_prob"}
    r = api.post("/log_prob", json={"model": "plain", "x": body["samples"]})
    assert set(r.json()) == {"model", "version", "log_prob", "exact"}


def test_model_page_shows_the_columns_and_params(api: TestClient) -> None:
    version = api.get("/models/posterior").json()["versions"][0]
    assert version["target"]["columns"] == COLUMNS
    assert version["target"]["params"] == {"mu": {}, "sigma": {"lower": 0.0}}
    assert version["target"]["derived_columns"] == COLUMNS[2:]
    assert "target" not in api.get("/models/plain").json()["versions"][0]


def test_client_returns_the_columns(api: TestClient) -> None:
    client = Client(http=api)
    for binary in (False, True):
        draws = client.draws("posterior", 40, seed=3, binary=binary)
        assert draws.columns == COLUMNS and draws.samples.shape == (40, len(COLUMNS))
        np.testing.assert_allclose(draws.log_weights, draws.target_log_prob - draws.log_prob)
        named = draws.named()
        assert named["sigma"].shape == (40,) and (named["sigma"] > 0).all()
        lp = client.log_prob("posterior", values={"mu": named["mu"], "sigma": named["sigma"]})
        np.testing.assert_allclose(lp, draws.log_prob, rtol=1e-4, atol=1e-4)
    plain = client.draws("plain", 4, seed=0)
    assert plain.columns is None and plain.target_log_prob is None


def test_target_is_read_from_metadata_text_in_its_order() -> None:
    spec = targets.from_spec(MODEL).spec
    assert list(target_spec({"target": json.dumps(spec)})["derived"]) == ["var", "resid"]
    assert target_spec({"target": json.dumps({"builtin": "U1"})}) is None
    assert target_spec({"training": {"target_spec": spec}}) is None  # sorted by nfcore.save
    assert target_of({"target": spec}, 2).columns == COLUMNS
    with pytest.raises(nfcore.TargetError, match="flow has dim 3"):
        target_of({"target": spec}, 3)


def test_cli_sample_writes_named_columns(api: TestClient, capsys: pytest.CaptureFixture) -> None:
    from service.cli import main

    models_dir = api.app.state.settings.models_dir
    assert main(["sample", "posterior", "-n", "5", "--seed", "1", "--models-dir",
                 str(models_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split(",") == [*COLUMNS, "log_prob", "target_log_prob"]
    rows = np.loadtxt(io.StringIO("\n".join(lines[1:])), delimiter=",")
    assert rows.shape == (5, len(COLUMNS) + 2) and (rows[:, 1] > 0).all()


def test_openapi_documents_named_values_columns_and_model_targets(api: TestClient) -> None:
    doc = api.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    request = doc["paths"]["/log_prob"]["post"]["requestBody"]["content"]["application/json"]
    assert "values" in request["schema"]["properties"]
    assert any("values" in ex for ex in request["schema"]["examples"])
    assert {"columns", "target_log_prob"} <= set(schemas["SampleResponse"]["properties"])
    assert "params" in schemas["ModelLanguageTarget"]["properties"]
    assert schemas["ModelLanguageTarget"]["examples"][0]["derived"] == {
        "theta": "mu + tau * theta_tilde"}


def test_an_upload_whose_target_does_not_rebuild_is_422(api: TestClient) -> None:
    torch.manual_seed(0)
    flow = nfcore.build(FLOW)
    bad = dict(MODEL, log_prob="normal_lpdf(y, mu, sigmaa)")
    for target, message in [(bad, "Unknown name 'sigmaa'"),
                            ({"params": {"mu": {"shape": [3]}}, "log_prob": "normal_lpdf(mu, 0, 1)"},
                             "flow has dim 2")]:
        body = nfcore.saves(flow, metadata={"target": json.dumps(target)})
        r = api.post("/models?name=uploaded", content=body,
                     headers={"content-type": "application/octet-stream"})
        assert r.status_code == 422, r.text
        assert "its target cannot be rebuilt" in r.json()["detail"]
        assert message in r.json()["detail"]
    good = nfcore.saves(flow, metadata={"target": json.dumps(targets.from_spec(MODEL).spec)})
    r = api.post("/models?name=uploaded", content=good,
                 headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    body = api.post("/sample", json={"model": "uploaded", "n": 3, "seed": 0}).json()
    assert body["columns"] == COLUMNS


def test_async_client_against_a_real_server(server: Server) -> None:
    """A real uvicorn process (fast path on): the async client gets the columns, JSON and binary,
    and named values score back to the same log q."""
    spec = targets.from_spec(MODEL).spec
    write_model(server.models_dir, "posterior_async", FLOW, metadata={"target": json.dumps(spec)})
    flow = nfcore.load(server.models_dir / "posterior_async" / "1" / "model.safetensors")

    async def main() -> tuple:
        async with AsyncClient(server.url) as c:
            d = await c.draws("posterior_async", 64, seed=5)
            b = await c.draws("posterior_async", 64, seed=5, binary=True)
            named = d.named()
            lp = await c.log_prob("posterior_async",
                                  values={"mu": named["mu"], "sigma": named["sigma"]})
            try:
                await c.log_prob("posterior_async", values={"mu": [0.0], "sigma": [0.0]})
            except ClientInvalidInput as e:
                error = e
            return d, b, lp, error

    d, b, lp, error = asyncio.run(main())
    assert d.columns == b.columns == COLUMNS
    np.testing.assert_allclose(b.samples, d.samples, rtol=1e-12)
    np.testing.assert_allclose(lp, d.log_prob, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d.log_prob, direct_log_q(flow, d.samples[:, 0], d.samples[:, 1]),
                               rtol=1e-4, atol=1e-4)
    assert error.status_code == 422 and "values.sigma: row 0" in error.detail


def test_plot_of_a_two_parameter_model_is_in_its_constrained_space(api: TestClient) -> None:
    r = api.get("/models/posterior/plot.png?n=200&grid=32")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


SIMPLEX = {"params": {"p": {"constraint": "simplex", "shape": [3]}, "s": {"lower": 1, "upper": 4}},
           "log_prob": ["sum(log(p))", "normal_lpdf(s, 2, 1)"], "derived": {"p0s": "p[0] * s"}}


def test_log_q_on_a_simplex_and_an_interval_matches_autograd(models_dir: Path,
                                                             api: TestClient) -> None:
    """Three simplex columns from two free reals, and an interval: log q in the constrained
    space is log q(z) minus log|det| of the Jacobian of z -> (p[0], p[1], s), by autograd."""
    target = targets.from_spec(SIMPLEX)
    flow_spec = {"preset": "maf", "dim": 3, "transforms": 2, "hidden": [8]}
    write_model(models_dir, "simplex", flow_spec, metadata={"target": json.dumps(target.spec)})
    flow = flow_of(api, "simplex")
    body = api.post("/sample", json={"model": "simplex", "n": 20, "seed": 0}).json()
    assert body["columns"] == ["p[0]", "p[1]", "p[2]", "s", "p0s"]
    samples = np.asarray(body["samples"])
    np.testing.assert_allclose(samples[:, :3].sum(1), 1.0, rtol=1e-9)
    assert ((samples[:, 3] > 1) & (samples[:, 3] < 4)).all()
    values = {"p": samples[:, :3].tolist(), "s": samples[:, 3].tolist()}
    lp = np.asarray(api.post("/log_prob", json={"model": "simplex", "values": values}).json()
                    ["log_prob"])
    np.testing.assert_allclose(lp, body["log_prob"], rtol=1e-4, atol=1e-4)

    z = target.unconstrain(torch.as_tensor(samples[:, :4]))

    def free(zi: torch.Tensor) -> torch.Tensor:  # z -> (p[0], p[1], s)
        v = target.constrain(zi[None])[0][0]
        return v[[0, 1, 3]]

    logdet = np.array([torch.linalg.slogdet(torch.autograd.functional.jacobian(free, zi))[1]
                       .item() for zi in z])
    with torch.inference_mode():
        log_qz = flow.log_prob(z.float()).double().numpy()
    np.testing.assert_allclose(lp, log_qz - logdet, rtol=1e-4, atol=1e-4)
