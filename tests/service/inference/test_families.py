"""Residual, Sylvester and continuous-time flows served like every other family: their cost in
the model's metadata, exact or labelled-estimate scores, and solves that end at the request's
deadline (503 with the reason) instead of hanging."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from ..conftest import Server, start_server, stop_server, write_model

FAMILIES = {
    "cnf": ({"preset": "cnf", "dim": 2, "hidden": [16]}, {"log_prob": "ode", "sample": "ode"}),
    "resflow": ({"preset": "resflow", "dim": 2, "transforms": 2, "hidden": [16]},
                {"log_prob": "one pass", "sample": "iterative"}),
    "resflow_estimate": ({"preset": "resflow", "dim": 2, "transforms": 2, "hidden": [16],
                          "exact_dim": 0}, {"log_prob": "one pass", "sample": "iterative"}),
    "sylvester": ({"preset": "sylvester", "dim": 2, "transforms": 2},
                  {"log_prob": "iterative", "sample": "one pass"}),
}


def _start(root: Path, env: dict[str, str] | None = None) -> Server:
    server = start_server(root, env)
    for name, (spec, _) in FAMILIES.items():
        server.flows[name] = write_model(server.models_dir, name, spec)
    return server


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = _start(tmp_path_factory.mktemp("families"), {"NFSERVE_STORE_REFRESH_S": "0"})
    yield server
    stop_server(server)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_is_served_with_its_cost_and_exactness(families: Server, name: str) -> None:
    spec, cost = FAMILIES[name]
    version = httpx.get(f"{families.url}/models/{name}", timeout=60).json()["versions"][0]
    assert version["cost"] == cost
    exact = name != "resflow_estimate"
    assert version["log_prob_exact"] is exact
    x = np.random.default_rng(0).normal(size=(40, 2))
    r = httpx.post(f"{families.url}/log_prob", json={"model": name, "x": x.tolist()},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["exact"] is exact
    with torch.no_grad():
        flow = families.flows[name]
        want = flow.log_prob(torch.as_tensor(x, dtype=flow.dtype)).numpy()
    if exact:  # an estimate is random, and its own test is in tests/nfcore
        np.testing.assert_allclose(r.json()["log_prob"], want, rtol=1e-4, atol=1e-4)
    r = httpx.post(f"{families.url}/sample", json={"model": name, "n": 30, "seed": 1},
                   timeout=60)
    assert r.status_code == 200, r.text
    samples, log_q = np.array(r.json()["samples"]), np.array(r.json()["log_prob"])
    assert samples.shape == (30, 2) and np.isfinite(log_q).all()
    if exact:  # sampling and scoring agree, to the solvers' tolerance
        again = httpx.post(f"{families.url}/log_prob", json={"model": name,
                                                           "x": samples.tolist()},
                            timeout=60).json()
        np.testing.assert_allclose(again["log_prob"], log_q, rtol=1e-3, atol=1e-3)


def test_an_ode_solve_past_the_deadline_is_a_503_with_the_reason(tmp_path: Path) -> None:
    server = _start(tmp_path, {"NFSERVE_REQUEST_TIMEOUT_S": "0.3", "NFSERVE_MAX_ROWS": "20000"})
    try:
        slow = {"preset": "cnf", "dim": 2, "hidden": [128, 128], "rtol": 1e-10, "atol": 1e-10}
        write_model(server.models_dir, "slow_cnf", slow)
        x = np.random.default_rng(0).normal(size=(20000, 2)).tolist()
        r = httpx.post(f"{server.url}/log_prob", json={"model": "slow_cnf", "x": x}, timeout=60)
        assert r.status_code == 503, r.text
        assert "time limit" in r.json()["detail"] or "deadline" in r.json()["detail"]
        # The server is still there and answers the next requests (the first of another model
        # may spend its 0.3 s loading it, on a busy machine).
        codes = [httpx.post(f"{server.url}/log_prob",
                            json={"model": "sylvester", "x": [[0.0, 0.0]]}).status_code
                 for _ in range(10)]
        assert 200 in codes, codes
    finally:
        stop_server(server)
