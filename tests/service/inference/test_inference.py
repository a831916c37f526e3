"""/log_prob and /sample over HTTP (real uvicorn + the client) agree with the in-process engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.client import Client, NotFound
from service.inference import ModelCache
from service.store import ModelStore

from ..conftest import TINY, Server, write_model


def engine_log_prob(flow, x, context=None) -> np.ndarray:
    with torch.inference_mode():
        return flow.log_prob(torch.as_tensor(x, dtype=flow.dtype), context).numpy()


def engine_sample(flow, n: int, seed: int, context=None):
    with torch.inference_mode():
        x, lq = flow.sample_and_log_prob(n, context=context,
                                         generator=torch.Generator().manual_seed(seed))
    return x.numpy(), lq.numpy()


@pytest.mark.parametrize("binary", [False, True])
def test_log_prob_matches_engine(server: Server, client: Client, binary: bool) -> None:
    x = np.random.default_rng(0).normal(size=(300, 2))
    got = client.log_prob("tiny", x, binary=binary)
    assert got.shape == (300,)
    np.testing.assert_allclose(got, engine_log_prob(server.flows["tiny"], x), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("binary", [False, True])
def test_sample_with_seed_matches_engine(server: Server, client: Client, binary: bool) -> None:
    samples, log_q = client.sample("tiny3", 50, seed=7, binary=binary)
    want_x, want_lq = engine_sample(server.flows["tiny3"], 50, 7)
    assert samples.shape == (50, 3) and log_q.shape == (50,)
    np.testing.assert_allclose(samples, want_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_q, want_lq, rtol=1e-5, atol=1e-5)


def test_sample_without_seed_differs_between_calls(client: Client) -> None:
    a, _ = client.sample("tiny", 20)
    b, _ = client.sample("tiny", 20)
    assert not np.allclose(a, b)


def test_sample_log_prob_is_consistent_with_log_prob(client: Client) -> None:
    samples, log_q = client.sample("tiny", 100, seed=3)
    np.testing.assert_allclose(client.log_prob("tiny", samples), log_q, rtol=1e-4, atol=1e-4)


def test_binary_log_prob_returns_float32_of_model_dtype(client: Client) -> None:
    got = client.log_prob("tiny", np.zeros((2000, 2)), binary=True)
    assert got.dtype == np.float32 and got.shape == (2000,)


@pytest.mark.parametrize("binary", [False, True])
def test_conditional_model_takes_context(server: Server, client: Client, binary: bool) -> None:
    flow = server.flows["cond"]
    x = np.random.default_rng(1).normal(size=(40, 2))
    ctx = np.linspace(-1, 1, 40)[:, None]
    got = client.log_prob("cond", x, context=ctx, binary=binary)
    np.testing.assert_allclose(got, engine_log_prob(flow, x, torch.as_tensor(ctx).float()),
                               rtol=1e-5, atol=1e-5)
    # one context row for every point
    one = client.log_prob("cond", x, context=[0.5], binary=binary)
    np.testing.assert_allclose(one, engine_log_prob(flow, x, torch.full((40, 1), 0.5)),
                               rtol=1e-5, atol=1e-5)
    samples, _ = client.sample("cond", 10, seed=1, context=[[0.25]], binary=binary)
    want, _ = engine_sample(flow, 10, 1, torch.full((10, 1), 0.25))
    np.testing.assert_allclose(samples, want, rtol=1e-5, atol=1e-6)


def test_new_version_is_served_without_restart_and_old_stays_addressable(
        server: Server, client: Client) -> None:
    v1 = write_model(server.models_dir, "grows", TINY, version=1, seed=10)
    x = np.array([[0.3, -0.2], [1.0, 1.0]])
    np.testing.assert_allclose(client.log_prob("grows", x), engine_log_prob(v1, x), rtol=1e-5)
    v2 = write_model(server.models_dir, "grows", TINY, version=2, seed=11)
    np.testing.assert_allclose(client.log_prob("grows", x), engine_log_prob(v2, x), rtol=1e-5)
    np.testing.assert_allclose(client.log_prob("grows", x, version=1), engine_log_prob(v1, x),
                               rtol=1e-5)
    with pytest.raises(NotFound, match="no version 3"):
        client.log_prob("grows", x, version=3)


def test_sample_accepts_options_in_query_string_without_body(server: Server) -> None:
    import httpx

    r = httpx.post(server.url + "/sample", params={"model": "tiny", "n": 4, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["version"] == 1
    want, _ = engine_sample(server.flows["tiny"], 4, 1)
    np.testing.assert_allclose(body["samples"], want, rtol=1e-5, atol=1e-6)


def test_json_answer_names_model_and_version(server: Server) -> None:
    import httpx

    r = httpx.post(server.url + "/log_prob", json={"model": "tiny", "x": [[0, 0]]})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert set(r.json()) == {"model", "version", "log_prob", "exact"}
    assert r.json()["exact"] is True


# ---------------------------------------------------------------------------------- model cache
def test_a_cancelled_request_does_not_cancel_a_shared_model_load(settings, make_model) -> None:
    import asyncio

    make_model("tiny")
    engine = ModelCache(settings, ModelStore(settings.models_dir))

    async def main():
        first = asyncio.ensure_future(engine.get("tiny"))
        second = asyncio.ensure_future(engine.get("tiny"))
        await asyncio.sleep(0)  # both are now waiting on the one load
        first.cancel()
        model = await second
        assert first.cancelled()
        again = await engine.get("tiny")  # a cache hit, the same loaded model
        return model, again

    try:
        model, again = asyncio.run(main())
        assert model is again and model.version == 1
        assert engine.cached == [("tiny", 1)]
    finally:
        engine.close()
